"""Commands that make and move events: ``produce``, ``simulate``, ``fold``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from beliefstore.cli.common import console, err, fail, load_settings, parse_pairs_option
from beliefstore.errors import BeliefstoreError, ValidationError


def produce(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSON Lines events.")],
    batch: Annotated[int, typer.Option(help="Events per acknowledged batch.")] = 500,
) -> None:
    """Produce events from a JSON Lines file (DESIGN.md's event format) with a progress
    bar. Invalid lines are refused and reported with their line number; the others are
    produced. Exits 1 if any line was refused."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from beliefstore.events.jsonl import iter_lines
    from beliefstore.events.producer import BeliefProducer

    settings = load_settings()
    try:
        producer = BeliefProducer.from_settings(settings)
    except BeliefstoreError as exc:
        raise fail(str(exc), 2) from None
    with file.open(encoding="utf-8") as f:
        total = sum(1 for line in f if line.strip())
    refused = produced = 0
    pending: list[Any] = []
    with producer, file.open(encoding="utf-8") as f, Progress(
        "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
        TimeRemainingColumn(), console=err,
    ) as progress:
        task = progress.add_task(f"producing to {settings.topic}", total=total)
        for number, item in iter_lines(f):
            if isinstance(item, ValidationError):
                refused += 1
                progress.console.print(f"[yellow]line {number} refused:[/] {item}")
                progress.advance(task)
                continue
            pending.append(item)
            if len(pending) >= batch:
                produced += len(producer.send_many(pending))
                progress.advance(task, len(pending))
                pending = []
        if pending:
            produced += len(producer.send_many(pending))
            progress.advance(task, len(pending))
    console.print(f"produced {produced} event(s) to {settings.topic}; refused {refused} line(s)")
    if refused:
        raise typer.Exit(1)


def simulate(
    events: Annotated[int, typer.Option(help="Number of events (duplicates included).")] = 10000,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same events.")] = 7,
    subjects: Annotated[int | None, typer.Option(help="Number of subjects (default events/10).")] = None,
    output: Annotated[Path | None, typer.Option(help="Write JSON Lines here (default stdout).")] = None,
    profile: Annotated[str, typer.Option(
        help="Who is observed: hot-key (Pareto 1.2, a few subjects get most events) or "
             "realistic (Zipf s=1.1 over subjects, hottest capped at 10x the mean: about "
             "10 events per subject).")] = "hot-key",
) -> None:
    """Generate a deterministic synthetic workload as JSON Lines: agents observing people
    with Zipf-distributed activity, supersessions, own- and other-source retractions,
    erasures and duplicate deliveries. Feed it to `produce` or `fold`."""
    from beliefstore.events.jsonl import dumps
    from beliefstore.events.workload import PROFILES, generate

    if profile not in PROFILES:
        raise fail(f"--profile {profile!r} is not a workload profile: use one of "
                   f"{', '.join(PROFILES)}", 2)
    lines = (dumps(e) + "\n" for e in generate(events, seed=seed, subjects=subjects,
                                                profile=profile))
    if output is None:
        sys.stdout.writelines(lines)
    else:
        with output.open("w", encoding="utf-8") as f:
            f.writelines(lines)
        err.print(f"wrote {events} events to {output}")


def fold(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False,
                                         help="JSON Lines events (or a JSON array).")],
    default_half_life: Annotated[float | None, typer.Option(
        help="Half-life of contexts without their own, seconds (default 2592000 = 30 days).")] = None,
    half_life: Annotated[list[str] | None, typer.Option(
        help="CONTEXT=SECONDS, repeatable.", metavar="CONTEXT=S")] = None,
    trust: Annotated[list[str] | None, typer.Option(
        help="SOURCE=WEIGHT, repeatable (default 1.0).", metavar="SOURCE=W")] = None,
) -> None:
    """Fold events offline, with no services, and print the beliefs as a JSON array of
    {subject_id, context, attribute, value, confidence, alternatives, support}."""
    from beliefstore.events.jsonl import read_events
    from beliefstore.projector.fold import DEFAULT_HALF_LIFE_S, FoldSettings
    from beliefstore.projector.fold import fold as run_fold

    if default_half_life is not None and default_half_life <= 0:
        raise typer.BadParameter("must be > 0 seconds", param_hint="--default-half-life")
    settings = FoldSettings(
        default_half_life_s=default_half_life or DEFAULT_HALF_LIFE_S,
        half_lives=parse_pairs_option(half_life or [], "--half-life"),
        trust=parse_pairs_option(trust or [], "--trust"),
    )
    if any(v <= 0 for v in settings.half_lives.values()):
        raise typer.BadParameter("every half-life must be > 0 seconds", param_hint="--half-life")
    try:
        events = read_events(file)
    except (ValidationError, ValueError) as exc:
        raise fail(f"{file}: {exc}") from None
    beliefs = [
        {
            "subject_id": b.subject_id, "context": b.context, "attribute": b.attribute,
            "value": b.value, "confidence": b.confidence, "alternatives": b.alternatives,
            "support": list(b.support),
        }
        for b in run_fold(events, settings)
    ]
    sys.stdout.write(json.dumps(beliefs, indent=2, ensure_ascii=False) + "\n")


def register(app: typer.Typer) -> None:
    """Add ``produce``, ``simulate`` and ``fold`` to ``app``."""
    app.command()(produce)
    app.command()(simulate)
    app.command()(fold)
