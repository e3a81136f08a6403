"""HTTP ingest on the embedded default: N agents POST one observation per request.

    apt-get update && apt-get install -y wrk     # the C load generator
    .venv/bin/python bench/ingest_http.py [--quick] [--seconds N]

1. Starts ``beliefstore up`` as deployed (a subprocess in a fresh home: embedded Tansu
   with its log durable on localbucket, embedded PostgreSQL, projector, API with
   authentication on; the per-key rate limit is off so it does not throttle the load),
   and takes the admin key that ``up`` prints on a first start.
2. Runs ``wrk`` (``-c AGENTS`` connections, keep-alive, two threads) for ``seconds``
   seconds: each request is ``POST /v1/observations`` of one observation with a fresh
   deterministic event id and subject (Lua, ``bench/ingest_post.lua``); every 201's
   event id is written down by the Lua ``response`` hook.
3. Meanwhile a probe agent (httpx) posts one observation every ``probe_ms`` ms and polls
   ``GET /v1/subjects/{id}/self-model`` every 20 ms until it is visible: freshness
   = 201 → visible, p50/p99.
4. After wrk stops: the time until every accepted event id is in the read model's
   ``observations`` table (``lag_clear_s``, counted from the end of the load), and that
   none is missing.
5. The broker's raw limit in the same run: ``AGENTS`` threads of kafka-python each
   producing one record at a time (``acks="all"``, idempotent, the API's ``linger_ms``)
   to a fresh topic on the same broker for ``raw_seconds`` s: the one-record-per-request
   rate the broker itself sustains. The API's accepted req/s is reported as a ratio to it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import common
import httpx
import psycopg
from kafka import KafkaProducer

from beliefstore.events.topics import ensure_topics
from beliefstore.projector.catalog import ProjectionCatalog

NAME = "ingest_http"
TITLE = "HTTP ingest on `beliefstore up` (durable log): N agents, one observation per POST"
LUA = common.BENCH / "ingest_post.lua"


def params(quick: bool) -> dict[str, Any]:
    return {"agents": 20, "seconds": 15 if quick else 60, "probe_ms": 100,
            "raw_seconds": 5 if quick else 10, "partitions": None}


def _env(home: Path, port: int, partitions: int | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BELIEFSTORE_", "KAFKA_", "DATABASE_URL"))}
    env.update({"BELIEFSTORE_HOME": str(home / ".beliefstore"),
                "BELIEFSTORE_API_PORT": str(port), "BELIEFSTORE_RATE_LIMIT": "0",
                "PYTHONUNBUFFERED": "1"})
    if partitions is not None:  # else as `up` creates them (1 on its durable broker)
        env["BELIEFSTORE_PARTITIONS"] = str(partitions)
    # BENCH_UP_ENV: more settings for `up`, e.g. "BELIEFSTORE_IDEMPOTENT_PRODUCER=off"
    env.update(item.split("=", 1) for item in os.environ.get("BENCH_UP_ENV", "").split()
               if "=" in item)
    return env


@contextlib.contextmanager
def _up(home: Path, port: int, partitions: int | None) -> Any:
    """``beliefstore up`` in ``home``; yields (process, log path); stopped with SIGINT."""
    log = home / "up.log"
    with open(log, "ab") as out:
        # BENCH_UP_ARGS: more arguments for `up` (e.g. "--api-workers 1")
        up_args = os.environ.get("BENCH_UP_ARGS", "").split()
        proc = subprocess.Popen([*common.beliefstore_command(), "up", *up_args],
                                env=_env(home, port, partitions), cwd=home,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # up's own Ctrl-C path stops every service
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class Probe(threading.Thread):
    """Posts one observation every ``every_s`` and times 201 → visible in GET self-model."""

    def __init__(self, url: str, headers: dict[str, str], every_s: float) -> None:
        super().__init__(daemon=True)
        self.url, self.headers, self.every_s = url, headers, every_s
        self.stop = threading.Event()
        self.freshness: list[float] = []
        self.errors: list[str] = []

    def run(self) -> None:
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=10) as client:
            pending: list[tuple[str, float]] = []
            next_post = time.perf_counter()
            while not self.stop.is_set() or pending:
                now = time.perf_counter()
                if not self.stop.is_set() and now >= next_post:
                    next_post += self.every_s
                    subject = f"probe-{uuid.uuid4().hex[:12]}"
                    try:
                        r = client.post("/v1/observations", json=_observation(subject, "admin"))
                        if r.status_code == 201:
                            pending.append((subject, time.perf_counter()))
                        else:
                            self.errors.append(f"POST {r.status_code} {r.text[:200]}")
                    except httpx.HTTPError as exc:
                        self.errors.append(repr(exc))
                still = []
                for subject, t201 in pending:
                    try:
                        r = client.get(f"/v1/subjects/{subject}/self-model")
                    except httpx.HTTPError as exc:
                        self.errors.append(repr(exc))
                        still.append((subject, t201))
                        continue
                    if r.status_code == 200:
                        self.freshness.append(time.perf_counter() - t201)
                    elif time.perf_counter() - t201 > 120:
                        self.errors.append(f"probe {subject} not visible after 120 s")
                    else:
                        still.append((subject, t201))
                pending = still
                time.sleep(0.02)


def _observation(subject: str, source: str) -> dict[str, Any]:
    return {"subject_id": subject, "context": "support", "attribute": "emotional_state",
            "value": "calm", "confidence": 0.8, "source": source}


def _wrk(url: str, token: str, agents: int, seconds: int, out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:8]
    cmd = ["wrk", "-t", "2", "-c", str(agents), "-d", f"{seconds}s", "--latency",
           "-s", str(LUA), url, "--", token, str(out), run_id]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr}\n{done.stdout}")
    text = done.stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))  # type: ignore[union-attr]
    ids: list[str] = []
    errors: dict[str, int] = {}
    for path in out.glob("ids-*.txt"):
        for line in path.read_text().splitlines():
            if line.startswith("E"):
                errors[line[1:]] = errors.get(line[1:], 0) + 1
            elif line:
                ids.append(line)
    lat = {q: m.group(1) for q in ("50%", "99%")
           if (m := re.search(rf"\s{re.escape(q)}\s+(\S+)", text))}
    return {"wrk_requests_per_s": rps, "accepted": len(ids), "ids": ids,
            "non_201": errors, "wrk_latency": lat, "wrk_output": text}


def _missing(conninfo: str, schema: str, ids: list[str]) -> int:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        row = conn.execute(
            f'SELECT count(*) FROM "{schema}".observations WHERE event_id = ANY(%s::uuid[])',
            (ids,)).fetchone()
    return len(ids) - int(row[0]) if row else len(ids)


def _raw_produce(bootstrap: str, agents: int, seconds: int, partitions: int | None
                 ) -> dict[str, Any]:
    """``agents`` threads, each producing one record and waiting for its ack, in a loop."""
    topic = f"bench.rawproduce.{uuid.uuid4().hex[:6]}"
    ensure_topics(bootstrap, {topic: partitions or 1})
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True,
                             linger_ms=5)
    try:
        producer.send(topic, b"warm-up").get(30)
        counts = [0] * agents
        stop = time.perf_counter() + seconds

        def agent(i: int) -> None:
            n = 0
            while time.perf_counter() < stop:
                producer.send(topic, key=f"{i}-{n}".encode(), value=b"x" * 400).get(30)
                n += 1
            counts[i] = n

        threads = [threading.Thread(target=agent, args=(i,)) for i in range(agents)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return {"acks_per_s": round(sum(counts) / (time.perf_counter() - started), 1),
                "topic": topic}
    finally:
        producer.close()
        common.delete_topics(bootstrap, [topic])


def run(ctx: common.Context, *, agents: int, seconds: int, probe_ms: int,
        raw_seconds: int, partitions: int | None) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed: apt-get update && apt-get install -y wrk")
    home = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    port = common.free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        with _up(home, port, partitions) as (proc, log):
            common.wait_http(f"{url}/healthz", proc, log, timeout=120)
            state_file = home / ".beliefstore" / "services.json"
            for _ in range(600):  # `up` writes it just after its API answers
                if state_file.exists() and "BELIEFSTORE_API_KEY" in log.read_text():
                    break
                time.sleep(0.05)
            state = json.loads(state_file.read_text())
            m = re.search(r"BELIEFSTORE_API_KEY=(\S+)", log.read_text())
            if m is None:
                raise RuntimeError(f"up printed no admin key:\n{log.read_text()[-2000:]}")
            token = m.group(1)
            headers = {"Authorization": f"Bearer {token}"}
            schema = ProjectionCatalog(state["database_url"], "public").active().schema
            conninfo = common.psycopg_conninfo(state["database_url"])
            # warm-up: the whole path works end to end
            warm = Probe(url, headers, 0.05)
            warm.start()
            time.sleep(1.0)
            warm.stop.set()
            warm.join(120)
            if not warm.freshness:
                raise RuntimeError(f"warm-up probe never visible: {warm.errors[:3]}")

            probe = Probe(url, headers, probe_ms / 1000)
            probe.start()
            load = _wrk(url, token, agents, seconds, home / "wrk")
            ended = time.perf_counter()
            probe.stop.set()
            ids = load.pop("ids")
            missing = len(ids)
            while time.perf_counter() - ended < 300:
                missing = _missing(conninfo, schema, ids)
                if missing == 0:
                    break
                time.sleep(0.05)
            lag_clear_s = time.perf_counter() - ended
            probe.join(130)
            raw = _raw_produce(state["kafka_bootstrap_servers"], agents, raw_seconds, partitions)
            batch_objects = sum(1 for _ in (home / ".beliefstore" / "kafka").rglob("*.batch"))
        accepted_rps = load["accepted"] / seconds
        fresh = probe.freshness
        return {
            "accepted_per_s": round(accepted_rps, 1),
            "accepted": load["accepted"], "non_201": load["non_201"],
            "wrk_requests_per_s": load["wrk_requests_per_s"],
            "wrk_latency": load["wrk_latency"],
            "freshness_p50_s": round(common.percentile(fresh, 50), 3),
            "freshness_p99_s": round(common.percentile(fresh, 99), 3),
            "probes": len(fresh), "probe_errors": probe.errors[:5],
            "lag_clear_s": round(lag_clear_s, 2), "missing_201s": missing,
            "raw_produce_acks_per_s": raw["acks_per_s"],
            "ratio_to_raw": round(accepted_rps / raw["acks_per_s"], 3),
            "batch_objects_in_log": batch_objects,
            "storage": "embedded Tansu, s3:// on localbucket (durable), as `beliefstore up`",
            "failed": missing != 0 or bool(load["non_201"]),
        }
    finally:
        if os.environ.get("BENCH_KEEP_HOME"):
            common.console.print(f"kept {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)


def summary(r: dict[str, Any]) -> list[str]:
    return [
        f"{r['accepted_per_s']:,.0f} accepted req/s (every POST 201: {not r['non_201']}); "
        f"raw broker limit {r['raw_produce_acks_per_s']:,.0f} one-record acks/s "
        f"(ratio {r['ratio_to_raw']:.2f})",
        f"freshness 201 → visible p50 {r['freshness_p50_s']:.3f} s, p99 "
        f"{r['freshness_p99_s']:.3f} s ({r['probes']} probes)",
        f"lag back to 0 {r['lag_clear_s']:.2f} s after the last request; "
        f"{r['missing_201s']} accepted events missing from the read model",
    ]


if __name__ == "__main__":
    sys.exit(common.standalone(sys.modules[__name__]))
