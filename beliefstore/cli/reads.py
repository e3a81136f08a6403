"""Commands that read the self-model through the API: ``self-model``, ``trace``, ``history``.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.table import Table

from beliefstore.cli.common import (
    AttributeArg,
    ContextArg,
    SubjectArg,
    api_get,
    console,
    print_self_model,
    print_trace,
)

JsonOption = Annotated[bool, typer.Option("--json", help="Print the API's JSON.")]


def _print_json(body: Any) -> None:
    sys.stdout.write(json.dumps(body, indent=2) + "\n")


def _subject_get(subject: str, *segments: str, params: dict[str, Any] | None = None) -> Any:
    """GET ``/v1/subjects/{subject}/{segments...}``, each segment percent-encoded."""
    from beliefstore.client.core import subject_path  # the client's models load on use only

    return api_get(subject_path(subject, *segments), params)


def self_model(
    subject: SubjectArg,
    as_of: Annotated[str | None, typer.Option(
        help="A past instant, ISO 8601 with timezone (e.g. 2026-01-05T12:00Z): what was "
        "believed then.")] = None,
    time: Annotated[str, typer.Option(
        help="Time axis of --as-of: recorded (appended to the log by then) or occurred "
        "(observed by then).")] = "recorded",
    as_json: JsonOption = False,
) -> None:
    """Print a subject's self-model, now or as of a past instant (through the API at
    BELIEFSTORE_API_URL, or the one `beliefstore up` runs here)."""
    params: dict[str, Any] = {}
    if as_of is not None:
        from datetime import datetime

        try:
            instant = datetime.fromisoformat(as_of)
        except ValueError:
            raise typer.BadParameter("not ISO 8601, e.g. 2026-01-05T12:00Z",
                                     param_hint="--as-of") from None
        if instant.tzinfo is None:
            raise typer.BadParameter("needs a timezone, e.g. 2026-01-05T12:00Z",
                                     param_hint="--as-of")
        if time not in ("recorded", "occurred"):
            raise typer.BadParameter("must be recorded or occurred", param_hint="--time")
        params = {"as_of": instant.isoformat(), "time": time}
    model = _subject_get(subject, "self-model", params=params)
    (_print_json if as_json else print_self_model)(model)


def trace(
    subject: SubjectArg, context: ContextArg, attribute: AttributeArg,
    as_json: JsonOption = False,
) -> None:
    """Print every event behind one belief, counting or not and why, with Kafka positions."""
    body = _subject_get(subject, "beliefs", context, attribute, "trace")
    (_print_json if as_json else print_trace)(body)


def history(
    subject: SubjectArg, context: ContextArg, attribute: AttributeArg,
    as_json: JsonOption = False,
) -> None:
    """Print how one belief evolved: value and confidence after each event that changed it."""
    body = _subject_get(subject, "beliefs", context, attribute, "history")
    if as_json:
        _print_json(body)
        return
    table = Table(title=f"history of {subject} {context}/{attribute}", title_justify="left")
    for column in ("recorded_at", "value", "confidence", "event", "source", "kafka"):
        table.add_column(column)
    for c in body["changes"]:
        table.add_row(c["recorded_at"][:23], c["value"] or "(no belief)",
                      "" if c["confidence"] is None else f"{c['confidence']:.3f}",
                      f"{c['event_type']} {c['event_id'][:8]}…", c["source"],
                      f"p{c['kafka_partition']}@{c['kafka_offset']}")
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add ``self-model``, ``trace`` and ``history`` to ``app``."""
    app.command("self-model")(self_model)
    app.command()(trace)
    app.command()(history)
