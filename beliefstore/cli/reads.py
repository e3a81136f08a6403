"""Commands that read the self-model through the API: ``self-model``, ``trace``, ``history``.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.table import Table

from beliefstore.cli.common import api_get, console, print_self_model, print_trace


def self_model(
    subject: Annotated[str, typer.Argument(help="Subject id.")],
    as_of: Annotated[str | None, typer.Option(
        help="A past instant, ISO 8601 with timezone (e.g. 2026-01-05T12:00Z): what was "
        "believed then.")] = None,
    time: Annotated[str, typer.Option(
        help="Time axis of --as-of: recorded (appended to the log by then) or occurred "
        "(observed by then).")] = "recorded",
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
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
    model = api_get(f"/v1/subjects/{subject}/self-model", params)
    if as_json:
        sys.stdout.write(json.dumps(model, indent=2) + "\n")
    else:
        print_self_model(model)


def trace(
    subject: Annotated[str, typer.Argument(help="Subject id.")],
    context: Annotated[str, typer.Argument(help="Context, e.g. support.")],
    attribute: Annotated[str, typer.Argument(help="Attribute, e.g. emotional_state.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
) -> None:
    """Print every event behind one belief, counting or not and why, with Kafka positions."""
    body = api_get(f"/v1/subjects/{subject}/beliefs/{context}/{attribute}/trace")
    if as_json:
        sys.stdout.write(json.dumps(body, indent=2) + "\n")
    else:
        print_trace(body)


def history(
    subject: Annotated[str, typer.Argument(help="Subject id.")],
    context: Annotated[str, typer.Argument(help="Context, e.g. support.")],
    attribute: Annotated[str, typer.Argument(help="Attribute, e.g. emotional_state.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
) -> None:
    """Print how one belief evolved: value and confidence after each event that changed it."""
    body = api_get(f"/v1/subjects/{subject}/beliefs/{context}/{attribute}/history")
    if as_json:
        sys.stdout.write(json.dumps(body, indent=2) + "\n")
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
