"""The live read path: caches invalidated by PostgreSQL NOTIFY (keys, restricted contexts,
the active projection, self-models), several API processes, and a database that goes
away (503 with Retry-After within 1 s).
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from beliefstore.access.keys import split_token
from beliefstore.api.live import LiveReads
from beliefstore.embedded import free_port
from beliefstore.projector.changes import NOTIFY_LIMIT, notify_payload, parse_payload
from beliefstore.projector.replay import replay
from beliefstore.runtime.serve import ApiServer
from tests.conftest import wait_caught_up

BELIEFSTORE = Path(sys.executable).parent / "beliefstore"
T0 = 1767225600000


def live_of(server: ApiServer) -> LiveReads:
    return server.app.state.beliefstore.live


def wait_listening(*servers: ApiServer, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(live_of(s).listening for s in servers):
        assert time.monotonic() < deadline, "the API did not LISTEN"
        time.sleep(0.02)


def within(seconds: float, check: Callable[[], bool]) -> float:
    """Poll ``check`` until true; fail after ``seconds``; return the time it took."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < seconds, f"not within {seconds} s"
        time.sleep(0.005)
    return time.monotonic() - started


@pytest.fixture
def two_apis(settings, engine) -> Iterator[tuple[ApiServer, ApiServer]]:
    """Two API servers on the same database, each with its own caches and LISTEN connection
    (as two API processes have)."""
    a = ApiServer(settings, "127.0.0.1", free_port()).start_in_thread()
    b = ApiServer(settings, "127.0.0.1", free_port()).start_in_thread()
    wait_listening(a, b)
    yield a, b
    a.stop()
    b.stop()


def test_notify_payload_round_trip_and_size_limit():
    payload = notify_payload("t_x_self_model", 42, ["u-2", "u-1"])
    assert parse_payload(payload) == ("t_x_self_model", 42, frozenset({"u-1", "u-2"}))
    many = [f"subject-{i:05d}-{'x' * 40}" for i in range(500)]
    big = notify_payload("s", 7, many)
    assert len(big.encode()) <= NOTIFY_LIMIT
    assert parse_payload(big) == ("s", 7, None)  # too many to list: every subject changed


