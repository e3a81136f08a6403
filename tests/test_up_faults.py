"""`beliefstore up` as an operator runs it: SIGTERM stops it exactly like Ctrl-C and
nothing it started survives; a broker or PostgreSQL that dies is restarted on the same
port (no zombie left), the projector and the API reconnect by themselves; a service that
keeps failing makes `up` exit 1 naming it and its log file.

Each test runs its own `up` on its own data directory (durable embedded services).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from kafka import KafkaConsumer

from beliefstore.embedded import free_port

CLI = str(Path(sys.executable).parent / "beliefstore")


class Up:
    """A `beliefstore up` subprocess with its output collected line by line."""

    def __init__(self, tmp_path: Path):
        self.home = tmp_path / ".beliefstore"
        for _attempt in range(3):  # the free port may be taken by the time `up` binds it
            self.port = free_port()
            env = {k: v for k, v in os.environ.items()
                   if k not in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL")
                   and not k.startswith("BELIEFSTORE_")}
            env.update(BELIEFSTORE_HOME=str(self.home), BELIEFSTORE_API_PORT=str(self.port),
                       BELIEFSTORE_AUTH="off", BELIEFSTORE_RATE_LIMIT="0", COLUMNS="300")
            self.proc = subprocess.Popen([CLI, "up"], env=env, cwd=tmp_path, text=True,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            self.out: list[str] = []
            self.err: list[str] = []
            for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
                threading.Thread(target=self._collect, args=(stream, sink), daemon=True).start()
            deadline = time.monotonic() + 90
            while "Press Ctrl-C" not in "".join(self.out) and self.proc.poll() is None:
                if time.monotonic() >= deadline:  # stop it: the fixture's teardown won't
                    self.stop(signal.SIGINT, 60)
                    raise AssertionError(f"no 'Press Ctrl-C' within 90 s:\n{self.text()}")
                time.sleep(0.1)
            if self.proc.poll() is None:
                break
            self.proc.wait()
            time.sleep(0.2)  # the reader threads drain the output
            assert "is port" in self.text() and "taken" in self.text(), self.text()
        self.wait_for("Press Ctrl-C", self.out, 1)
        self.url = f"http://127.0.0.1:{self.port}"

    @staticmethod
    def _collect(stream, sink: list[str]) -> None:
        for line in stream:
            sink.append(line)

    def text(self) -> str:
        return "".join(self.out) + "".join(self.err)

    def wait_for(self, needle: str, sink: list[str] | None = None, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while needle not in "".join(sink if sink is not None else self.out + self.err):
            assert self.proc.poll() is None or needle in self.text(), self.text()
            assert time.monotonic() < deadline, f"no {needle!r} within {timeout} s:\n{self.text()}"
            time.sleep(0.1)

    def processes(self) -> list[psutil.Process]:
        """Every process `up` started: its descendants and the (daemonized) postmaster."""
        procs = psutil.Process(self.proc.pid).children(recursive=True)
        pid_file = self.home / "postgres" / "postmaster.pid"
        if pid_file.exists():
            postmaster = psutil.Process(int(pid_file.read_text().split()[0]))
            procs += [postmaster, *postmaster.children(recursive=True)]
        return procs

    def child(self, name: str) -> psutil.Process:
        [proc] = [p for p in psutil.Process(self.proc.pid).children() if name in p.name()]
        return proc

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 90) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def survivors(procs: list[psutil.Process], home: Path) -> list[str]:
    """The processes of ``procs`` still alive, and any process naming ``home``."""
    alive = [f"{p.pid} {p.name()}" for p in procs
             if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in psutil.process_iter(["pid", "cmdline"]):
        if str(home) in " ".join(p.info["cmdline"] or []):
            alive.append(f"{p.pid} {' '.join(p.info['cmdline'])[:200]}")
    return alive


def post(url: str, value: str, timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{url}/v1/observations", timeout=timeout, json={
        "subject_id": "user-up", "context": "support", "attribute": "mood", "value": value,
        "confidence": 0.8, "source": "triage_agent"})


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_up_stops_everything_on_sigterm_and_sigint(tmp_path, sig):
    up = Up(tmp_path)
    try:
        assert post(up.url, "calm").status_code == 201
        started = up.processes()
        names = {p.name() for p in started}
        assert "postgres" in names and any("tansu" in n for n in names), names
        if sig == signal.SIGTERM:
            # on its durable broker `up` creates every topic with one partition, the
            # access log's included (the API processes would make it with the default)
            state = json.loads((up.home / "services.json").read_text())
            consumer = KafkaConsumer(bootstrap_servers=state["kafka_bootstrap_servers"])
            try:
                assert {t: consumer.partitions_for_topic(t) for t in (
                    "beliefstore.events", "beliefstore.events.dlq", "beliefstore.access")} == {
                    "beliefstore.events": {0}, "beliefstore.events.dlq": {0},
                    "beliefstore.access": {0}}
            finally:
                consumer.close()
    finally:
        code = up.stop(sig)
    assert code == 0, up.text()
    assert "stopped" in "".join(up.out)
    assert "Traceback" not in up.text(), up.text()
    assert survivors(started, up.home) == []
    assert not (up.home / "services.json").exists()


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except httpx.HTTPError:
            result = None
        if result:
            return result
        assert time.monotonic() < deadline, f"not {what} within {timeout} s"
        time.sleep(0.2)


def test_up_restarts_a_dead_broker_and_postgres_and_reconnects(tmp_path):
    up = Up(tmp_path)
    try:
        assert post(up.url, "calm").status_code == 201
        broker = up.child("tansu")
        broker_port = {c.laddr.port for c in broker.net_connections("tcp")
                       if c.status == psutil.CONN_LISTEN}
        broker.kill()
        up.wait_for("restarted Kafka broker", timeout=60)
        assert "Kafka broker (tansu) on port" in up.text() and "is down; restarting it" in up.text()
        # the dead broker was reaped (no <defunct> child), the new one listens on the same port
        children = psutil.Process(up.proc.pid).children()
        assert all(c.status() != psutil.STATUS_ZOMBIE for c in children), children
        new_broker = up.child("tansu")
        assert new_broker.pid != broker.pid
        assert {c.laddr.port for c in new_broker.net_connections("tcp")
                if c.status == psutil.CONN_LISTEN} == broker_port
        # the API's producer reconnects by itself
        wait_until(lambda: post(up.url, "content", 10).status_code == 201, 60, "POST 201")

        postmaster = int((up.home / "postgres" / "postmaster.pid").read_text().split()[0])
        os.kill(postmaster, signal.SIGKILL)
        up.wait_for("restarted PostgreSQL", timeout=90)
        # reads and the projector reconnect: the last POST becomes visible
        wait_until(lambda: post(up.url, "relieved", 10).status_code == 201, 60, "POST 201")

        def relieved() -> bool:
            r = httpx.get(f"{up.url}/v1/subjects/user-up/self-model", timeout=10)
            return r.status_code == 200 and "relieved" in r.text

        wait_until(relieved, 60, "projected after the PostgreSQL restart")
        ready = httpx.get(f"{up.url}/readyz", timeout=5)
        assert ready.status_code == 200, ready.text
        started = up.processes()
    finally:
        code = up.stop()
    assert code == 0, up.text()
    assert survivors(started, up.home) == []


def test_up_gives_up_on_a_broker_that_keeps_failing(tmp_path):
    up = Up(tmp_path)
    try:
        broker = up.child("tansu")
        [port] = {c.laddr.port for c in broker.net_connections("tcp")
                  if c.status == psutil.CONN_LISTEN}
        started = up.processes()
        broker.kill()
        broker.wait(10)
        # Something else takes the broker's port: every restart fails.
        squatter = socket.socket()
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        try:
            code = up.proc.wait(120)
        finally:
            squatter.close()
    finally:
        up.stop()
    assert code == 1, up.text()
    err = " ".join("".join(up.err).split())
    assert "Kafka broker (tansu) on port" in err and "giving up" in err, err
    assert str(up.home / "kafka" / "tansu.log") in err.replace(" ", "") or "tansu.log" in err, err
    assert "Traceback" not in up.text()
    assert survivors(started, up.home) == []
