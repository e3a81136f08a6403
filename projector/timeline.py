"""Bi-temporal views of the read model: beliefs as of an instant, and belief history.

Every stored event has two times: ``occurred_at`` (when the agent observed it) and
``recorded_at`` (the broker's timestamp when it was appended to the log).

* ``axis="recorded"`` — what the system believed at T: the events recorded at or
  before T.
* ``axis="occurred"`` — what we now know was true at T: the events that occurred at
  or before T.

Either way the result is the pure :func:`~beliefstore.projector.fold.fold` of the
filtered events. One exception, on purpose: **erasures apply to every view**, past
ones included. Whatever a subject had erased is forgotten as of any time (its stored
values are wiped anyway), so erasure events are never filtered out.

Pure functions: no clock, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from beliefstore.events.model import Event, SubjectErased
from beliefstore.projector.fold import Belief, FoldSettings, Key, fold, trace
from beliefstore.projector.store import LoggedEvent

Axis = Literal["recorded", "occurred"]


def event_time(item: LoggedEvent, axis: Axis) -> int:
    """The event's time on ``axis``, epoch ms (``recorded_at`` falls back to
    ``occurred_at`` when the broker gave no timestamp)."""
    if axis == "occurred" or item.position.recorded_at is None:
        return item.event.occurred_at
    return item.position.recorded_at


def visible_at(logged: Iterable[LoggedEvent], instant_ms: int, axis: Axis) -> list[Event]:
    """The events a view as of ``instant_ms`` folds: those at or before it on ``axis``,
    plus every erasure."""
    return [
        item.event for item in logged
        if isinstance(item.event, SubjectErased) or event_time(item, axis) <= instant_ms
    ]


def beliefs_as_of(logged: Iterable[LoggedEvent], instant_ms: int, axis: Axis,
                  settings: FoldSettings) -> list[Belief]:
    """The beliefs as of ``instant_ms`` on ``axis`` (see the module docstring)."""
    return fold(visible_at(logged, instant_ms, axis), settings)


@dataclass(frozen=True)
class HistoryEntry:
    """A change of one belief.

    Attributes:
        recorded_at: when the event that changed it was appended, epoch ms.
        value: the belief's value after the change (``None``: no belief any more).
        confidence: its confidence after the change (``None`` with no belief).
        event: the event that changed it.
        partition, offset: that event's position in the log.
        alternatives: the other values after the change → their confidence.
    """

    recorded_at: int
    value: str | None
    confidence: float | None
    event: Event
    partition: int
    offset: int
    alternatives: dict[str, float] = field(default_factory=dict)


def history(logged: Sequence[LoggedEvent], key: Key, settings: FoldSettings,
            tolerance: float = 1e-12) -> list[HistoryEntry]:
    """How the belief of ``key`` evolved, in log order: one entry per event after which
    its value or confidence changed (by more than ``tolerance``).

    ``logged`` holds the key's events (as :func:`~beliefstore.projector.store.load_events`
    returns them); erasures apply from the start, as in :func:`visible_at`.
    """
    erasures = [i.event for i in logged if isinstance(i.event, SubjectErased)]
    ordered = sorted(
        (i for i in logged if not isinstance(i.event, SubjectErased)),
        key=lambda i: (event_time(i, "recorded"), i.position.partition, i.position.offset),
    )
    entries: list[HistoryEntry] = []
    seen: list[Event] = list(erasures)
    last: tuple[str | None, float | None] = (None, None)
    for item in ordered:
        seen.append(item.event)
        belief, _ = trace(seen, key, settings)
        now = (belief.value, belief.confidence) if belief else (None, None)
        changed = now[0] != last[0] or (
            now[1] is not None and last[1] is not None and abs(now[1] - last[1]) > tolerance
        )
        if changed:
            entries.append(HistoryEntry(event_time(item, "recorded"), now[0], now[1],
                                        item.event, item.position.partition,
                                        item.position.offset,
                                        dict(belief.alternatives) if belief else {}))
            last = now
    return entries

