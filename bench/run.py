"""Run beliefstore's benchmarks and write their results to bench/results/.

    .venv/bin/pip install -e ".[bench]"
    .venv/bin/python bench/run.py --quick                 # every benchmark, small sizes
    .venv/bin/python bench/run.py                         # full sizes (takes long)
    .venv/bin/python bench/run.py --only replay memory    # a subset

The benchmarks share one set of services (the embedded broker with memory storage and
embedded PostgreSQL with its durable defaults, unless KAFKA_BOOTSTRAP_SERVERS /
DATABASE_URL are set) and produce each workload to Kafka once. Each writes
``bench/results/<name>-<date>.json`` (``<name>-quick-<date>.json`` with ``--quick``)
with the machine (cores, memory, load, package versions), the PostgreSQL settings, its
parameters, every run and the medians. See bench/README.md.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback

import common

# projector_throughput runs before raw_upsert_limit (which divides by its result), and
# the two that measure the projector's speed run last, on the newest code.
BENCHMARKS = [
    "peer_eventsourcing",
    "memory",
    "read_latency",
    "freshness",
    "ingest_http",
    "durable_consume",
    "projector_throughput",
    "raw_upsert_limit",
    "replay",
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small sizes: every benchmark in a few minutes")
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, metavar="NAME",
                   help=f"run only these ({', '.join(BENCHMARKS)})")
    p.add_argument("--events", type=int, default=None,
                   help="override the event count of every selected benchmark that has one")
    p.add_argument("--runs", type=int, default=None,
                   help="override the number of runs of every selected benchmark")
    common.add_size_options(p)
    args = p.parse_args(argv)
    names = [n for n in BENCHMARKS if n in (args.only or BENCHMARKS)]
    modules = [importlib.import_module(n) for n in names]
    failed: list[str] = []
    started = time.perf_counter()
    with common.context(args.quick) as ctx:
        for module in modules:
            try:
                result = common.run_module(module, ctx, common.overrides(args))
                if result.get("failed"):
                    failed.append(module.NAME)
            except Exception:
                common.console.print(f"[bold red]{module.NAME} failed[/]\n{traceback.format_exc()}")
                failed.append(module.NAME)
    common.console.rule("summary")
    for module in modules:
        if module.NAME in ctx.results:
            for line in module.summary(ctx.results[module.NAME]):
                print(f"{module.NAME}: {line}")
    print(f"{len(modules) - len(failed)}/{len(modules)} benchmarks ok in "
          f"{time.perf_counter() - started:.0f} s" + (f"; failed: {', '.join(failed)}"
                                                       if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
