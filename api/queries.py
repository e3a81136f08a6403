"""Read-side queries of the read model (PostgreSQL only)."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from beliefstore.access.scopes import EVERYTHING, ContextScope
from beliefstore.events.model import ObservationRecorded
from beliefstore.projector.fold import Belief, FoldSettings, Key, TraceEntry, trace
from beliefstore.projector.store import LogPosition, load_events
from beliefstore.projector.tables import beliefs, erasures, observations, projection_offsets


def belief_rows(
    conn: sa.Connection,
    subject_id: str,
    context: str | None = None,
    min_confidence: float | None = None,
    scope: ContextScope = EVERYTHING,
) -> list[sa.Row]:
    """The subject's belief rows, sorted by (context, attribute), optionally filtered;
    only of the contexts ``scope`` allows."""
    b = beliefs
    query = sa.select(b).where(b.c.subject_id == subject_id, scope.clause(b.c.context))
    if context is not None:
        query = query.where(b.c.context == context)
    if min_confidence is not None:
        query = query.where(b.c.confidence >= min_confidence)
    return list(conn.execute(query.order_by(b.c.context, b.c.attribute)))


def subject_known(conn: sa.Connection, subject_id: str,
                  scope: ContextScope = EVERYTHING) -> bool:
    """Whether any belief or observation about the subject is stored, in the contexts
    ``scope`` allows (so a 404 does not tell whether a subject has data elsewhere)."""
    return bool(conn.execute(sa.select(
        sa.exists().where(beliefs.c.subject_id == subject_id, scope.clause(beliefs.c.context))
        | sa.exists().where(observations.c.subject_id == subject_id,
                            scope.clause(observations.c.context))
    )).scalar())


@dataclass(frozen=True)
class KeyTrace:
    """A key's belief row, the fold's trace entries and each event's log position."""

    row: sa.Row | None
    belief: Belief | None
    entries: list[TraceEntry]
    positions: dict[str, LogPosition]
    erased_ids: frozenset[str]


def key_trace(conn: sa.Connection, key: Key, settings: FoldSettings) -> KeyTrace:
    """Explain one belief from the stored events, with the same fold the projector uses."""
    logged = load_events(conn, [key])
    positions = {le.event.event_id: le.position for le in logged}
    belief, entries = trace([le.event for le in logged], key, settings)
    row = conn.execute(sa.select(beliefs).where(
        beliefs.c.subject_id == key[0], beliefs.c.context == key[1], beliefs.c.attribute == key[2]
    )).first()
    erased = frozenset(
        e.event.event_id for e in entries
        if isinstance(e.event, ObservationRecorded) and e.status == "erased"
    )
    return KeyTrace(row, belief, entries, positions, erased)


def projection_lag(conn: sa.Connection, projection: str, topic: str) -> int | None:
    """Σ (high watermark − next offset) over partitions, as of the projector's last batch."""
    p = projection_offsets
    rows = list(conn.execute(sa.select(p.c.next_offset, p.c.high_watermark).where(
        p.c.projection == projection, p.c.topic == topic
    )))
    if not rows:
        return None
    return sum(max(0, (r.high_watermark or r.next_offset) - r.next_offset) for r in rows)


__all__ = [
    "KeyTrace",
    "belief_rows",
    "key_trace",
    "projection_lag",
    "subject_known",
]


def subject_summaries(conn: sa.Connection, prefix: str, limit: int,
                      scope: ContextScope = EVERYTHING, exact: bool = False) -> list[sa.Row]:
    """Subjects whose id starts with ``prefix`` and that have observations in the contexts
    ``scope`` allows, most recently observed first, at most ``limit``: per subject its
    contexts, its keys (``context/attribute``), counts of observations and beliefs, newest
    ``occurred_at``, when a belief last changed, and whether it was erased. No values.
    ``exact``: only the subject ``prefix`` itself."""
    o, b, e = observations, beliefs, erasures
    pattern = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    belief_stats = (
        sa.select(sa.func.count()).where(b.c.subject_id == o.c.subject_id, scope.clause(b.c.context))
        .scalar_subquery())
    changed = (
        sa.select(sa.func.max(b.c.updated_at))
        .where(b.c.subject_id == o.c.subject_id, scope.clause(b.c.context)).scalar_subquery())
    query = (
        sa.select(
            o.c.subject_id,
            sa.func.array_agg(sa.distinct(o.c.context)).label("contexts"),
            sa.func.array_agg(sa.distinct(sa.func.concat(o.c.context, "/", o.c.attribute)))
            .label("keys"),
            sa.func.count().label("observations"),
            belief_stats.label("beliefs"),
            sa.func.max(o.c.occurred_at).label("last_observed_at"),
            changed.label("changed_at"),
            sa.exists().where(e.c.subject_id == o.c.subject_id).label("erased"),
        )
        .where(o.c.subject_id == prefix if exact else o.c.subject_id.like(pattern, escape="\\"),
               scope.clause(o.c.context))
        .group_by(o.c.subject_id)
        .order_by(sa.func.max(o.c.occurred_at).desc(), o.c.subject_id)
        .limit(limit)
    )
    return list(conn.execute(query))
