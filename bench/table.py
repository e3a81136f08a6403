"""Print the results table of bench/README.md from the newest results files.

    .venv/bin/python bench/table.py            # full-size results
    .venv/bin/python bench/table.py --quick    # --quick results

Reads the newest ``bench/results/<name>-*.json`` of every benchmark and prints one
Markdown table: each figure with its size, the median, the target and whether it is
met (and by how much it is missed).
"""

from __future__ import annotations

import argparse
import sys

import common
import projector_throughput
import replay


def _n(x: float) -> str:
    return f"{x:,.0f}"


def _ms(x: float) -> str:
    return f"{x:,.1f} ms" if x < 100 else f"{x:,.0f} ms"


def rows(quick: bool) -> list[tuple[str, str, str, str, str]]:
    out: list[tuple[str, str, str, str, str]] = []
    r = {name: common.latest_result(name, quick=quick) for name in (
        "projector_throughput", "raw_upsert_limit", "peer_eventsourcing", "replay", "memory",
        "read_latency", "freshness")}

    for profile, pt in (projector_throughput.by_profile(r["projector_throughput"])
                        if r["projector_throughput"] else {}).items():
        size = f"{_n(pt['workload']['events'])} events ({profile})"
        for key, label in (("workers_1", "1 worker"),
                           ("workers_2_manual", "2 workers, manual partitions"),
                           ("workers_2_group", "2 workers, consumer group")):
            if key in pt:
                v = pt[key]
                runs = ", ".join(_n(x["events_per_second"]) for x in v["runs"])
                out.append((f"projector throughput, {label}", size,
                            f"**{_n(v['median_events_per_second'])} events/s** (runs {runs}; "
                            f"fold check {v['fold_check']})", "—", ""))
    peer = r["peer_eventsourcing"]
    if peer:
        ratio = peer["ratio_beliefstore_over_eventsourcing"]
        out.append(("projector vs `eventsourcing` ProjectionRunner",
                    f"{_n(peer['workload']['events'])} events",
                    f"beliefstore {_n(peer['beliefstore']['median_events_per_second'])} / "
                    f"eventsourcing {_n(peer['eventsourcing']['median_events_per_second'])} "
                    f"events/s = **{ratio:.1f}×**", "≥ 3×",
                    "met" if ratio >= 3 else f"missed: {ratio:.2f}× (needs {3 / ratio:.1f}× more)"))
    for profile, raw in ((r["raw_upsert_limit"].get("profiles") or {"hot-key": r["raw_upsert_limit"]})
                         if r["raw_upsert_limit"] else {}).items():
        line = f"limit **{_n(raw['median_events_per_second'])} events/s**"
        status = "no projector figure at this size"
        if "ratio_projector_over_limit" in raw:
            ratio = raw["ratio_projector_over_limit"]
            line = (f"projector {_n(raw['projector']['median_events_per_second'])} / limit "
                    f"{_n(raw['median_events_per_second'])} events/s = **{ratio:.1%}**")
            status = ("met" if ratio >= 0.5 else
                      f"missed: {ratio:.1%} (the projector needs {0.5 / ratio:.1f}× its speed)")
        what = ("projector vs raw limit = min(raw Kafka consume, raw PostgreSQL COPY + upsert)"
                if "consume_events_per_second" in raw else
                "projector vs raw PostgreSQL upsert (COPY + ON CONFLICT)")
        out.append((what, f"{_n(raw['workload']['events'])} events ({profile})", line, "≥ 50 %",
                    status))
    rl = r["read_latency"]
    if rl:
        size = f"{_n(rl['beliefs'])} beliefs ({_n(rl['subjects'])} subjects × 10)"
        for key, label in (("api_1", "GET self-model, 1 client"),
                           ("api_50", "GET self-model, 50 clients"),
                           ("sql_1", "same read in SQL (psycopg), 1 connection"),
                           ("sql_50", "same read in SQL (psycopg), 50 connections")):
            if key in rl:
                v = rl[key]
                target, status = "—", ""
                if key == "api_50":
                    p99 = v["median_p99_ms"]
                    target = "p99 ≤ 10 ms"
                    status = "met" if p99 <= 10 else f"missed: p99 {p99 / 10:,.0f}× the target"
                out.append((f"read latency, {label}", size,
                            f"p50 {_ms(v['median_p50_ms'])}, **p99 {_ms(v['median_p99_ms'])}** "
                            f"({_n(v['median_requests_per_second'])} req/s)", target, status))
    if rl and "healthz_50" in rl:  # the wrk version (issue 10)
        size = f"{_n(rl['beliefs'])} beliefs, {rl['api_workers']} API processes, wrk"
        met = rl["met"]
        h, m = rl["healthz_50"], rl["self_model_50"]
        one, fixed, f = rl["self_model_1"], rl["self_model_fixed_500"], rl["freshness"]
        out.append(("GET self-model vs /healthz, 50 connections (same server, same run)", size,
                    f"{_n(m['requests_per_second'])} / {_n(h['requests_per_second'])} req/s = "
                    f"**{rl['ratio_self_model_over_healthz']:.0%}**", "≥ 50 %",
                    "met" if met["ratio"] else "missed"))
        out.append(("GET self-model, 1 connection", size,
                    f"**p50 {_ms(one['p50_ms'])}, p99 {_ms(one['p99_ms'])}** "
                    f"({_n(one['requests_per_second'])} req/s)", "p50 ≤ 1 ms, p99 ≤ 3 ms",
                    "met" if met["p50_1"] and met["p99_1"] else "missed"))
        out.append(("GET self-model at a fixed rate", size,
                    f"{_n(fixed['requests_per_second'])} req/s: **p99 {_ms(fixed['p99_ms'])}**",
                    "p99 ≤ 10 ms at 500 req/s", "met" if met["p99_fixed"] else "missed"))
        out.append(("freshness: POST → visible in GET / → watch event", f"{f['probes']} probes",
                    f"p99 **{_ms(f.get('visible_p99_ms', 0))}** / **{_ms(f.get('watch_p99_ms', 0))}**",
                    "p99 ≤ 100 ms each",
                    "met" if met["fresh_visible"] and met["fresh_watch"] else "missed"))
    fr = r["freshness"]
    if fr:
        p99 = fr["median_p99_ms"]
        missing = sum(x["probes_missing"] for x in fr["runs"])
        seconds = fr["params"]["seconds"]
        out.append(("freshness: produce call → visible in GET self-model",
                    f"{_n(fr['params']['rate'])} events/s for {seconds} s, "
                    f"{len(fr['runs'])} runs",
                    f"p50 {_ms(fr['median_p50_ms'])}, **p99 {_ms(p99)}**"
                    + (f"; {missing} probes never seen" if missing else ""), "p99 ≤ 500 ms",
                    "met" if fr["target_met"] else f"missed by {p99 - 500:,.0f} ms"))
    for label, rp in (replay.by_storage(r["replay"]) if r["replay"] else {}).items():
        rate = rp["median_events_per_second"]
        target = "target_events_per_second" in rp
        out.append((f"replay (rebuild from the log), {label}",
                    f"{_n(rp['workload']['events'])} events",
                    f"**{rp['median_seconds']:,.0f} s** = {_n(rate)} "
                    f"events/s (fold check {rp['fold_check']})",
                    "≥ 25,000 events/s" if target else "—",
                    ("met" if rate >= 25_000 else f"missed: {rate / 25_000:.0%} of it")
                    if target else ""))
    mem = r["memory"]
    if mem:
        peak, mark = mem["median_peak_rss_mb"], mem["median_peak_rss_mb_at_mark"]
        status = "met" if mem["target_met"] else (
            f"missed: {peak:.0f} MB" + ("" if mem["flat"] else ", growing"))
        out.append(("projector peak RSS", f"{_n(mem['mark'])} / "
                    f"{_n(mem['workload']['events'])} events",
                    f"**{mark:.0f} MB / {peak:.0f} MB** "
                    f"({'flat' if mem['flat'] else 'growing'}: ×{peak / mark:.2f})",
                    "≤ 300 MB and flat", status))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    print("| figure | size | result (median of the runs) | target | status |")
    print("|---|---|---|---|---|")
    for row in rows(args.quick):
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
