"""``beliefstore watch SUBJECT``: print a subject's belief changes live, from the API's
``GET /v1/subjects/{id}/watch`` event stream (Server-Sent Events).

A dropped connection is reopened with ``Last-Event-ID`` (the id of the last event
printed), so nothing is skipped or printed twice.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated, Any

import httpx
import typer

from beliefstore.cli.common import (
    SubjectArg,
    console,
    err,
    fail,
    fmt_alternatives,
    load_settings,
)


def _line(change: dict[str, Any]) -> str:
    key = f"{change['context']}/{change['attribute']}"
    kafka = change.get("kafka") or {}
    where = f"p{kafka.get('partition')}@{kafka.get('offset')}"
    if change["value"] is None:
        return f"{change['changed_at'][11:23]}  {key}: (no belief any more)  {where}"
    alternatives = fmt_alternatives(change.get("alternatives") or {})
    return (f"{change['changed_at'][11:23]}  {key} = {change['value']} "
            f"({change['confidence']:.3f})"
            + (f"  alternatives {alternatives}" if alternatives else "")
            + f"  sources {', '.join(change.get('sources') or [])}  {where}")


def watch(
    subject: SubjectArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print each change as one JSON "
                                                         "line (with its event id).")] = False,
    last_event_id: Annotated[str | None, typer.Option(
        help="Start after this event id (<projection>:<change id>, as printed with --json); "
        "default: from now.")] = None,
    count: Annotated[int | None, typer.Option(
        min=1, help="Exit 0 after this many changes (default: until Ctrl-C).")] = None,
    heartbeat: Annotated[float, typer.Option(
        min=0.5, help="Seconds between the server's heartbeats.")] = 15.0,
) -> None:
    """Print a subject's belief changes as other agents' observations are projected
    (context, attribute, value, confidence, alternatives, sources, Kafka position), only
    in the contexts the key may read; reconnects and resumes if the connection drops."""
    from httpx_sse import SSEError, connect_sse

    from beliefstore.client.core import watch_path

    settings = load_settings()
    url = settings.api_url + watch_path(subject)
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    seen = 0
    delay = 0.5
    with httpx.Client(timeout=httpx.Timeout(10, read=heartbeat * 3 + 5)) as client:
        while True:
            if last_event_id:
                headers["Last-Event-ID"] = last_event_id
            try:
                with connect_sse(client, "GET", url, params={"heartbeat_s": heartbeat},
                                 headers=headers) as source:
                    response = source.response
                    if response.status_code != 200:
                        response.read()
                        try:
                            detail = response.json().get("detail", response.text)
                        except ValueError:
                            detail = response.text
                        raise fail(f"the API refused the watch ({response.status_code}): "
                                   f"{detail}", 1 if response.status_code < 500 else 2)
                    for event in source.iter_sse():
                        delay = 0.5
                        if event.event == "ready" and not as_json:
                            err.print(f"watching {subject} (Ctrl-C stops)")
                        elif event.event == "error":
                            raise fail(event.data)
                        elif event.event == "projection" and not as_json:
                            err.print(f"the API now serves projection "
                                      f"{json.loads(event.data)['projection']}")
                        if event.id:
                            last_event_id = event.id
                        if event.event != "belief":
                            continue
                        change = json.loads(event.data)
                        if as_json:
                            sys.stdout.write(json.dumps({"id": event.id, **change}) + "\n")
                            sys.stdout.flush()
                        else:
                            console.print(_line(change), highlight=False)
                        seen += 1
                        if count is not None and seen >= count:
                            return
            except (httpx.TransportError, SSEError) as exc:
                err.print(f"watch connection lost ({exc.__class__.__name__}); resuming after "
                          f"{last_event_id or 'now'} in {delay:.1f} s")
            except KeyboardInterrupt:
                return
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def register(app: typer.Typer) -> None:
    """Add ``watch`` to ``app``."""
    app.command()(watch)
