"""DESIGN.md's JSON Lines event format: one JSON object per line, ``occurred_at`` in epoch ms.

Used by ``beliefstore produce``, ``beliefstore fold`` and the test vectors.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

from beliefstore.errors import FieldError, ValidationError
from beliefstore.events.model import Event, ObservationRecorded
from beliefstore.events.validation import from_dict


def to_dict(event: Event) -> dict[str, Any]:
    """The JSON event format of ``event``: ``{"type": ..., <fields>}``; ``None`` fields omitted."""
    out: dict[str, Any] = {"type": event.type}
    for k, v in asdict(event).items():
        if v is None or (k == "metadata" and not v and isinstance(event, ObservationRecorded)):
            continue
        out[k] = v
    return out


def dumps(event: Event) -> str:
    """One JSON Lines line (without the newline) for ``event``."""
    return json.dumps(to_dict(event), ensure_ascii=False, sort_keys=False)


def iter_lines(stream: TextIO) -> Iterator[tuple[int, Event | ValidationError]]:
    """Parse a JSON Lines stream, yielding ``(line_number, event or error)`` for each line.

    Blank lines are skipped. A line that is not JSON, or not a valid event, yields a
    :class:`ValidationError` (never raises), so callers can report it with its number
    and carry on. Line numbers start at 1.
    """
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, ValidationError([FieldError("line", f"is not valid JSON: {exc.msg}")])
            continue
        try:
            yield number, from_dict(data)
        except ValidationError as exc:
            yield number, exc
        except TypeError as exc:
            yield number, ValidationError([FieldError("event", str(exc))])


def read_events(path: str | Path) -> list[Event]:
    """Read every event of a JSON Lines file, or a JSON array of events.

    Raises:
        ValidationError: naming the first bad line (``line N: field: message``).
    """
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return [from_dict(d) for d in json.loads(text)]
    import io

    events: list[Event] = []
    for number, item in iter_lines(io.StringIO(text)):
        if isinstance(item, ValidationError):
            raise ValidationError(
                [FieldError(f"line {number}: {e.field}", e.message) for e in item.errors]
            )
        events.append(item)
    return events
