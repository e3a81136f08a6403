"""Commands that make and move events: ``produce``, ``simulate``, ``fold``.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer

from beliefstore.cli.common import (
    console,
    err,
    fail,
    load_settings,
    log,
    parse_pairs_option,
    setup_logging,
)
from beliefstore.errors import BeliefstoreError, ProduceError, ValidationError


def produce(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSON Lines events.")],
    batch: Annotated[int, typer.Option(min=1, help="Events per acknowledged batch.")] = 500,
    verbose: Annotated[bool, typer.Option("--verbose", "-v",
                                          help="Show the traceback of a failure.")] = False,
) -> None:
    """Produce events from a JSON Lines file (DESIGN.md's event format) with a progress
    bar. Invalid lines are refused and reported with their line number; the others are
    produced. Exits 1 if any line was refused, or if the broker stopped acknowledging
    (the message says how many events were acknowledged and the first line that was
    not; re-running the same file is safe: events are deduplicated by event_id)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from beliefstore.events.jsonl import iter_lines
    from beliefstore.events.producer import BeliefProducer

    setup_logging(verbose)
    settings = load_settings()
    try:
        producer = BeliefProducer.from_settings(settings)
    except BeliefstoreError as exc:
        raise fail(str(exc), 2) from None
    with file.open(encoding="utf-8") as f:
        total = sum(1 for line in f if line.strip())
    refused = produced = 0
    pending: list[tuple[int, Any]] = []
    failure: ProduceError | None = None

    def flush() -> None:
        nonlocal produced, pending
        producer.send_many([event for _, event in pending])
        produced += len(pending)
        progress.advance(task, len(pending))
        pending = []

    with file.open(encoding="utf-8") as f, Progress(
        "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
        TimeRemainingColumn(), console=err,
    ) as progress:
        task = progress.add_task(f"producing to {settings.topic}", total=total)
        try:
            for number, item in iter_lines(f):
                if isinstance(item, ValidationError):
                    refused += 1
                    progress.console.print(f"[yellow]line {number} refused:[/] {item}")
                    progress.advance(task)
                    continue
                pending.append((number, item))
                if len(pending) >= batch:
                    flush()
            if pending:
                flush()
        except ProduceError as exc:
            failure = exc
    try:
        producer.close(timeout_s=1.0 if failure is not None else None)
    except Exception:  # the broker is gone; what was acknowledged is reported below
        log.debug("closing the producer failed", exc_info=True)
    if failure is not None:
        if verbose:
            traceback.print_exception(failure, file=sys.stderr)
        first = pending[0][0] if pending else None
        raise fail(
            f"{failure}. {produced} event(s) of {file} were acknowledged before it"
            + (f"; line {first} is the first not acknowledged (some lines of its batch of "
               f"{len(pending)} may have been stored)" if first is not None else "")
            + f"; refused {refused} line(s). Re-running `beliefstore produce {file}` is safe: "
            "events are deduplicated by event_id. Check that the broker runs "
            f"({settings.kafka_bootstrap_servers})"
            + ("" if verbose else "; --verbose shows the traceback"))
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
