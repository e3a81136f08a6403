"""The ceiling: the raw limit of the projector's two ends, measured on the same workload.

    .venv/bin/python bench/raw_upsert_limit.py [--quick] [--events N] [--runs N]
        [--profiles realistic hot-key]

For each workload profile, two raw rates, each the median of ``runs``:

* **raw Kafka consume**: a kafka-python ``KafkaConsumer`` assigned to every partition of
  the workload's topic (the one projector_throughput projects), seeked to offset 0 and
  polled (``max_poll_records`` = the projector's batch size, the projector's
  ``fetch_max_wait_ms``) until every message has come back; no decoding, nothing else.
* **raw PostgreSQL COPY + upsert**: the workload's deliveries cut into batches of the
  projector's batch size (500) in produce order; for each batch, in one transaction on
  one psycopg 3 connection:

  1. ``COPY`` its observation rows (with made-up Kafka coordinates) into a temporary
     staging table (``ON COMMIT DELETE ROWS``);
  2. ``INSERT INTO observations … SELECT … FROM staging ON CONFLICT (event_id) DO NOTHING``;
  3. ``INSERT INTO beliefs … SELECT DISTINCT ON (key) … ORDER BY key, occurred_at DESC
     ON CONFLICT (key) DO UPDATE`` — one row per key with the value and confidence of the
     newest observation: no fold, no alternatives, no retractions or erasures;
  4. upsert one ``projection_offsets`` row per partition, as the projector does;

  and it commits as the projector's batch transactions do, without waiting for the WAL
  flush (``SET LOCAL synchronous_commit TO off``). Until 2026-11-27 (stop 22) it waited for
  it (one fsync a batch) while the projector did not: a lower, noisier limit (it followed
  the disk's fsync latency: 19,252 and 30,303 events/s in two runs at the same load).

  The tables are the real read model (a freshly migrated schema, same columns and
  indexes). Rows are built in memory before the clock starts, so this measures the
  database work only. events/s counts every delivery of the batch (retractions and
  erasures are dropped for free), so this ceiling is, if anything, a little generous.

The **raw limit** is ``min(raw consume, raw COPY + upsert)``: the projector can go no faster
than either end. The ratio is projector / limit, with the projector's 1-worker median
from projector_throughput on the same profile, size and batch size (same run of
bench/run.py, or the newest results file of that size).

Two more figures, beside the limit (since 2026-11-27, fifth stop):

* **the same writes** (``same_writes``): the raw COPY + upsert again, with every table the
  projection writes per batch and as many rows: also the newest observation per
  (key, source) upserted into ``belief_sources`` and one ``belief_changes`` row per key
  with its NOTIFY (:data:`CEILINGS`). Still no fold, no read-back, no marks, no decoding:
  the projector's ratio to it is the share its own work (Python, reads, marks) leaves.
  It is not issue 11's limit and does not decide the target.
* **the CPU budget** (``cpu_budget``): the wall time a batch may take at half the limit,
  against the CPU the projector's batch needed (from projector_throughput's
  ``cpu_ms_per_batch``: PostgreSQL server, broker, worker process), spread over every
  core, and against its own PostgreSQL backend's CPU, which runs the batch's statements
  in series. When either is above the allowance, no overlap of the projector's parts
  could meet the target on this machine.
"""

from __future__ import annotations

import os
import sys
import time
import zlib
from datetime import UTC, datetime
from typing import Any

import common
import psycopg
from kafka import KafkaConsumer, TopicPartition

from beliefstore.db import make_engine, migrate
from beliefstore.events.model import ObservationRecorded
from beliefstore.projector.bulk import ASYNCHRONOUS_COMMIT, SOURCE_COLUMNS, UPSERT_SOURCE
from beliefstore.settings import Settings

NAME = "raw_upsert_limit"
TITLE = "raw PostgreSQL COPY + upsert of the same rows (the ceiling)"

OBS_COLUMNS = ("event_id", "subject_id", "context", "attribute", "value", "confidence",
               "source", "occurred_at", "evidence", "kafka_topic", "kafka_partition",
               "kafka_offset", "recorded_at", "writer_fingerprint")


def params(quick: bool) -> dict[str, Any]:
    # the same size as projector_throughput, for the ratio
    return {"events": 20_000 if quick else 250_000, "runs": 3,
            "batch_size": Settings().batch_size, "profiles": ["realistic", "hot-key"]}


