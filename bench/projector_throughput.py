"""Projector throughput: how fast ProjectorWorkers fold a full topic into the read model.

    .venv/bin/python bench/projector_throughput.py [--quick] [--events N] [--runs N]
        [--profiles realistic hot-key] [--workers 1 2-manual 2-group]

The workload is ``beliefstore.events.workload.generate(N, seed=7, subjects=N/10,
profile=P)`` (the generator the tests use) for each profile P (``realistic``: Zipf
subjects; ``hot-key``: Pareto subjects with one very hot subject), produced once to a
4-partition topic. For each run a fresh
PostgreSQL schema is migrated and the projector folds the topic from offset 0 until it
has caught up with the high watermark:

* **1 worker**: one ``ProjectorWorker`` owning all 4 partitions;
* **2 workers, manual assignment** (``2-manual``): two
  ``ProjectorWorker(settings, engine, partitions=[...])`` owning 2 partitions each;
* **2 workers, consumer group** (``2-group``): two ``ProjectorWorker(settings, engine,
  group=...)`` in one consumer group, which Kafka splits the partitions between (the
  group's join and rebalance are inside the clock, as they are in production).

Every worker runs in its own spawned process (multiprocessing, ``spawn``), all into the
same schema; the clock starts when every worker has started (assigned and seeked its
partitions, or subscribed to the group: a barrier) and stops when the last one has
caught up. After each run the ``beliefs`` table must equal the pure fold of the workload
(value, support, alternatives; confidence within 1e-9): a difference fails the run.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import queue
import sys
import time
import traceback
from typing import Any

import common
import psutil
import sqlalchemy as sa

from beliefstore.db import make_engine, migrate
from beliefstore.projector.fold import Belief
from beliefstore.projector.tables import beliefs as beliefs_table
from beliefstore.projector.tables import projection_offsets
from beliefstore.projector.worker import ProjectorWorker
from beliefstore.settings import Settings

NAME = "projector_throughput"
TITLE = "events/s of the projector folding a full topic (1 and 2 workers)"
TOLERANCE = 1e-9


def params(quick: bool) -> dict[str, Any]:
    return {
        # 9 projections (3 modes × 3 runs) of 1M events would take well over an hour
        # (one took 3-5 min per profile on 2026-11-26): the full size fits in ~15 minutes;
        # issue 11's 1M figures come from --events 1000000 --runs 1 --workers 1.
        "events": 20_000 if quick else 250_000,
        "runs": 3,
        "workers": ["1", "2-manual", "2-group"],
        "profiles": ["realistic", "hot-key"],
        "batch_size": Settings().batch_size,
        "poll_timeout_ms": 100,
    }


# -- one worker process -------------------------------------------------------------------


def _worker_process(settings: Settings, partitions: list[int] | None, group: str | None,
                    barrier, out) -> None:
    """Body of one spawned worker: start, wait for the others, run until caught up."""
    try:
        engine = make_engine(settings.database_url, settings.db_schema)
        if group:
            worker = ProjectorWorker(settings, engine, group=group)
        else:
            worker = ProjectorWorker(settings, engine, partitions=partitions)
        worker.start()
        with engine.connect() as conn:  # the pool's one connection, the apply's too
            backend = psutil.Process(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar())
        barrier.wait(timeout=120)
        started = time.time()
        cpu, backend_cpu = time.process_time(), sum(backend.cpu_times()[:2])
        stats = worker.run(until_caught_up=True)
        cpu, backend_cpu = time.process_time() - cpu, sum(backend.cpu_times()[:2]) - backend_cpu
        finished = time.time()
        worker.close()
        engine.dispose()
        def ms_per_batch(timings: dict[str, float]) -> dict[str, float]:
            return {phase: round(seconds * 1000 / max(stats.batches, 1), 2)
                    for phase, seconds in timings.items()}

        out.put({"partitions": partitions, "started": started, "finished": finished,
                 "events": stats.events, "poison": stats.poison, "batches": stats.batches,
                 "beliefs_recomputed": stats.beliefs_recomputed,
                 "apply_ms_per_batch": ms_per_batch(worker.recorder.timings),
                 "main_ms_per_batch": ms_per_batch(worker.timings),
                 "cpu_seconds": cpu, "backend_cpu_seconds": backend_cpu})
    except BaseException:  # reported to the parent
        out.put({"partitions": partitions, "error": traceback.format_exc()})
        barrier.abort()


def project(settings: Settings, mode: str, total: int, label: str) -> dict[str, Any]:
    """Run ProjectorWorker processes (``mode``: ``1``, ``N-manual`` or ``N-group``) over the
    topic; return timings and counters."""
    spawn = mp.get_context("spawn")
    workers = int(mode.split("-")[0])
    group = f"bench-{settings.db_schema}" if mode.endswith("-group") else None
    if workers == 1 or group:
        assignments: list[list[int] | None] = [None] * workers
    else:
        parts = list(range(common.PARTITIONS))
        assignments = [parts[i::workers] for i in range(workers)]
    barrier = spawn.Barrier(workers + 1)
    out = spawn.Queue()
    procs = [spawn.Process(target=_worker_process, args=(settings, a, group, barrier, out),
                           name=f"projector-{i}") for i, a in enumerate(assignments)]
    for p in procs:
        p.start()
    engine = make_engine(settings.database_url, settings.db_schema)
    reports: list[dict] = []
    meter = common.ServerCpu.of(settings.database_url, settings.kafka_bootstrap_servers or "")
    try:
        barrier.wait(timeout=180)
        go = time.time()
        servers_before = meter.read()
        with common.progress() as bar:
            task = bar.add_task(label, total=total)
            while len(reports) < workers:
                try:
                    reports.append(out.get(timeout=1.0))
                    continue
                except queue.Empty:
                    pass
                if all(not p.is_alive() for p in procs) and out.empty():
                    break
                bar.update(task, completed=_projected(engine, settings))
        servers_after = meter.read()
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.terminate()
        engine.dispose()
    errors = [r["error"] for r in reports if "error" in r]
    if errors or len(reports) < workers:
        raise RuntimeError("a projector worker failed:\n" + "\n".join(errors or ["(no report)"]))
    seconds = max(r["finished"] for r in reports) - go
    events = sum(r["events"] for r in reports)
    poison = sum(r["poison"] for r in reports)
    batches = sum(r["batches"] for r in reports)
    return {
        "seconds": round(seconds, 3),
        "events": events,
        "poison": poison,
        "batches": batches,
        "beliefs_recomputed": sum(r["beliefs_recomputed"] for r in reports),
        "events_per_second": round((events + poison) / seconds, 1),
        "per_worker_seconds": [round(r["finished"] - go, 3) for r in reports],
        # ProjectionRecorder.timings of each worker: ms per batch in each phase of apply
        # (its `paused` is the worker reading the next batch ahead meanwhile, whose poll
        # and decode also count in main_ms_per_batch)
        "apply_ms_per_batch": [r.get("apply_ms_per_batch", {}) for r in reports],
        # ProjectorWorker.timings: ms per batch polling, and decoding + dead-lettering
        "main_ms_per_batch": [r.get("main_ms_per_batch", {}) for r in reports],
        # CPU the run took, ms per batch: the PostgreSQL server (all its processes; the
        # workers' own backends alone as postgres_backends), the broker, the workers
        "cpu_ms_per_batch": {
            **common.cpu_ms_per_batch(servers_before, servers_after, batches,
                                      projector=sum(r["cpu_seconds"] for r in reports)),
            "postgres_backends": round(sum(r["backend_cpu_seconds"] for r in reports) * 1000
                                       / max(batches, 1), 2)},
        "cpu_cores_busy": round((sum(servers_after.values()) - sum(servers_before.values())
                                 + sum(r["cpu_seconds"] for r in reports)) / seconds, 2),
    }


def _projected(engine: sa.Engine, settings: Settings) -> int:
    p = projection_offsets
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(p.c.next_offset), 0))
                                    .where(p.c.topic == settings.topic)).scalar_one())
    except sa.exc.SQLAlchemyError:
        return 0


# -- the fold check -----------------------------------------------------------------------


def read_beliefs(engine: sa.Engine) -> dict[tuple[str, str, str], dict]:
    b = beliefs_table
    with engine.connect() as conn:
        rows = conn.execute(sa.select(b.c.subject_id, b.c.context, b.c.attribute, b.c.value,
                                      b.c.confidence, b.c.support, b.c.alternatives))
        return {(r.subject_id, r.context, r.attribute): r._asdict() for r in rows}


def compare(expected: list[Belief], stored: dict[tuple[str, str, str], dict]) -> list[str]:
    """Differences between the pure fold and a beliefs table ([] when equal)."""
    problems: list[str] = []
    want = {b.key: b for b in expected}
    for key in sorted(set(want) - set(stored)):
        problems.append(f"{key}: missing from the beliefs table (fold: {want[key].value!r})")
    for key in sorted(set(stored) - set(want)):
        problems.append(f"{key}: in the beliefs table ({stored[key]['value']!r}), not in the fold")
    for key in sorted(set(want) & set(stored)):
        b, row = want[key], stored[key]
        if row["value"] != b.value:
            problems.append(f"{key}: value {row['value']!r}, fold says {b.value!r}")
        if not math.isclose(row["confidence"], b.confidence, rel_tol=0, abs_tol=TOLERANCE):
            problems.append(f"{key}: confidence {row['confidence']!r}, fold says {b.confidence!r}")
        if row.get("support") is not None and tuple(sorted(row["support"])) != b.support:
            problems.append(f"{key}: support {sorted(row['support'])}, fold says {list(b.support)}")
        alts = row.get("alternatives") or {}
        if set(alts) != set(b.alternatives) or any(
            not math.isclose(alts[v], c, rel_tol=0, abs_tol=TOLERANCE)
            for v, c in b.alternatives.items()
        ):
            problems.append(f"{key}: alternatives {alts}, fold says {b.alternatives}")
    return problems


# -- the benchmark ------------------------------------------------------------------------


def measure(ctx: common.Context, key: common.WorkloadKey, mode: str, runs: int,
            batch_size: int, poll_timeout_ms: int) -> dict[str, Any]:
    """``runs`` projections of the workload's topic in ``mode``, fold-checked."""
    produced = ctx.produced(key)
    expected = ctx.expected(key)
    results, failures = [], []
    for number in range(1, runs + 1):
        schema = ctx.name("pt")
        engine = make_engine(ctx.database_url, schema)
        try:
            migrate(engine, schema)
            settings = ctx.settings(topic=produced.topic, db_schema=schema, projection="bench",
                                    batch_size=batch_size, poll_timeout_ms=poll_timeout_ms)
            result = project(settings, mode, key.count, f"{mode} worker(s), run {number}/{runs}")
            problems = compare(expected, read_beliefs(engine))
            if result["events"] + result["poison"] != key.count:
                problems.append(f"applied {result['events']} events and {result['poison']} "
                                f"poison, expected {key.count} messages")
            result["fold_check"] = "ok" if not problems else f"{len(problems)} differences"
            failures.extend(f"{mode} worker(s) run {number}: {p}" for p in problems)
            results.append({"run": number, **result})
            common.console.print(
                f"  {mode} worker(s) run {number}: {result['events']:,} events in "
                f"{result['seconds']:.1f} s = {result['events_per_second']:,.0f} events/s "
                f"({result['batches']} batches; fold check {result['fold_check']})")
        finally:
            engine.dispose()
            ctx.drop_schemas(schema)
    return {
        "runs": results,
        "median_events_per_second": common.median([r["events_per_second"] for r in results]),
        "median_seconds": common.median([r["seconds"] for r in results]),
        "fold_check": "ok" if not failures else "FAILED",
        "fold_differences": failures[:100],
        "produce": {"seconds": round(produced.seconds, 2),
                    "events_per_second": round(produced.events_per_second, 1)},
    }


