"""Replay: how long ``beliefstore.projector.replay.replay`` takes to rebuild from the log.

    .venv/bin/python bench/replay.py [--quick] [--events N] [--runs N]
        [--profiles realistic hot-key] [--storages memory durable]

For each broker storage and workload profile the workload is produced once; a
projection catalog is created in a fresh base schema (``ProjectionCatalog.ensure()``,
whose live projection stays empty). Each run calls ``replay(settings, catalog, "r<N>",
check_fold=False)``, which registers a new projection, migrates its schema and rebuilds
it from offset 0 with the bulk path (``ProjectorWorker.rebuild``: large polls, every
table loaded with ``COPY`` in one transaction). The figure is the report's ``seconds``
(the rebuild, not the comparison with the live projection that follows) and events/s,
with the seconds of each phase (``phases_s``), and its ratio to the storage's raw read
rate measured first in the same run (a bare kafka-python consumer reading the topic from
offset 0 without decoding; on durable storage for at most ``RAW_READ_MAX_S``, its rate
taken over that stretch). ``BENCH_REPLAY_WORKERS=0,auto`` alternates the runs between
a one-process rebuild and the default, for an A/B on the same topic.
After each run the rebuilt beliefs are checked against the pure fold here (outside the
clock), and the projection is dropped.

Storages:

* ``memory``: the benchmarks' shared embedded broker (Tansu, ``memory://``), 4 partitions;
* ``durable``: a second embedded broker started here as ``beliefstore up`` starts it
  (Tansu with its log on disk through ``s3://`` on localbucket, in a temporary data
  folder; one partition and ``fetch_max_wait_ms=100``, as ``up`` sets them), stopped at
  the end. The workload is written to it as a bulk loader writes (:data:`LOG_WRITES`,
  ``BENCH_REPLAY_LOG_WRITES=default`` for kafka-python's 16 KB record batches), and the
  results name how and how many objects it stored.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import common
import projector_throughput

from beliefstore.embedded import EmbeddedKafka
from beliefstore.events.topics import ensure_topics
from beliefstore.projector.catalog import ProjectionCatalog
from beliefstore.projector.replay import replay

NAME = "replay"
TITLE = "time to rebuild the read model from the log (replay)"


def params(quick: bool) -> dict[str, Any]:
    return {"events": 20_000 if quick else 1_000_000, "runs": 1 if not quick else 3,
            "profiles": ["realistic"], "storages": ["memory", "durable"]}


def run(ctx: common.Context, *, events: int, runs: int, profiles: list[str],
        storages: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"storages": {}}
    for storage in storages:
        out["storages"][storage] = {}
        for profile in profiles:
            key = common.workload_key(events, profile=profile)
            with contextlib.ExitStack() as stack:
                settings = _source(ctx, key, storage, stack)
                out["storages"][storage][profile] = _measure(ctx, key, settings, runs,
                                                             f"{storage}/{profile}")
    out["failed"] = any(r["failed"] for s in out["storages"].values() for r in s.values())
    return out


def _source(ctx: common.Context, key: common.WorkloadKey, storage: str,
            stack: contextlib.ExitStack):
    """Settings on a topic holding the workload of ``key`` on ``storage``."""
    base = ctx.name("rp")
    if storage == "memory":
        produced = ctx.produced(key)
        return ctx.settings(topic=produced.topic, db_schema=base, poll_timeout_ms=100)
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-durable-")))
    kafka = stack.enter_context(EmbeddedKafka(tmp / "kafka"))
    topic = f"bench.{ctx.suffix}.durable.{key.count}.{key.profile}"
    ensure_topics(kafka.bootstrap_servers, {topic: 1, f"{topic}.dlq": 1})
    # written as a bulk loader writes (BULK_LOAD: one record batch per send_many of
    # PRODUCE_CHUNK events, cut at each erasure), not in 16 KB batches: see LOG_WRITES
    kafka_config = common.BULK_LOAD if LOG_WRITES == "bulk" else {}
    seconds = common.produce(kafka.bootstrap_servers, topic, ctx.events(key),
                             PRODUCE_CHUNK if LOG_WRITES == "bulk" else 1000, **kafka_config)
    objects = sum(1 for p in (tmp / "kafka").rglob("*") if p.is_file() and topic in str(p)
                  and ".dlq" not in str(p))
    common.console.print(f"  produced {key.count:,} events to the durable broker in "
                         f"{seconds:.1f} s ({key.count / seconds:,.0f} events/s; {LOG_WRITES} "
                         f"writes, {objects:,} stored objects under the topic)")
    DURABLE_LOG[topic] = {"writes": LOG_WRITES, "produce_seconds": round(seconds, 3),
                          "stored_objects": objects}
    settings = ctx.settings(topic=topic, db_schema=base, poll_timeout_ms=100,
                            fetch_max_wait_ms=100)  # as `up` sets it since 2026-11-27
    return replace(settings, kafka_bootstrap_servers=kafka.bootstrap_servers, partitions=1)


def _measure(ctx: common.Context, key: common.WorkloadKey, settings, runs: int,
             label: str) -> dict[str, Any]:
    expected = ctx.expected(key)
    catalog = ProjectionCatalog.from_settings(settings)
    results, failures = [], []
    # BENCH_REPLAY_WORKERS=0,auto alternates the runs between a one-process rebuild and
    # the default (worker processes on a large log): an A/B on the same topic, back to back
    modes = [None if m.strip() == "auto" else int(m)
             for m in os.environ.get("BENCH_REPLAY_WORKERS", "auto").split(",")]
    # The limit on this storage, in the same run: a bare kafka-python consumer reading
    # the topic from offset 0 without decoding (the replay's poll size and fetch wait).
    # On durable storage at most RAW_READ_MAX_S of it (the rate over that stretch), so a
    # 1M run stays within the 15-minute bound of an invocation.
    raw_count, raw_seconds = raw_read(settings, key.count,
                                      RAW_READ_MAX_S if "durable" in label else None)
    raw_s = raw_seconds * key.count / raw_count  # the whole log at that rate
    common.console.print(f"  {label}: raw read of the log (no decoding) {raw_count:,} events "
                         f"in {raw_seconds:.1f} s = {key.count / raw_s:,.0f} events/s")
    try:
        catalog.ensure()
        for number in range(1, runs + 1):
            name = f"r{number}"
            with common.progress() as bar:
                task = bar.add_task(f"{label} replay run {number}/{runs}", total=key.count)
                workers = modes[(number - 1) % len(modes)]
                report = replay(settings, catalog, name, check_fold=False, workers=workers,
                                on_progress=lambda done, _total, t=task: bar.update(t, completed=done))
            info = catalog.get(name)
            problems = projector_throughput.compare(
                expected, projector_throughput.read_beliefs(catalog.engine(info.schema)))
            failures.extend(f"run {number}: {p}" for p in problems)
            messages = report.stats.events + report.stats.poison
            results.append({"run": number, "workers": "auto" if workers is None else workers,
                            "seconds": round(report.seconds, 3),
                            "events": messages, "batches": report.stats.batches,
                            "events_per_second": round(report.rate, 1),
                            "phases_s": {k: round(v, 3) for k, v in report.phases.items()},
                            "fold_check": "ok" if not problems else f"{len(problems)} differences"})
            common.console.print(f"  {label} run {number}: {messages:,} events in "
                                 f"{report.seconds:.1f} s = {report.rate:,.0f} events/s (fold "
                                 f"check {results[-1]['fold_check']})")
            catalog.drop(name)
    finally:
        catalog.dispose()
        ctx.drop_schemas(*[catalog.schema_for(f"r{n}") for n in range(1, runs + 1)],
                         catalog.schema_for("self_model"), settings.db_schema)
    return {
        "workload": {**key.describe(), "beliefs": len(expected)},
        "topic": {"partitions": settings.partitions,
                  "fetch_max_wait_ms": settings.fetch_max_wait_ms,
                  **DURABLE_LOG.get(settings.topic, {})},
        "runs": results,
        "median_seconds": common.median([r["seconds"] for r in results]),
        "median_events_per_second": common.median([r["events_per_second"] for r in results]),
        "target_events_per_second": 25_000,
        "raw_read": {"events": raw_count, "seconds": round(raw_seconds, 3),
                     "events_per_second": round(key.count / raw_s, 1)},
        "replay_over_raw_read": round(
            common.median([r["events_per_second"] for r in results]) * raw_s / key.count, 3),
        "fold_check": "ok" if not failures else "FAILED",
        "fold_differences": failures[:100],
        "failed": bool(failures),
    }


PRODUCE_CHUNK = 5000
"""Events per ``send_many`` when the durable log is written in bulk (~650 KB at the
realistic profile's ~125 bytes an event: one record batch under ``BULK_LOAD``'s 1 MiB)."""

LOG_WRITES = os.environ.get("BENCH_REPLAY_LOG_WRITES", "bulk")
"""How the durable log is written: ``bulk`` (:data:`common.BULK_LOAD`, chunks of
:data:`PRODUCE_CHUNK`) or ``default`` (the producer's own settings, chunks of 1,000:
record batches of kafka-python's default 16 KB, as before 2026-11-27 05:00)."""

DURABLE_LOG: dict[str, dict[str, Any]] = {}
"""Topic → how its durable log was written (for the results)."""

RAW_READ_MAX_S = 90.0
"""Longest raw read of the durable log, seconds (its rate is taken over that stretch)."""


def raw_read(settings, expected: int, max_s: float | None) -> tuple[int, float]:
    """A bare kafka-python consumer reads the topic from offset 0 without decoding (the
    replay's poll size and fetch wait), to the end or for at most ``max_s`` seconds:
    ``(messages read, seconds)``."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers,
                             group_id=None, enable_auto_commit=False,
                             auto_offset_reset="earliest", max_poll_records=20_000,
                             fetch_max_wait_ms=settings.fetch_max_wait_ms or 100)
    try:
        tps = [TopicPartition(settings.topic, p)
               for p in sorted(consumer.partitions_for_topic(settings.topic) or ())]
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, 0)
        seen, started = 0, time.perf_counter()
        idle_since = time.monotonic()
        while seen < expected:
            if max_s is not None and time.perf_counter() - started > max_s:
                break
            polled = consumer.poll(timeout_ms=100, max_records=20_000)
            seen += sum(len(r) for r in polled.values())
            if polled:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > 300:
                raise TimeoutError(f"read {seen} of {expected} messages of {settings.topic}")
        return seen, time.perf_counter() - started
    finally:
        consumer.close()


def by_storage(result: dict) -> dict[str, dict]:
    """``storage/profile`` → that part of a result (older results: one memory part)."""
    if "storages" not in result:
        return {"memory/hot-key": result}
    return {f"{s}/{p}": r for s, parts in result["storages"].items() for p, r in parts.items()}


def summary(result: dict) -> list[str]:
    return [f"{label}: {r['workload']['events']:,} events: median {r['median_seconds']:.1f} s "
            f"= {r['median_events_per_second']:,.0f} events/s (target ≥ 25,000)"
            + (f", {r['replay_over_raw_read']:.0%} of the raw read's "
               f"{r['raw_read']['events_per_second']:,.0f} events/s" if "raw_read" in r else "")
            + f"; fold check {r['fold_check']}" for label, r in by_storage(result).items()]


if __name__ == "__main__":
    sys.exit(common.standalone(sys.modules[__name__]))