def consume_all(bootstrap: str, topic: str, expected: int, batch_size: int,
                fetch_max_wait_ms: int = 100, timeout_s: float = 120.0) -> float:
    """Read every message of ``topic`` from offset 0 with kafka-python, without decoding;
    return the seconds (from the first poll to the last message)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                             enable_auto_commit=False, auto_offset_reset="earliest",
                             max_poll_records=batch_size, fetch_max_wait_ms=fetch_max_wait_ms)
    try:
        parts = sorted(consumer.partitions_for_topic(topic) or ())
        tps = [TopicPartition(topic, p) for p in parts]
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, 0)
        seen = 0
        started = time.perf_counter()
        deadline = time.monotonic() + timeout_s
        while seen < expected:
            polled = consumer.poll(timeout_ms=100, max_records=batch_size)
            for records in polled.values():
                seen += len(records)
            if polled:
                deadline = time.monotonic() + timeout_s
            elif time.monotonic() > deadline:
                raise TimeoutError(f"read {seen} of {expected} messages of {topic}")
        return time.perf_counter() - started
    finally:
        consumer.close()


def prepare_batches(events, batch_size: int) -> list[tuple[list[tuple], dict[int, int]]]:
    """Each batch: its observation rows for COPY and partition → next offset."""
    batches = []
    offsets = [0] * common.PARTITIONS
    for i in range(0, len(events), batch_size):
        rows, progress = [], {}
        for e in events[i:i + batch_size]:
            partition = zlib.crc32(e.subject_id.encode()) % common.PARTITIONS
            offset = offsets[partition]
            offsets[partition] += 1
            progress[partition] = offset + 1
            if isinstance(e, ObservationRecorded):
                occurred = datetime.fromtimestamp(e.occurred_at / 1000, UTC)
                rows.append((e.event_id, e.subject_id, e.context, e.attribute, e.value,
                             e.confidence, e.source, occurred, e.evidence, "bench",
                             partition, offset, occurred, "0000000000000000"))
        batches.append((rows, progress))
    return batches


INSERT_OBSERVATIONS = (f"INSERT INTO observations ({', '.join(OBS_COLUMNS)}) "
                       f"SELECT {', '.join(OBS_COLUMNS)} FROM staging "
                       "ON CONFLICT (event_id) DO NOTHING")
UPSERT_NEWEST_BELIEFS = (
    "INSERT INTO beliefs (subject_id, context, attribute, value, confidence, "
    "score, alternatives, support, sources, source_count, last_observed_at) "
    "SELECT DISTINCT ON (subject_id, context, attribute) subject_id, context, "
    "attribute, value, confidence, 0, '{}'::jsonb, "
    "jsonb_build_array(event_id), jsonb_build_array(source), 1, occurred_at "
    "FROM staging ORDER BY subject_id, context, attribute, occurred_at DESC "
    "ON CONFLICT (subject_id, context, attribute) DO UPDATE SET "
    "value = excluded.value, confidence = excluded.confidence, "
    "support = excluded.support, sources = excluded.sources, "
    "last_observed_at = excluded.last_observed_at, updated_at = now() "
    "WHERE beliefs.last_observed_at <= excluded.last_observed_at")
UPSERT_NEWEST_SOURCES = (
    f"INSERT INTO belief_sources ({', '.join(SOURCE_COLUMNS)}) "
    f"SELECT DISTINCT ON (subject_id, context, attribute, source) "
    f"{', '.join(SOURCE_COLUMNS)} FROM staging "
    "ORDER BY subject_id, context, attribute, source, occurred_at DESC, event_id DESC "
    f"{UPSERT_SOURCE}")
RECORD_CHANGES = (
    "WITH added AS (INSERT INTO belief_changes (subject_id, context, attribute, value, "
    "confidence, alternatives, sources, kafka_partition, kafka_offset) "
    "SELECT DISTINCT ON (subject_id, context, attribute) subject_id, context, attribute, "
    "value, confidence, '{}'::jsonb, jsonb_build_array(source), kafka_partition, "
    "kafka_offset FROM staging ORDER BY subject_id, context, attribute, occurred_at DESC "
    "RETURNING id, subject_id) "
    "SELECT pg_notify('beliefstore_bench', max(id)::text) FROM added")

CEILINGS: dict[str, tuple[str, ...]] = {
    "limit": (INSERT_OBSERVATIONS, UPSERT_NEWEST_BELIEFS),
    "same_writes": (INSERT_OBSERVATIONS, UPSERT_NEWEST_SOURCES, UPSERT_NEWEST_BELIEFS,
                    RECORD_CHANGES),
}
"""The statements of a batch, after its ``COPY`` and before its offsets, for each ceiling:
``limit`` is issue 11's raw limit (the observations and one belief per key, the newest);
``same_writes`` writes every table the projection writes per batch, as many rows as it
does: also the newest observation per (key, source) into ``belief_sources`` and one
``belief_changes`` row per key with its NOTIFY. Neither folds, reads anything back,
marks retractions or erasures, or decodes."""


def upsert_all(conninfo: str, schema: str, batches,
               statements: tuple[str, ...] = CEILINGS["limit"]) -> float:
    """Apply every batch (one transaction each: ``COPY``, ``statements``, the offsets);
    return the seconds."""
    cols = ", ".join(OBS_COLUMNS)
    with psycopg.connect(conninfo, options=f"-csearch_path={schema}") as conn:
        conn.execute("CREATE TEMP TABLE staging (LIKE observations INCLUDING DEFAULTS) "
                     "ON COMMIT DELETE ROWS")
        conn.commit()
        started = time.perf_counter()
        with common.progress() as bar:
            task = bar.add_task("raw upserts", total=len(batches))
            for rows, progress in batches:
                with conn.transaction(), conn.cursor() as cur:
                    cur.execute(ASYNCHRONOUS_COMMIT)  # as the projector's batches commit
                    with cur.copy(f"COPY staging ({cols}) FROM STDIN") as copy:
                        for row in rows:
                            copy.write_row(row)
                    for statement in statements:
                        cur.execute(statement)
                    cur.executemany(
                        "INSERT INTO projection_offsets (projection, topic, partition, "
                        "next_offset, high_watermark) VALUES ('raw', 'bench', %s, %s, %s) "
                        "ON CONFLICT (projection, topic, partition) DO UPDATE SET "
                        "next_offset = excluded.next_offset, "
                        "high_watermark = excluded.high_watermark, updated_at = now()",
                        [(p, o, o) for p, o in sorted(progress.items())])
                bar.advance(task)
        return time.perf_counter() - started


def run(ctx: common.Context, *, events: int, runs: int, batch_size: int,
        profiles: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"profiles": {}, "target_ratio": 0.5}
    for profile in profiles:
        out["profiles"][profile] = _run_profile(ctx, common.workload_key(events, profile=profile),
                                                runs, batch_size)
    return out


def _run_profile(ctx: common.Context, key: common.WorkloadKey, runs: int,
                 batch_size: int) -> dict[str, Any]:
    workload = ctx.events(key)
    produced = ctx.produced(key)
    batches = prepare_batches(workload, batch_size)
    observations = sum(len(rows) for rows, _ in batches)
    conninfo = common.psycopg_conninfo(ctx.database_url)
    consume, results = [], []
    meter = ctx.server_cpu()
    for number in range(1, runs + 1):
        before, cpu = meter.read(), time.process_time()
        seconds = consume_all(ctx.bootstrap, produced.topic, len(workload), batch_size)
        consume.append({"run": number, "seconds": round(seconds, 3),
                        "events_per_second": round(len(workload) / seconds, 1),
                        "cpu_ms_per_batch": common.cpu_ms_per_batch(
                            before, meter.read(), len(batches),
                            client=time.process_time() - cpu)})
        common.console.print(f"  {key.profile} raw consume run {number}: {len(workload):,} "
                             f"messages in {seconds:.1f} s = {len(workload) / seconds:,.0f}/s")
    measured: dict[str, list[dict[str, Any]]] = {}
    for ceiling, statements in CEILINGS.items():
        measured[ceiling] = []
        for number in range(1, runs + 1):
            schema = ctx.name("raw")
            engine = make_engine(ctx.database_url, schema)
            try:
                migrate(engine, schema)
                engine.dispose()
                before, cpu = meter.read(), time.process_time()
                seconds = upsert_all(conninfo, schema, batches, statements)
                used = common.cpu_ms_per_batch(before, meter.read(), len(batches),
                                               client=time.process_time() - cpu)
            finally:
                engine.dispose()
                ctx.drop_schemas(schema)
            measured[ceiling].append({
                "run": number, "seconds": round(seconds, 3),
                "events_per_second": round(len(workload) / seconds, 1),
                "observation_rows_per_second": round(observations / seconds, 1),
                "cpu_ms_per_batch": used})
            common.console.print(
                f"  {key.profile} raw upsert ({ceiling}) run {number}: {len(workload):,} "
                f"events ({observations:,} observation rows) in {seconds:.1f} s "
                f"= {len(workload) / seconds:,.0f} events/s")
    results = measured["limit"]
    same_writes = common.median([r["events_per_second"] for r in measured["same_writes"]])
    pg = common.median([r["events_per_second"] for r in results])
    kafka = common.median([r["events_per_second"] for r in consume])
    limit = min(pg, kafka)
    projector = _projector_rate(ctx, key, batch_size)
    out: dict[str, Any] = {
        "workload": {**key.describe(), "observation_rows": observations,
                     "batches": len(batches)},
        "runs": results,
        "consume_runs": consume,
        "pg_events_per_second": pg,
        "consume_events_per_second": kafka,
        "median_events_per_second": limit,
        "limited_by": "PostgreSQL COPY + upsert" if pg <= kafka else "Kafka consume",
        "projector": projector,
        "target_ratio": 0.5,
    }
    if projector:
        ratio = projector["median_events_per_second"] / limit
        out["ratio_projector_over_limit"] = round(ratio, 3)
        out["target_met"] = ratio >= 0.5
        out["cpu_budget"] = cpu_budget(projector, limit, batch_size)
    # Not issue 11's limit: a second ceiling, the same writes as the projection's (see
    # CEILINGS), for the ratio of the projector's own overhead (its Python, its reads back).
    out["same_writes"] = {"runs": measured["same_writes"], "events_per_second": same_writes}
    if projector:
        out["same_writes"]["ratio_projector"] = round(
            projector["median_events_per_second"] / min(same_writes, kafka), 3)
    return out


def cpu_budget(projector: dict, limit: float, batch_size: int) -> dict[str, Any] | None:
    """What the 50 % target allows a batch, against the CPU the projector's batch needed.

    ``allowed_ms``: the wall time of a batch at half the limit. ``floor_all_cores_ms``: the
    projector run's CPU per batch (PostgreSQL server, broker, worker) spread over every core
    of the machine, the wall time a perfect overlap of all of them would take.
    ``floor_backend_ms``: the CPU per batch of the worker's own PostgreSQL backend, which
    runs a batch's statements one after another. Either floor above ``allowed_ms`` means no
    overlap of the worker's own work can meet the target on this machine."""
    cpu = projector.get("cpu_ms_per_batch")
    if not cpu:
        return None
    cores = os.cpu_count() or 1
    return {"allowed_ms": round(batch_size * 1000 / (0.5 * limit), 2),
            "cores": cores,
            "floor_all_cores_ms": round(cpu["total"] / cores, 2),
            "floor_backend_ms": cpu.get("postgres_backends"),
            "projector_cpu_ms_per_batch": cpu}


