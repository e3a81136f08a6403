"""Memory: the projector process's peak RSS as it folds 100k and then 1M events.

    .venv/bin/python bench/memory.py [--quick] [--events N] [--runs N]

The workload is produced once. Each run starts ``beliefstore projector
--until-caught-up`` as a subprocess (env KAFKA_BOOTSTRAP_SERVERS, DATABASE_URL,
BELIEFSTORE_TOPIC, BELIEFSTORE_DB_SCHEMA of a fresh base schema) and samples its
resident set size with psutil every 0.2 s, and its progress (the sum of the stored
partition offsets) every second, until it exits. Reported: the peak RSS while the
first ``mark`` events (100k) were being projected, the peak over the whole run
(1M), the RSS at every tenth of the way, and whether it stays flat (the peak over the
whole run at most 20 % above the peak at the mark).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import psutil
import sqlalchemy as sa

from beliefstore.db import make_engine

NAME = "memory"
TITLE = "peak RSS of the projector process at 100k and 1M events"
FLAT = 1.20
"""Largest peak(full) / peak(mark) still called flat."""


def params(quick: bool) -> dict[str, Any]:
    if quick:
        return {"events": 20_000, "mark": 2_000, "runs": 1}
    return {"events": 1_000_000, "mark": 100_000, "runs": 1}


def one_run(ctx: common.Context, topic: str, total: int, mark: int, label: str) -> dict[str, Any]:
    base = ctx.name("mem")
    settings = ctx.settings(topic=topic, db_schema=base)
    home = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    log = home / "projector.log"
    engine = make_engine(ctx.database_url, f"{base}_self_model")
    samples: list[tuple[float, int, int]] = []  # (seconds, projected, rss bytes)
    try:
        with common.cli_process(["projector", "--until-caught-up"],
                                ctx.cli_env(settings, home), log) as proc, \
                common.progress() as bar:
            task = bar.add_task(label, total=total)
            ps = psutil.Process(proc.pid)
            started = time.perf_counter()
            projected, last_progress = 0, 0.0
            while proc.poll() is None:
                try:
                    rss = ps.memory_info().rss
                except psutil.Error:
                    break
                now = time.perf_counter()
                if now - last_progress >= 1.0:
                    projected = _projected(engine, topic)
                    last_progress = now
                    bar.update(task, completed=projected)
                samples.append((now - started, projected, rss))
                time.sleep(0.2)
            seconds = time.perf_counter() - started
            if proc.wait() != 0:
                raise RuntimeError(f"the projector exited with {proc.returncode}:\n"
                                   + log.read_text(errors="replace")[-3000:])
        projected = _projected(engine, topic)
    finally:
        engine.dispose()
        ctx.drop_schemas(f"{base}_self_model", base)
    if projected != total:
        raise RuntimeError(f"the projector stopped at {projected} of {total} events")
    # samples taken before the progress reached the mark belong to the first `mark` events
    at_mark = [rss for _, done, rss in samples if done <= mark] or [samples[0][2]]
    peak_mark, peak_all = max(at_mark), max(rss for *_, rss in samples)
    curve = []
    for tenth in range(1, 11):
        goal = total * tenth // 10
        reached = [rss for _, done, rss in samples if done <= goal]
        at = next((t for t, done, _ in samples if done >= goal), seconds)
        curve.append({"events": goal, "peak_rss_mb": round(max(reached or [0]) / 2**20, 1),
                      "seconds": round(at, 1)})
    return {
        "seconds": round(seconds, 1),
        "events_per_second": round(total / seconds, 1),
        "samples": len(samples),
        "peak_rss_mb_at_mark": round(peak_mark / 2**20, 1),
        "peak_rss_mb": round(peak_all / 2**20, 1),
        "growth": round(peak_all / peak_mark, 3),
        "curve": curve,
    }


def _projected(engine: sa.Engine, topic: str) -> int:
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text(
                "SELECT coalesce(sum(next_offset), 0) FROM projection_offsets WHERE topic = :t"),
                {"t": topic}).scalar_one())
    except sa.exc.SQLAlchemyError:
        return 0


def run(ctx: common.Context, *, events: int, mark: int, runs: int) -> dict[str, Any]:
    key = common.workload_key(events)
    produced = ctx.produced(key)
    results = []
    for number in range(1, runs + 1):
        r = one_run(ctx, produced.topic, events, mark, f"projector run {number}/{runs}")
        results.append({"run": number, **r})
        common.console.print(f"  run {number}: peak RSS {r['peak_rss_mb_at_mark']:.0f} MB at "
                             f"{mark:,} events, {r['peak_rss_mb']:.0f} MB at {events:,} "
                             f"({r['seconds']:.0f} s)")
    peak_mark = common.median([r["peak_rss_mb_at_mark"] for r in results])
    peak_all = common.median([r["peak_rss_mb"] for r in results])
    flat = peak_all <= FLAT * peak_mark
    return {
        "workload": key.describe(),
        "mark": mark,
        "runs": results,
        "median_peak_rss_mb_at_mark": peak_mark,
        "median_peak_rss_mb": peak_all,
        "flat": flat,
        "target_mb": 300,
        "target_met": peak_all <= 300 and flat,
    }


def summary(result: dict) -> list[str]:
    return [f"peak RSS {result['median_peak_rss_mb_at_mark']:.0f} MB at {result['mark']:,} "
            f"events, {result['median_peak_rss_mb']:.0f} MB at "
            f"{result['workload']['events']:,} ({'flat' if result['flat'] else 'GROWING'}; "
            f"target ≤ 300 MB and flat: {'met' if result['target_met'] else 'missed'})"]


if __name__ == "__main__":
    sys.exit(common.standalone(sys.modules[__name__]))
