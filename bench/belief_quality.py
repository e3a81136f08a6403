"""Belief quality against ground truth: the fold vs last write wins, highest confidence,
majority vote and mean confidence, on seeded simulated worlds (beliefstore.quality).

    .venv/bin/python bench/belief_quality.py [--seed N] [--subjects N] [--no-plots]

Worlds: ``default`` (mixed agents: calibrated, over- and underconfident), ``calibrated``
(every agent calibrated) and ``overconfident`` (every agent overconfident). For the
default and overconfident worlds the fold is also run with the trust `beliefstore
calibrate` fits on a held-out world (same spec, another seed: its events and outcomes).
Writes bench/results/belief_quality.json and bench/results/belief_quality-<world>.png
(one reliability-diagram panel per method), and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from beliefstore.projector.fold import FoldSettings
from beliefstore.quality.baselines import BASELINES, Method, fold_method
from beliefstore.quality.calibrate import calibrate, label, trust_setting
from beliefstore.quality.evaluate import Evaluation, evaluate
from beliefstore.quality.world import (
    CALIBRATED_AGENTS,
    MIXED_AGENTS,
    OVERCONFIDENT_AGENTS,
    WorldSpec,
    simulate,
)

RESULTS = Path(__file__).resolve().parent / "results"
HELD_OUT_SEED_OFFSET = 1000
"""The world trust is fitted on uses seed + this: same spec, other people and events."""


def fitted_trust(spec: WorldSpec) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Trust fitted by `calibrate` on a held-out world of ``spec``."""
    held_out = simulate(replace(spec, seed=spec.seed + HELD_OUT_SEED_OFFSET))
    fits = calibrate(label(held_out.events, held_out.outcomes), skip_few=True)
    return trust_setting(fits), [
        {"source": f.source, "n": f.n, "accuracy": f.accuracy,
         "mean_confidence": f.mean_confidence, "trust": f.trust,
         "ci95": [f.ci_low, f.ci_high], "note": f.note} for f in fits]


def run_world(spec: WorldSpec, with_trust: bool) -> tuple[Evaluation, dict[str, Any]]:
    world = simulate(spec)
    half_lives = spec.half_lives()
    methods: dict[str, Method] = {"fold": fold_method(FoldSettings(half_lives=half_lives))}
    extra: dict[str, Any] = {"half_lives_s": half_lives,
                             "true_trust": {a.source: 1 / a.confidence_scale for a in spec.agents}}
    if with_trust:
        trust, fits = fitted_trust(spec)
        methods["fold+trust"] = fold_method(FoldSettings(half_lives=half_lives, trust=trust))
        extra.update(fitted_trust=trust, fits=fits)
    methods["fold_30d"] = fold_method(FoldSettings())
    methods.update(BASELINES)
    return evaluate(world, methods), extra