def test_revoked_key_is_refused_within_a_second_on_every_api_process(
        two_apis, settings, make_key, tmp_path):
    token = make_key("roaming_bot", read="*", write="*")
    key_id = split_token(token)[0]
    headers = {"Authorization": f"Bearer {token}"}
    for server in two_apis:
        assert httpx.get(f"{server.url}/v1/whoami", headers=headers).status_code == 200
        assert key_id in live_of(server)._keys  # verified once, now answered from memory
    env = {**os.environ, "DATABASE_URL": settings.database_url or "",
           "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers or "",
           "BELIEFSTORE_DB_SCHEMA": settings.db_schema, "BELIEFSTORE_HOME": str(tmp_path)}
    done = subprocess.run([str(BELIEFSTORE), "keys", "revoke", key_id], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for server in two_apis:
        took = within(1.0, lambda s=server: httpx.get(
            f"{s.url}/v1/whoami", headers=headers).status_code == 401)
        assert took < 1.0
        refused = httpx.get(f"{server.url}/v1/whoami", headers=headers)
        assert refused.status_code == 401 and "revoked" in refused.json()["detail"]


def test_a_new_key_and_a_restriction_reach_every_process(two_apis, key_store, make_key,
                                                         producer, projector, settings):
    token = make_key("star_bot", read="*", write="*")
    headers = {"Authorization": f"Bearer {token}"}
    receipts = [producer.observe("user-r", c, "a", "v", 0.8, source="triage_agent",
                                 occurred_at=T0) for c in ("support", "secret")]
    wait_caught_up(settings, receipts)
    for server in two_apis:
        body = httpx.get(f"{server.url}/v1/subjects/user-r/self-model", headers=headers).json()
        assert set(body["contexts"]) == {"support", "secret"}
    assert key_store.restrict("secret")
    for server in two_apis:
        within(1.0, lambda s=server: set(httpx.get(
            f"{s.url}/v1/subjects/user-r/self-model", headers=headers).json()["contexts"])
            == {"support"})


def test_a_read_after_the_commit_sees_the_new_belief_and_never_the_old(
        two_apis, settings, api_key, producer, projector):
    headers = {"Authorization": f"Bearer {api_key}"}
    first = producer.observe("user-c", "support", "issue", "refund", 0.7,
                             source="triage_agent", occurred_at=T0)
    wait_caught_up(settings, [first])
    for server in two_apis:
        body = httpx.get(f"{server.url}/v1/subjects/user-c/self-model", headers=headers).json()
        assert body["contexts"]["support"][0]["value"] == "refund"
        hits = live_of(server).stats["hits"]
        httpx.get(f"{server.url}/v1/subjects/user-c/self-model", headers=headers)
        assert live_of(server).stats["hits"] == hits + 1  # served from memory
    # The same source changes its mind: its latest observation replaces the earlier one.
    second = producer.observe("user-c", "support", "issue", "fraud", 0.9,
                              source="triage_agent", occurred_at=T0 + 1000)
    wait_caught_up(settings, [second])  # the batch committed: NOTIFY is on its way
    for server in two_apis:
        url = f"{server.url}/v1/subjects/user-c/self-model"
        within(1.0, lambda u=url: httpx.get(u, headers=headers).json()[
            "contexts"]["support"][0]["value"] == "fraud")
        for _ in range(20):  # once visible, the old answer never comes back
            body = httpx.get(url, headers=headers).json()
            assert body["contexts"]["support"][0]["value"] == "fraud"
            beliefs = httpx.get(f"{server.url}/v1/subjects/user-c/beliefs",
                                headers=headers).json()["beliefs"]
            assert [b["value"] for b in beliefs] == ["fraud"]


def test_replay_switch_reaches_the_cached_self_models(two_apis, settings, catalog, api_key,
                                                      producer):
    headers = {"Authorization": f"Bearer {api_key}"}
    receipts = [producer.observe("user-s", "support", "mood", v, c, source=src, occurred_at=T0)
                for v, c, src in (("calm", 0.8, "triage_agent"), ("angry", 0.7, "sentiment_agent"))]
    from beliefstore.runtime.serve import ProjectorThread

    projector = ProjectorThread(settings)
    projector.start()
    try:
        wait_caught_up(settings, receipts)
    finally:
        projector.stop()
    before = {}
    for server in two_apis:
        body = httpx.get(f"{server.url}/v1/subjects/user-s/self-model", headers=headers).json()
        before[server.url] = body["contexts"]["support"][0]
        assert before[server.url]["value"] == "calm"
    # Rebuild with the sentiment agent trusted far more, and switch: the answer changes.
    trusted = replace(settings, trust={"sentiment_agent": 5.0})
    report = replay(trusted, catalog, "trusted", switch=True)
    assert report.switched
    for server in two_apis:
        url = f"{server.url}/v1/subjects/user-s/self-model"
        within(1.0, lambda u=url: httpx.get(u, headers=headers).json()[
            "contexts"]["support"][0]["value"] == "angry")


def test_api_workers_serve_and_hear_revocations(settings, engine, make_key, tmp_path):
    token = make_key("worker_bot", read="*", write="*")
    headers = {"Authorization": f"Bearer {token}"}
    port = free_port()
    env = {**os.environ, "DATABASE_URL": settings.database_url or "",
           "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers or "",
           "BELIEFSTORE_DB_SCHEMA": settings.db_schema, "BELIEFSTORE_HOME": str(tmp_path),
           "BELIEFSTORE_TOPIC": settings.topic, "BELIEFSTORE_RATE_LIMIT": "0"}
    proc = subprocess.Popen([str(BELIEFSTORE), "api", "--port", str(port), "--workers", "2"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        within(30.0, lambda: _answers(f"{url}/healthz"))
        for _ in range(40):
            me = httpx.get(f"{url}/v1/whoami", headers=headers)
            assert me.status_code == 200, me.text
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                  text=True).stdout.split()
        pids = {int(p) for p in children}
        assert len(pids) >= 2, children  # two worker processes (and a resource tracker)
        time.sleep(0.5)
        revoked_at = time.monotonic()
        _revoke(settings, token)
        # Every worker refuses it within 1 s: many requests spread over both processes.
        within(1.0, lambda: all(httpx.get(f"{url}/v1/whoami", headers=headers).status_code
                                == 401 for _ in range(10)))
        assert time.monotonic() - revoked_at < 1.5
    finally:
        proc.terminate()
        proc.wait(30)
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def _revoke(settings, token: str) -> None:
    from beliefstore.access.keys import KeyStore
    from beliefstore.db import make_engine

    engine = make_engine(settings.database_url or "", settings.db_schema)
    try:
        KeyStore(engine, settings.db_schema).revoke(split_token(token)[0])
    finally:
        engine.dispose()


# -- the database goes away ---------------------------------------------------------------


class TcpProxy:
    """A loopback TCP proxy in front of PostgreSQL that can refuse or swallow traffic:
    ``cut()`` closes every connection and refuses new ones (the database is down),
    ``hang()`` keeps connections open but forwards nothing (the database hangs)."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.mode = "pass"
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(0.1)
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            if self.mode == "cut":
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            self.pairs.append((client, upstream))
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while not self._stop:
                ready, _, _ = select.select([a, b], [], [], 0.1)
                if self.mode == "cut":
                    break
                if self.mode == "hang":
                    continue
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.listener.close()


@pytest.mark.parametrize("fault", ["cut", "hang"])
def test_database_down_reads_answer_503_with_retry_after_within_a_second(
        fault, settings, engine, api_key, producer, projector):
    import sqlalchemy as sa

    url = sa.make_url(settings.database_url or "")
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432))
    proxied = replace(settings, database_url=url.set(host="127.0.0.1", port=proxy.port)
                      .render_as_string(hide_password=False))
    headers = {"Authorization": f"Bearer {api_key}"}
    receipt = producer.observe("user-d", "support", "issue", "refund", 0.8,
                               source="triage_agent", occurred_at=T0)
    wait_caught_up(settings, [receipt])
    server = ApiServer(proxied, "127.0.0.1", free_port()).start_in_thread()
    try:
        wait_listening(server)
        ok = httpx.get(f"{server.url}/v1/subjects/user-d/self-model", headers=headers)
        assert ok.status_code == 200
        proxy.mode = fault
        # A subject not cached yet needs the database: 503 within 1 s, never 500 or a hang.
        for subject in ("user-x", "user-y", "user-z"):
            started = time.monotonic()
            r = httpx.get(f"{server.url}/v1/subjects/{subject}/self-model", headers=headers,
                          timeout=5)
            took = time.monotonic() - started
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "1" and "database" in r.json()["detail"]
            assert took < 1.0, took
        # Once the LISTEN connection is seen dead, nothing is answered from the caches.
        within(5.0, lambda: not live_of(server).listening)
        r = httpx.get(f"{server.url}/v1/subjects/user-d/self-model", headers=headers, timeout=5)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        # The database comes back: reads recover by themselves.
        proxy.mode = "pass"
        within(10.0, lambda: httpx.get(f"{server.url}/v1/subjects/user-d/self-model",
                                       headers=headers, timeout=5).status_code == 200)
    finally:
        server.stop()
        proxy.close()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_up_stops_its_embedded_services_on_sigterm(tmp_path, workers):
    """SIGTERM to `up` (one API process, or a supervisor of two) stops the API and the
    embedded PostgreSQL and Kafka it started: nothing is left running."""
    import signal

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BELIEFSTORE_", "KAFKA_", "DATABASE_URL"))}
    env["BELIEFSTORE_HOME"] = str(tmp_path / ".beliefstore")
    port = free_port()
    proc = subprocess.Popen([str(BELIEFSTORE), "up", "--api-port", str(port), "--api-workers",
                             workers], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        within(90.0, lambda: _answers(f"http://127.0.0.1:{port}/healthz"))
        pidfile = tmp_path / ".beliefstore" / "postgres" / "postmaster.pid"
        postgres = int(pidfile.read_text().split()[0])
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, 128 + signal.SIGTERM, -signal.SIGTERM), proc.returncode
    within(10.0, lambda: not _alive(postgres))
    assert not _answers(f"http://127.0.0.1:{port}/healthz")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