def run(ctx: common.Context, *, events: int, runs: int, workers: list[str], batch_size: int,
        poll_timeout_ms: int, profiles: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"profiles": {}}
    for profile in profiles:
        key = common.workload_key(events, profile=profile)
        part: dict[str, Any] = {
            "workload": {**key.describe(), "partitions": common.PARTITIONS,
                         "kinds": common.event_counts(ctx.events(key)),
                         "beliefs": len(ctx.expected(key))},
        }
        for mode in workers:
            part[f"workers_{mode.replace('-', '_')}"] = measure(
                ctx, key, mode, runs, batch_size, poll_timeout_ms)
        out["profiles"][profile] = part
    out["failed"] = any(v["fold_check"] != "ok" for part in out["profiles"].values()
                        for k, v in part.items() if k.startswith("workers_"))
    return out


def by_profile(result: dict) -> dict[str, dict]:
    """profile → that profile's part of a result (results before the profiles existed
    hold one hot-key part at the top level)."""
    return result.get("profiles") or {"hot-key": result}


def summary(result: dict) -> list[str]:
    lines = []
    for profile, part in by_profile(result).items():
        lines.extend(f"{profile}: {line}" for line in _summary(part))
    return lines


def _summary(result: dict) -> list[str]:
    w = result["workload"]
    lines = []
    for key, value in result.items():
        if key.startswith("workers_"):
            rates = ", ".join(f"{r['events_per_second']:,.0f}" for r in value["runs"])
            mode = key.removeprefix("workers_").replace("_", " ")
            lines.append(f"{w['events']:,} events, {mode} worker(s): median "
                         f"{value['median_events_per_second']:,.0f} events/s (runs: {rates}); "
                         f"fold check {value['fold_check']}")
    return lines


if __name__ == "__main__":
    sys.exit(common.standalone(sys.modules[__name__]))