def _projector_rate(ctx: common.Context, key: common.WorkloadKey,
                    batch_size: int) -> dict | None:
    """projector_throughput's 1-worker median at the same workload and batch size, if
    measured."""
    def part(doc: dict) -> dict | None:
        if doc.get("params", {}).get("batch_size", batch_size) != batch_size:
            return None
        found = (doc.get("profiles") or {}).get(key.profile)
        if found is None and key.profile == "hot-key" and "profiles" not in doc:
            found = doc  # a result from before the profiles
        if not found:
            return None
        w = found.get("workload", {})
        ok = w.get("events") == key.count and w.get("seed") == key.seed and "workers_1" in found
        return found if ok else None

    doc = ctx.results.get("projector_throughput")
    source = "this run"
    if not doc or not part(doc):
        doc = common.latest_result("projector_throughput", where=lambda d: part(d) is not None)
        source = f"bench/results (finished {doc['finished']})" if doc else ""
    found = part(doc) if doc else None
    if not found:
        return None
    one = found["workers_1"]
    runs = sorted(one.get("runs", []), key=lambda r: r["events_per_second"])
    median_run = runs[len(runs) // 2] if runs else {}
    return {"median_events_per_second": one["median_events_per_second"],
            "cpu_ms_per_batch": median_run.get("cpu_ms_per_batch"),
            "source": source}


def summary(result: dict) -> list[str]:
    parts = result.get("profiles") or {"hot-key": result}
    lines = []
    for profile, r in parts.items():
        w = r["workload"]
        line = f"{profile}, {w['events']:,} events: limit {r['median_events_per_second']:,.0f} events/s"
        if "consume_events_per_second" in r:
            line += (f" = min(raw consume {r['consume_events_per_second']:,.0f}, raw COPY+upsert "
                     f"{r['pg_events_per_second']:,.0f})")
        if "ratio_projector_over_limit" in r:
            line += (f"; projector {r['projector']['median_events_per_second']:,.0f} events/s "
                     f"= {r['ratio_projector_over_limit']:.1%} of the limit (target ≥ 50%: "
                     f"{'met' if r['target_met'] else 'missed'})")
            writes = r.get("same_writes") or {}
            if "ratio_projector" in writes:
                line += (f"; against the same writes ({writes['events_per_second']:,.0f} "
                         f"events/s, not the issue's limit) {writes['ratio_projector']:.1%}")
            budget = r.get("cpu_budget")
            if budget:
                line += (f"; a batch may take {budget['allowed_ms']:.1f} ms, its CPU over "
                         f"{budget['cores']} cores takes ≥ {budget['floor_all_cores_ms']:.1f} ms, "
                         f"its PostgreSQL backend ≥ {budget['floor_backend_ms']} ms")
        else:
            line += "; no projector_throughput result at this size to compare"
        lines.append(line)
    return lines


if __name__ == "__main__":
    sys.exit(common.standalone(sys.modules[__name__]))
