"""Replay: how long ``beliefstore.projector.replay.replay`` takes to rebuild from the log.

    .venv/bin/python bench/replay.py [--quick] [--events N] [--runs N]

The workload is produced once; a projection catalog is created in a fresh base schema
(``ProjectionCatalog.ensure()``, whose live projection stays empty). Each run calls
``replay(settings, catalog, "r<N>", check_fold=False)``, which registers a new
projection, migrates its schema and folds the whole topic into it from offset 0 with
a ``ProjectorWorker`` until it has caught up. The figure is the report's ``seconds``
(the rebuild, not the comparison with the live projection that follows) and
events/s. After each run the rebuilt beliefs are checked against the pure fold here
(outside the clock), and the projection is dropped.
"""

from __future__ import annotations

import sys
from typing import Any

import common
import projector_throughput

from beliefstore.projector.catalog import ProjectionCatalog
from beliefstore.projector.replay import replay

NAME = "replay"
TITLE = "time to rebuild the read model from the log (replay)"


def params(quick: bool) -> dict[str, Any]:
    # One 1M-event rebuild takes ~11 minutes here (the projector slows down as the hot
    # subjects' histories grow), so 3 runs would take ~33 min: the full size is the
    # largest that fits in ~15 minutes.
    return {"events": 20_000 if quick else 500_000, "runs": 3}


def run(ctx: common.Context, *, events: int, runs: int) -> dict[str, Any]:
    key = common.workload_key(events)
    produced = ctx.produced(key)
    expected = ctx.expected(key)
    base = ctx.name("rp")
    settings = ctx.settings(topic=produced.topic, db_schema=base, poll_timeout_ms=100)
    catalog = ProjectionCatalog.from_settings(settings)
    results, failures = [], []
    try:
        catalog.ensure()
        for number in range(1, runs + 1):
            name = f"r{number}"
            with common.progress() as bar:
                task = bar.add_task(f"replay run {number}/{runs}", total=key.count)
                report = replay(settings, catalog, name, check_fold=False,
                                on_progress=lambda done, _total, t=task: bar.update(t, completed=done))
            info = catalog.get(name)
            problems = projector_throughput.compare(
                expected, projector_throughput.read_beliefs(catalog.engine(info.schema)))
            failures.extend(f"run {number}: {p}" for p in problems)
            messages = report.stats.events + report.stats.poison
            results.append({"run": number, "seconds": round(report.seconds, 3),
                            "events": messages, "batches": report.stats.batches,
                            "events_per_second": round(report.rate, 1),
                            "fold_check": "ok" if not problems else f"{len(problems)} differences"})
            common.console.print(f"  run {number}: {messages:,} events in {report.seconds:.1f} s"
                                 f" = {report.rate:,.0f} events/s (fold check "
                                 f"{results[-1]['fold_check']})")
            catalog.drop(name)
    finally:
        catalog.dispose()
        ctx.drop_schemas(*[catalog.schema_for(f"r{n}") for n in range(1, runs + 1)],
                         catalog.schema_for("self_model"), base)
    return {
        "workload": {**key.describe(), "beliefs": len(expected)},
        "runs": results,
        "median_seconds": common.median([r["seconds"] for r in results]),
        "median_events_per_second": common.median([r["events_per_second"] for r in results]),
        "fold_check": "ok" if not failures else "FAILED",
        "fold_differences": failures[:100],
        "failed": bool(failures),
    }


def summary(result: dict) -> list[str]:
    return [f"{result['workload']['events']:,} events: median {result['median_seconds']:.1f} s "
            f"= {result['median_events_per_second']:,.0f} events/s; fold check "
            f"{result['fold_check']}"]


if __name__ == "__main__":
    sys.exit(common.standalone(sys.modules[__name__]))
