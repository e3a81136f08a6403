"""The ceiling: raw PostgreSQL upserts of the same rows, no Kafka, no fold.

    .venv/bin/python bench/raw_upsert_limit.py [--quick] [--events N] [--runs N]

The workload's deliveries are cut into batches of the projector's batch size (500) in
produce order. For each batch, in one transaction on one psycopg 3 connection:

1. ``COPY`` its observation rows (with made-up Kafka coordinates) into a temporary
   staging table (``ON COMMIT DELETE ROWS``);
2. ``INSERT INTO observations … SELECT … FROM staging ON CONFLICT (event_id) DO NOTHING``;
3. ``INSERT INTO beliefs … SELECT DISTINCT ON (key) … ORDER BY key, occurred_at DESC
   ON CONFLICT (key) DO UPDATE`` — one row per key with the value and confidence of the
   newest observation: no fold, no alternatives, no retractions or erasures;
4. upsert one ``projection_offsets`` row per partition, as the projector does.

The tables are the real read model (a freshly migrated schema, same columns and
indexes). Rows are built in memory before the clock starts, so this measures the
database work only: the fastest the projector's writes could possibly go on this
server. events/s counts every delivery of the batch (retractions and erasures are
dropped for free), so the ceiling is, if anything, a little generous. The ratio is
projector / limit, with the projector's median from projector_throughput at the same
workload (same run of bench/run.py, or the newest results file of that size).
"""

from __future__ import annotations

import sys
import time
import zlib
from datetime import UTC, datetime
from typing import Any

import common
import psycopg

from beliefstore.db import make_engine, migrate
from beliefstore.events.model import ObservationRecorded
from beliefstore.settings import Settings

NAME = "raw_upsert_limit"
TITLE = "raw PostgreSQL COPY + upsert of the same rows (the ceiling)"

OBS_COLUMNS = ("event_id", "subject_id", "context", "attribute", "value", "confidence",
               "source", "occurred_at", "evidence", "kafka_topic", "kafka_partition",
               "kafka_offset", "recorded_at", "writer_fingerprint")


def params(quick: bool) -> dict[str, Any]:
    # the same size as projector_throughput, for the ratio
    return {"events": 20_000 if quick else 250_000, "runs": 3,
            "batch_size": Settings().batch_size}


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


def upsert_all(conninfo: str, schema: str, batches) -> float:
    """Apply every batch (one transaction each); return the seconds."""
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
                    with cur.copy(f"COPY staging ({cols}) FROM STDIN") as copy:
                        for row in rows:
                            copy.write_row(row)
                    cur.execute(f"INSERT INTO observations ({cols}) SELECT {cols} FROM staging "
                                "ON CONFLICT (event_id) DO NOTHING")
                    cur.execute(
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
                    cur.executemany(
                        "INSERT INTO projection_offsets (projection, topic, partition, "
                        "next_offset, high_watermark) VALUES ('raw', 'bench', %s, %s, %s) "
                        "ON CONFLICT (projection, topic, partition) DO UPDATE SET "
                        "next_offset = excluded.next_offset, "
                        "high_watermark = excluded.high_watermark, updated_at = now()",
                        [(p, o, o) for p, o in sorted(progress.items())])
                bar.advance(task)
        return time.perf_counter() - started


def run(ctx: common.Context, *, events: int, runs: int, batch_size: int) -> dict[str, Any]:
    key = common.workload_key(events)
    workload = ctx.events(key)
    batches = prepare_batches(workload, batch_size)
    observations = sum(len(rows) for rows, _ in batches)
    conninfo = common.psycopg_conninfo(ctx.database_url)
    results = []
    for number in range(1, runs + 1):
        schema = ctx.name("raw")
        engine = make_engine(ctx.database_url, schema)
        try:
            migrate(engine, schema)
            engine.dispose()
            seconds = upsert_all(conninfo, schema, batches)
        finally:
            engine.dispose()
            ctx.drop_schemas(schema)
        results.append({"run": number, "seconds": round(seconds, 3),
                        "events_per_second": round(len(workload) / seconds, 1),
                        "observation_rows_per_second": round(observations / seconds, 1)})
        common.console.print(f"  run {number}: {len(workload):,} events ({observations:,} "
                             f"observation rows) in {seconds:.1f} s = "
                             f"{len(workload) / seconds:,.0f} events/s")
    limit = common.median([r["events_per_second"] for r in results])
    projector = _projector_rate(ctx, key)
    out: dict[str, Any] = {
        "workload": {**key.describe(), "observation_rows": observations,
                     "batches": len(batches)},
        "runs": results,
        "median_events_per_second": limit,
        "projector": projector,
        "target_ratio": 0.5,
    }
    if projector:
        ratio = projector["median_events_per_second"] / limit
        out["ratio_projector_over_limit"] = round(ratio, 3)
        out["target_met"] = ratio >= 0.5
    return out


def _projector_rate(ctx: common.Context, key: common.WorkloadKey) -> dict | None:
    """projector_throughput's 1-worker median at the same workload, if measured."""
    def same(doc: dict) -> bool:
        return doc.get("workload", {}).get("events") == key.count and \
            doc.get("workload", {}).get("seed") == key.seed and "workers_1" in doc

    doc = ctx.results.get("projector_throughput")
    source = "this run"
    if not doc or not same(doc):
        doc = common.latest_result("projector_throughput", where=same)
        source = f"bench/results (finished {doc['finished']})" if doc else ""
    if not doc:
        return None
    return {"median_events_per_second": doc["workers_1"]["median_events_per_second"],
            "source": source}


def summary(result: dict) -> list[str]:
    w = result["workload"]
    line = (f"{w['events']:,} events: limit {result['median_events_per_second']:,.0f} events/s "
            f"(median of {len(result['runs'])})")
    if "ratio_projector_over_limit" in result:
        line += (f"; projector {result['projector']['median_events_per_second']:,.0f} events/s "
                 f"= {result['ratio_projector_over_limit']:.1%} of the limit (target ≥ 50%: "
                 f"{'met' if result['target_met'] else 'missed'})")
    else:
        line += "; no projector_throughput result at this size to compare"
    return [line]


if __name__ == "__main__":
    sys.exit(common.standalone(sys.modules[__name__]))
