"""Freshness: how long from an agent's produce call until the API shows the observation.

    .venv/bin/python bench/freshness.py [--quick] [--seconds N] [--runs N]

Each run makes a fresh topic and base schema and starts, as subprocesses,
``beliefstore projector`` and ``beliefstore api`` (with an API key; the per-key rate
limit off so the poller is not throttled). Once a first probe is visible, the SDK
(``BeliefProducer.send_many``, default producer settings) produces at a steady
``rate`` events/s for ``seconds`` seconds: a chunk of ``chunk`` events every
``chunk / rate`` seconds, from ``beliefstore.events.workload.generate``. Every
``probe_every``-th event is a *probe*: an observation about a subject of its own
(``probe-<uuid>``), so its first appearance is easy to see. A poller (asyncio + httpx in
another thread) asks ``GET /v1/subjects/<probe>/self-model`` of every pending probe
every ``poll_ms`` ms; a probe's freshness is the time from the start of the
``send_many`` call that carried it to the arrival of the first 200 answer. The
resolution is therefore about ``poll_ms`` plus one request.

Reported per run: p50/p99/max freshness (ms), the achieved produce rate, the polling
request rate, and probes never seen within 30 s after the end; then the medians over
the runs of p50 and p99.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import common
import httpx

from beliefstore.events import workload as workload_module
from beliefstore.events.model import Event, ObservationRecorded
from beliefstore.events.producer import BeliefProducer
from beliefstore.projector.catalog import ProjectionCatalog
from beliefstore.timefmt import now_millis

NAME = "freshness"
TITLE = "produce call → visible in GET self-model, at a steady 1,000 events/s"


def params(quick: bool) -> dict[str, Any]:
    return {"seconds": 15 if quick else 60, "rate": 1000, "chunk": 20, "probe_every": 100,
            "poll_ms": 25, "runs": 3}


def probe() -> ObservationRecorded:
    return ObservationRecorded(
        event_id=str(uuid.uuid4()), subject_id=f"probe-{uuid.uuid4().hex}",
        source="triage_agent", occurred_at=now_millis(), context="support",
        attribute="emotional_state", value="calm", confidence=0.9)


class Poller(threading.Thread):
    """Polls the self-model of every pending probe every ``poll_ms`` ms."""

    def __init__(self, base_url: str, headers: dict[str, str], poll_ms: int):
        super().__init__(name="poller", daemon=True)
        self.base_url, self.headers, self.poll_s = base_url, headers, poll_ms / 1000
        self.pending: dict[str, float] = {}
        self.seen: dict[str, float] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.requests = 0
        self.errors: list[str] = []

    def add(self, subject: str, started: float) -> None:
        with self.lock:
            self.pending[subject] = started

    def run(self) -> None:
        asyncio.run(self._loop())

    async def _loop(self) -> None:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=self.base_url, headers=self.headers,
                                     limits=limits, timeout=10) as client:
            async def check(subject: str, started: float) -> None:
                try:
                    r = await client.get(f"/v1/subjects/{subject}/self-model")
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))
                    return
                arrived = time.perf_counter()
                self.requests += 1
                if r.status_code == 200:
                    with self.lock:
                        if self.pending.pop(subject, None) is not None:
                            self.seen[subject] = arrived - started
                elif r.status_code != 404:
                    self.errors.append(f"{r.status_code} {r.text[:200]}")

            while not self.stop.is_set():
                tick = time.perf_counter()
                with self.lock:
                    batch = list(self.pending.items())
                if batch:
                    await asyncio.gather(*(check(s, t) for s, t in batch))
                await asyncio.sleep(max(0.0, self.poll_s - (time.perf_counter() - tick)))


def one_run(ctx: common.Context, number: int, *, seconds: int, rate: int, chunk: int,
            probe_every: int, poll_ms: int) -> dict[str, Any]:
    topic = ctx.new_topic(f"fresh{number}")
    base = ctx.name("fr")
    settings = ctx.settings(topic=topic, db_schema=base)
    catalog = ProjectionCatalog.from_settings(settings)
    home = Path(tempfile.mkdtemp(prefix="bench-fresh-"))
    total = seconds * rate
    background: list[Event] = workload_module.generate(total, seed=100 + number)
    try:
        catalog.ensure()
        headers = common.api_headers(catalog)
        env = ctx.cli_env(settings, home)
        port = common.free_port()
        with common.cli_process(["projector"], env, home / "projector.log") as projector, \
                common.cli_process(["api", "--host", "127.0.0.1", "--port", str(port)], env,
                                   home / "api.log") as api, \
                BeliefProducer(ctx.bootstrap, topic, timeout_s=30) as producer:
            url = f"http://127.0.0.1:{port}"
            common.wait_http(f"{url}/healthz", api, home / "api.log")
            poller = Poller(url, headers, poll_ms)
            poller.start()
            # warm-up: the projector has started and the whole path works
            first = probe()
            t0 = time.perf_counter()
            producer.send_many([first])
            poller.add(first.subject_id, t0)
            deadline = time.monotonic() + 90
            while first.subject_id not in poller.seen:
                if projector.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the first probe did not become visible; poller errors: "
                        f"{poller.errors[:3]}; projector log:\n"
                        + (home / "projector.log").read_text()[-3000:])
                time.sleep(0.05)
            poller.seen.clear()
            requests_before = poller.requests

            probes: list[str] = []
            interval = chunk / rate
            started = time.perf_counter()
            behind = 0
            for i in range(0, total, chunk):
                due = started + (i // chunk) * interval
                now = time.perf_counter()
                if now < due:
                    time.sleep(due - now)
                elif now - due > interval:
                    behind += 1
                part = list(background[i:i + chunk])
                carried = []
                for j in range(len(part)):
                    if (i + j) % probe_every == probe_every - 1:
                        part[j] = probe()
                        carried.append(part[j].subject_id)
                call = time.perf_counter()
                producer.send_many(part)
                for subject in carried:
                    poller.add(subject, call)
                probes.extend(carried)
            produce_seconds = time.perf_counter() - started
            poll_seconds = time.perf_counter() - started
            deadline = time.monotonic() + 30
            while poller.pending and time.monotonic() < deadline:
                time.sleep(0.1)
            poller.stop.set()
            poller.join(10)
            if projector.poll() is not None:
                raise RuntimeError("the projector exited:\n"
                                   + (home / "projector.log").read_text()[-3000:])
    finally:
        catalog.dispose()
        ctx.drop_schemas(catalog.schema_for("self_model"), base)
    latencies = [poller.seen[s] for s in probes if s in poller.seen]
    if not latencies:
        raise RuntimeError(f"no probe became visible; poller errors: {poller.errors[:5]}")
    return {
        "produced": total,
        "produce_seconds": round(produce_seconds, 2),
        "achieved_events_per_second": round(total / produce_seconds, 1),
        "chunks_late": behind,
        "probes": len(probes),
        "probes_seen": len(latencies),
        "probes_missing": len(probes) - len(latencies),
        "poll_requests_per_second": round((poller.requests - requests_before) / poll_seconds, 1),
        "poll_errors": poller.errors[:10],
        "p50_ms": round(common.percentile(latencies, 50) * 1000, 1),
        "p99_ms": round(common.percentile(latencies, 99) * 1000, 1),
        "max_ms": round(max(latencies) * 1000, 1),
    }


def run(ctx: common.Context, *, seconds: int, rate: int, chunk: int, probe_every: int,
        poll_ms: int, runs: int) -> dict[str, Any]:
    results = []
    for number in range(1, runs + 1):
        r = one_run(ctx, number, seconds=seconds, rate=rate, chunk=chunk,
                    probe_every=probe_every, poll_ms=poll_ms)
        results.append({"run": number, **r})
        common.console.print(
            f"  run {number}: {r['achieved_events_per_second']:,.0f} events/s for "
            f"{r['produce_seconds']:.0f} s; {r['probes_seen']}/{r['probes']} probes: p50 "
            f"{r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, max {r['max_ms']:.0f} ms "
            f"(polling {r['poll_requests_per_second']:.0f} req/s)")
    p99 = common.median([r["p99_ms"] for r in results])
    return {
        "runs": results,
        "median_p50_ms": common.median([r["p50_ms"] for r in results]),
        "median_p99_ms": p99,
        "median_achieved_events_per_second": common.median(
            [r["achieved_events_per_second"] for r in results]),
        "target_p99_ms": 500,
        "target_met": p99 <= 500 and all(r["probes_missing"] == 0 for r in results),
    }


def summary(result: dict) -> list[str]:
    missing = sum(r["probes_missing"] for r in result["runs"])
    return [f"at {result['median_achieved_events_per_second']:,.0f} events/s: p50 "
            f"{result['median_p50_ms']:.0f} ms, p99 {result['median_p99_ms']:.0f} ms"
            f"{f', {missing} probes never seen' if missing else ''} (target p99 ≤ 500 ms: "
            f"{'met' if result['target_met'] else 'missed'})"]


if __name__ == "__main__":
    sys.exit(common.standalone(sys.modules[__name__]))
