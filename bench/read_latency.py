"""Read latency: p50/p99 of ``GET /v1/subjects/{id}/self-model`` with many beliefs stored.

    .venv/bin/python bench/read_latency.py [--quick] [--subjects N] [--runs N]

1. Creates a projection catalog in a fresh base schema (``ProjectionCatalog.ensure()``)
   and fills the active projection's ``beliefs`` table directly with ``COPY``: N subjects
   × 10 attributes in 5 contexts (full: 100,000 × 10 = 1M beliefs), each with one or two
   alternatives, two supporting event ids and sources, plus one ``observations`` row
   per subject (so every subject exists); then ``ANALYZE``.
2. Serves the API as a subprocess, ``beliefstore api`` (one uvicorn process, as
   deployed), and warms it up.
3. For 1 and 50 concurrent clients (``httpx.AsyncClient``, keep-alive), sends
   ``requests`` GETs of the self-model of uniformly random subjects, timing each
   request; every answer must be 200 with 10 beliefs. A connection error is counted, recorded and
   retried (up to twice; the retry's time is inside the request's latency).
4. The same read straight from PostgreSQL with psycopg 3 (``SELECT * FROM beliefs
   WHERE subject_id = %s ORDER BY context, attribute``, prepared), 1 and 50
   connections.

Each figure is the median over ``runs`` runs of that run's p50 / p99. The client runs
on the same 2 cores as the API and PostgreSQL, so at 50 clients its own CPU time is in
the figures too.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import common
import httpx
import psycopg

from beliefstore.projector.catalog import ProjectionCatalog

NAME = "read_latency"
TITLE = "p50/p99 of GET self-model with 1M beliefs stored (API and direct SQL)"

KEYS = [("support", "emotional_state"), ("support", "issue"), ("support", "expertise_level"),
        ("billing", "plan_status"), ("billing", "payment_method"),
        ("purchase_motivation", "primary_driver"), ("communication", "preference"),
        ("preferences", "language"), ("preferences", "contact_time"),
        ("preferences", "channel")]
VALUES = ["calm", "frustrated", "angry", "relieved", "high", "low", "medium"]
SOURCES = ["triage_agent", "billing_agent", "sales_agent", "sentiment_agent"]
TRANSPORT_ERRORS: list[str] = []
"""Connection errors seen by the API clients (each request is retried up to twice)."""


def params(quick: bool) -> dict[str, Any]:
    return {"subjects": 10_000 if quick else 100_000, "requests": 1_000 if quick else 2_000,
            "concurrency": [1, 50], "runs": 3}


def fill(conninfo: str, schema: str, subjects: int) -> float:
    """COPY ``subjects`` × 10 beliefs and one observation per subject; return seconds."""
    rng = random.Random(1)
    now = datetime.now(UTC)
    started = time.perf_counter()
    with psycopg.connect(conninfo, options=f"-csearch_path={schema}") as conn:
        with conn.cursor() as cur, cur.copy(
                "COPY beliefs (subject_id, context, attribute, value, confidence, score, "
                "alternatives, support, sources, source_count, last_observed_at, updated_at) "
                "FROM STDIN") as copy, common.progress() as bar:
            task = bar.add_task("COPY beliefs", total=subjects * len(KEYS))
            for i in range(subjects):
                subject = f"subject-{i:06d}"
                for context, attribute in KEYS:
                    value, alt = rng.sample(VALUES, 2)
                    confidence = round(rng.uniform(0.5, 0.99), 6)
                    sources = rng.sample(SOURCES, 2)
                    copy.write_row((
                        subject, context, attribute, value, confidence, 1.5,
                        json.dumps({alt: round(1 - confidence, 6)}),
                        json.dumps([str(uuid.UUID(int=rng.getrandbits(128), version=4))
                                    for _ in range(2)]),
                        json.dumps(sorted(sources)), 2, now, now))
                if i % 1000 == 999:
                    bar.advance(task, 1000 * len(KEYS))
        with conn.cursor() as cur, cur.copy(
                "COPY observations (event_id, subject_id, context, attribute, value, confidence, "
                "source, occurred_at, kafka_topic, kafka_partition, kafka_offset, "
                "writer_fingerprint) FROM STDIN") as copy:
            for i in range(subjects):
                copy.write_row((str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                                f"subject-{i:06d}", "support", "emotional_state", "calm", 0.8,
                                "triage_agent", now, "bench", i % 4, i // 4, "0" * 16))
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE beliefs")
        conn.execute("VACUUM ANALYZE observations")
    return time.perf_counter() - started


async def _drive(concurrency: int, requests: int, subjects: int, call) -> tuple[list[float], float]:
    """Run ``requests`` calls of ``call(subject)`` from ``concurrency`` workers."""
    rng = random.Random(concurrency)
    todo = iter([f"subject-{rng.randrange(subjects):06d}" for _ in range(requests)])
    latencies: list[float] = []

    async def worker(index: int) -> None:
        for subject in todo:
            t0 = time.perf_counter()
            await call(index, subject)
            latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return latencies, time.perf_counter() - started


async def api_run(base_url: str, headers: dict[str, str], concurrency: int, requests: int,
                  subjects: int):
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits,
                                 timeout=30) as client:
        async def call(_index: int, subject: str) -> None:
            for attempt in range(3):
                try:
                    r = await client.get(f"/v1/subjects/{subject}/self-model")
                    break
                except httpx.TransportError as exc:  # counted; retried, its time included
                    TRANSPORT_ERRORS.append(f"{type(exc).__name__}: {exc}")
                    if attempt == 2:
                        raise
            if r.status_code != 200 or r.json()["belief_count"] != len(KEYS):
                raise RuntimeError(f"GET self-model of {subject}: {r.status_code} {r.text[:200]}")

        return await _drive(concurrency, requests, subjects, call)


async def sql_run(conninfo: str, schema: str, concurrency: int, requests: int, subjects: int):
    conns = [await psycopg.AsyncConnection.connect(conninfo, autocommit=True,
                                                   options=f"-csearch_path={schema}")
             for _ in range(concurrency)]
    try:
        async def call(index: int, subject: str) -> None:
            cur = await conns[index].execute(
                "SELECT * FROM beliefs WHERE subject_id = %s ORDER BY context, attribute",
                (subject,), prepare=True)
            if len(await cur.fetchall()) != len(KEYS):
                raise RuntimeError(f"SELECT beliefs of {subject}: wrong row count")

        return await _drive(concurrency, requests, subjects, call)
    finally:
        for c in conns:
            await c.close()


def _stats(latencies: list[float], seconds: float) -> dict[str, float]:
    return {"p50_ms": round(common.percentile(latencies, 50) * 1000, 3),
            "p99_ms": round(common.percentile(latencies, 99) * 1000, 3),
            "max_ms": round(max(latencies) * 1000, 3),
            "requests_per_second": round(len(latencies) / seconds, 1)}


def _measure(label: str, runs: int, once) -> dict[str, Any]:
    results = []
    for number in range(1, runs + 1):
        TRANSPORT_ERRORS.clear()
        latencies, seconds = asyncio.run(once())
        results.append({"run": number, **_stats(latencies, seconds),
                        "transport_errors": len(TRANSPORT_ERRORS),
                        "transport_error_examples": sorted(set(TRANSPORT_ERRORS))[:3]})
    out = {"runs": results,
           "median_p50_ms": common.median([r["p50_ms"] for r in results]),
           "median_p99_ms": common.median([r["p99_ms"] for r in results]),
           "median_requests_per_second": common.median(
               [r["requests_per_second"] for r in results])}
    errors = sum(r["transport_errors"] for r in results)
    common.console.print(f"  {label}: p50 {out['median_p50_ms']:.2f} ms, p99 "
                         f"{out['median_p99_ms']:.2f} ms, {out['median_requests_per_second']:,.0f}"
                         " req/s" + (f"; {errors} connection errors (retried)" if errors else ""))
    return out


def run(ctx: common.Context, *, subjects: int, requests: int, concurrency: list[int],
        runs: int) -> dict[str, Any]:
    base = ctx.name("rl")
    settings = ctx.settings(db_schema=base)
    catalog = ProjectionCatalog.from_settings(settings)
    conninfo = common.psycopg_conninfo(ctx.database_url)
    home = Path(tempfile.mkdtemp(prefix="bench-read-"))
    log = home / "api.log"
    out: dict[str, Any] = {"beliefs": subjects * len(KEYS), "subjects": subjects,
                           "requests_per_run": requests}
    try:
        catalog.ensure()
        schema = catalog.active().schema
        out["fill_seconds"] = round(fill(conninfo, schema, subjects), 1)
        common.console.print(f"  filled {subjects * len(KEYS):,} beliefs in "
                             f"{out['fill_seconds']:.0f} s")
        port = common.free_port()
        with common.cli_process(["api", "--host", "127.0.0.1", "--port", str(port)],
                                ctx.cli_env(settings, home), log) as proc:
            url = f"http://127.0.0.1:{port}"
            common.wait_http(f"{url}/healthz", proc, log)
            headers = common.api_headers(catalog)
            asyncio.run(api_run(url, headers, 10, 500, subjects))  # warm-up
            for c in concurrency:
                out[f"api_{c}"] = _measure(
                    f"API, {c} client(s)", runs,
                    lambda c=c, url=url: api_run(url, headers, c, requests, subjects))
        asyncio.run(sql_run(conninfo, schema, 10, 500, subjects))  # warm-up
        for c in concurrency:
            out[f"sql_{c}"] = _measure(
                f"SQL, {c} connection(s)", runs,
                lambda c=c, schema=schema: sql_run(conninfo, schema, c, requests, subjects))
    finally:
        catalog.dispose()
        ctx.drop_schemas(catalog.schema_for("self_model"), base)
    top = max(concurrency)
    out["target_p99_ms"] = 10.0
    out["target_met"] = out[f"api_{top}"]["median_p99_ms"] <= 10.0
    return out


def summary(result: dict) -> list[str]:
    lines = []
    for key, value in result.items():
        if key.startswith(("api_", "sql_")) and isinstance(value, dict):
            kind, c = key.split("_")
            lines.append(f"{result['beliefs']:,} beliefs, {'GET self-model' if kind == 'api' else 'SQL'}"
                         f", {c} client(s): p50 {value['median_p50_ms']:.2f} ms, p99 "
                         f"{value['median_p99_ms']:.2f} ms")
    lines.append(f"target p99 ≤ 10 ms at the highest concurrency: "
                 f"{'met' if result['target_met'] else 'missed'}")
    return lines


if __name__ == "__main__":
    sys.exit(common.standalone(sys.modules[__name__]))
