"""``beliefstore calibrate EVENTS.jsonl OUTCOMES.jsonl``: learn each source's trust from
outcomes (values later known to be true), and print the ``BELIEFSTORE_TRUST`` line.

See :mod:`beliefstore.quality.calibrate` for the method and docs/confidence.md for what
the trust means.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from beliefstore.cli.common import fail
from beliefstore.quality.calibrate import (
    DEFAULT_MIN_OUTCOMES,
    DEFAULT_WINDOW_S,
    CalibrationError,
    SourceFit,
    calibrate,
    label,
    load_outcomes,
    trust_env_line,
    trust_setting,
)


def register(app: typer.Typer) -> None:
    """Add the ``calibrate`` command to the ``beliefstore`` app."""
    app.command("calibrate")(calibrate_command)


def _number(x: float) -> float | None:
    return None if math.isnan(x) or math.isinf(x) else x


def _fit_json(f: SourceFit) -> dict[str, Any]:
    return {"source": f.source, "n": f.n, "accuracy": f.accuracy,
            "mean_confidence": f.mean_confidence,
            "trust": _number(f.trust) if not math.isinf(f.trust) else
            ("inf" if f.trust > 0 else "-inf"),
            "se": _number(f.se), "ci95": [_number(f.ci_low), _number(f.ci_high)],
            "note": f.note}


def _fmt(x: float) -> str:
    return "n/a" if math.isnan(x) else ("inf" if x == math.inf else
                                        "-inf" if x == -math.inf else f"{x:.3f}")


def calibrate_command(
    events: Annotated[Path, typer.Argument(
        exists=True, dir_okay=False, metavar="EVENTS",
        help="The events, as JSON Lines (the format of `beliefstore fold`/`export`).")],
    outcomes: Annotated[Path, typer.Argument(
        exists=True, dir_okay=False, metavar="OUTCOMES",
        help='JSON Lines of values later known to be true: {"subject_id", "context", '
             '"attribute", "value", "known_at" (epoch ms)}.')],
    json_output: Annotated[bool, typer.Option(
        "--json", help="Print one JSON object (per-source fits, trust, env line).")] = False,
    min_outcomes: Annotated[int, typer.Option(
        min=1, help=f"Observations with an outcome each source needs (default "
        f"{DEFAULT_MIN_OUTCOMES}): with typical confidences 0.6-0.95, 50 give a 95% interval "
        "about ±0.5 around trust 1, enough to tell a source twice too confident (trust "
        "~0.5) from a calibrated one; with fewer the interval covers both.")]
        = DEFAULT_MIN_OUTCOMES,
    window: Annotated[float, typer.Option(
        min=0.0, help="An outcome labels observations of its key made at most this many "
        "seconds before it (default 604800 = 7 days); shorten it for fast-changing "
        "attributes.")] = DEFAULT_WINDOW_S,
    skip_few: Annotated[bool, typer.Option(
        "--skip-few", help="Leave sources with too few outcomes at trust 1.0 instead of "
        "refusing.")] = False,
) -> None:
    """Learn each source's trust from outcomes: the maximum-likelihood slope of a logistic
    calibration through the origin (Platt scaling without intercept) of its observations'
    logit-confidence against whether they matched the outcome. Prints per source n,
    accuracy, mean confidence and the trust with its 95% interval, then the
    BELIEFSTORE_TRUST=... line to use."""
    from beliefstore.errors import ValidationError
    from beliefstore.events.jsonl import read_events

    try:
        event_list = read_events(events)
    except ValidationError as exc:
        raise fail(f"{events}: {exc} (fix or remove that line; see `beliefstore fold` for "
                    "the event format)") from None
    except (ValueError, OSError) as exc:
        raise fail(f"{events}: cannot read events: {exc}") from None
    try:
        outcome_list = load_outcomes(outcomes)
    except CalibrationError as exc:
        raise fail(f"{exc} (fix or remove that line)") from None
    except (UnicodeDecodeError, OSError) as exc:
        raise fail(f"{outcomes}: cannot read outcomes: {exc}") from None
    try:
        fits = calibrate(label(event_list, outcome_list, window), min_outcomes=min_outcomes,
                         skip_few=skip_few)
    except CalibrationError as exc:
        raise fail(str(exc)) from None
    trust = trust_setting(fits)
    env = trust_env_line(trust)
    if json_output:
        sys.stdout.write(json.dumps({
            "events": len(event_list), "outcomes": len(outcome_list),
            "min_outcomes": min_outcomes, "window_s": window,
            "sources": [_fit_json(f) for f in fits], "trust": trust, "env": env,
        }, indent=2) + "\n")
        return
    rows = [("source", "n", "accuracy", "mean conf", "trust", "95% CI", "note")]
    for f in fits:
        rows.append((f.source, str(f.n), f"{f.accuracy:.3f}", f"{f.mean_confidence:.3f}",
                     _fmt(f.trust), f"[{_fmt(f.ci_low)}, {_fmt(f.ci_high)}]", f.note))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        cells = [c.rjust(w) if 0 < i < 6 else c.ljust(w) for i, (c, w) in
                 enumerate(zip(r, widths, strict=False))]
        sys.stdout.write("  ".join(cells) + ("  " + r[6] if r[6] else "") + "\n")
    sys.stdout.write(env + "\n")