def plot(evaluation: Evaluation, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(evaluation.methods)
    cols = 4
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names, strict=False):
        m = evaluation.methods[name]
        mids = [(b.low + b.high) / 2 for b in m.bins]
        acc = [b.accuracy if b.accuracy is not None else 0.0 for b in m.bins]
        ax.bar(mids, acc, width=0.1, edgecolor="black", alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="calibrated")
        conf = [((b.low + b.high) / 2, b.mean_confidence) for b in m.bins
                if b.mean_confidence is not None]
        ax.plot([x for x, _ in conf], [c for _, c in conf], "r_", markersize=12, mew=2,
                label="mean confidence")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{name}\nECE {m.ece:.3f}  Brier {m.brier:.3f}", fontsize=9)
        ax.set_xlabel("confidence", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
    axes.flat[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"reliability diagrams, world '{evaluation.world}' (seed {evaluation.seed})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def targets(results: dict[str, Evaluation]) -> list[dict[str, Any]]:
    """Each target of issue 15 with the measured figures and met/missed."""
    out = []
    d = results["default"].methods
    baselines = list(BASELINES)
    ratio = d["fold"].brier / d["last_write_wins"].brier
    out.append({"target": "default world: fold Brier <= 0.8 x last write wins",
                "measured": f"{d['fold'].brier:.4f} vs {d['last_write_wins'].brier:.4f} "
                            f"(x{ratio:.3f})", "met": ratio <= 0.8})
    best = min(baselines, key=lambda b: d[b].brier)
    out.append({"target": "default world: fold Brier <= every baseline",
                "measured": f"{d['fold'].brier:.4f} vs best baseline {best} {d[best].brier:.4f}",
                "met": all(d["fold"].brier <= d[b].brier for b in baselines)})
    c = results["calibrated"].methods["fold"]
    out.append({"target": "calibrated agents: fold ECE <= 0.05",
                "measured": f"{c.ece:.4f} (needed attributes only: {c.needed_ece:.4f})",
                "met": c.ece <= 0.05})
    o = results["overconfident"].methods
    out.append({"target": "overconfident agents: fold ECE with trust from calibrate <= 0.05",
                "measured": f"{o['fold+trust'].ece:.4f} (without trust: {o['fold'].ece:.4f}; "
                            f"needed attributes only: {o['fold+trust'].needed_ece:.4f})",
                "met": o["fold+trust"].ece <= 0.05})
    r = results["default"]
    rate = r.methods["fold"].repeats.repeats_per_handoff
    base = r.no_context.repeats_per_handoff
    out.append({"target": "default world: repeat questions with the fold <= 0.15 x no shared context",
                "measured": f"{rate:.3f} vs {base:.3f} per handoff (x{rate / base:.3f})",
                "met": rate <= 0.15 * base})
    wrong = r.methods["fold"].repeats.wrong_per_handoff
    worst = min(baselines, key=lambda b: r.methods[b].repeats.wrong_per_handoff)
    out.append({"target": "default world: fold's wrong answers lower than every baseline",
                "measured": f"{wrong:.3f} per handoff vs lowest baseline {worst} "
                            f"{r.methods[worst].repeats.wrong_per_handoff:.3f}",
                "met": all(wrong < r.methods[b].repeats.wrong_per_handoff for b in baselines)})
    return out


def table(results: dict[str, Evaluation]) -> str:
    lines = ["| world | method | accuracy | Brier | ECE | ECE (needed) | repeats / handoff "
             "| asks / handoff | wrong / handoff |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for world, ev in results.items():
        nc = ev.no_context
        lines.append(f"| {world} | no shared context | | | | | {nc.repeats_per_handoff:.3f} "
                     f"| {nc.asks / nc.handoffs:.3f} | 0 |")
        for name, m in ev.methods.items():
            r = m.repeats
            lines.append(
                f"| {world} | {name} | {m.accuracy:.3f} | {m.brier:.4f} | {m.ece:.4f} "
                f"| {m.needed_ece:.4f} | {r.repeats_per_handoff:.3f} "
                f"| {r.asks / r.handoffs:.3f} | {r.wrong_per_handoff:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--subjects", type=int, default=400)
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--output", type=Path, default=RESULTS / "belief_quality.json")
    args = parser.parse_args(argv)
    worlds = {
        "default": (WorldSpec(seed=args.seed, subjects=args.subjects, agents=MIXED_AGENTS,
                              name="default"), True),
        "calibrated": (WorldSpec(seed=args.seed, subjects=args.subjects, agents=CALIBRATED_AGENTS,
                                 name="calibrated"), False),
        "overconfident": (WorldSpec(seed=args.seed, subjects=args.subjects,
                                    agents=OVERCONFIDENT_AGENTS, name="overconfident"), True),
    }
    results: dict[str, Evaluation] = {}
    extras: dict[str, Any] = {}
    for name, (spec, with_trust) in worlds.items():
        results[name], extras[name] = run_world(spec, with_trust)
        if not args.no_plots:
            RESULTS.mkdir(parents=True, exist_ok=True)
            plot(results[name], RESULTS / f"belief_quality-{name}.png")
    checked = targets(results)
    payload = {
        "command": "python bench/belief_quality.py " + " ".join(sys.argv[1:] if argv is None
                                                                 else argv),
        "seed": args.seed, "subjects": args.subjects,
        "worlds": {n: {**results[n].to_dict(), **extras[n]} for n in results},
        "targets": checked,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(table(results))
    print()
    for t in checked:
        print(f"- {t['target']}: {t['measured']} -> {'met' if t['met'] else 'MISSED'}")
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
