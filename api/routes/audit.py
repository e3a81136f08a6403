"""Auditors' reads of one belief: its history and its full trace.
"""

from __future__ import annotations

import math

from fastapi import APIRouter

from beliefstore.api import queries
from beliefstore.api.deps import (
    AttributeName,
    Caller,
    Conn,
    ContextName,
    State,
    SubjectId,
    no_such_key,
    read_scope,
    record_access,
)
from beliefstore.api.models import (
    HistoryEntryOut,
    HistoryOut,
    KafkaPosition,
    TraceEventOut,
    TraceOut,
)
from beliefstore.api.render import belief_out
from beliefstore.api.security import (
    TRACE_RESPONSES,
)
from beliefstore.api.staleness import with_age
from beliefstore.events.model import ObservationRecorded
from beliefstore.projector.fold import Key
from beliefstore.projector.store import load_events
from beliefstore.projector.timeline import history
from beliefstore.timefmt import from_millis

router = APIRouter()


@router.get("/v1/subjects/{subject_id}/beliefs/{context}/{attribute}/history",
         response_model=HistoryOut, responses=TRACE_RESPONSES, tags=["audit"])
def belief_history(caller: Caller, subject_id: SubjectId, context: ContextName,
                   attribute: AttributeName,
                   conn: Conn, state: State) -> HistoryOut:
    """How the belief evolved: each (recorded_at, value, confidence) after an event
    that changed it, in log order, with that event. 403 if the key may not read the
    context."""
    scope = read_scope(caller, state, context)
    key: Key = (subject_id, context, attribute)
    logged = load_events(conn, [key])
    if not any(isinstance(i.event, ObservationRecorded) for i in logged):
        no_such_key(conn, subject_id, context, attribute, scope)
    changes = history(logged, key, state.settings.fold_settings)
    record_access(state, caller, subject_id, "history", [context], len(changes), attribute)
    return HistoryOut(subject_id=subject_id, context=context, attribute=attribute, changes=[
        HistoryEntryOut(
            recorded_at=from_millis(c.recorded_at), value=c.value, confidence=c.confidence,
            event_id=c.event.event_id, event_type=c.event.type, source=c.event.source,
            kafka_partition=c.partition, kafka_offset=c.offset, alternatives=c.alternatives)
        for c in changes
    ])

@router.get("/v1/subjects/{subject_id}/beliefs/{context}/{attribute}/trace",
         response_model=TraceOut, responses=TRACE_RESPONSES, tags=["audit"])
def belief_trace(caller: Caller, subject_id: SubjectId, context: ContextName,
                 attribute: AttributeName,
                 conn: Conn, state: State) -> TraceOut:
    """Every event of the belief's key, counting or not, and why not (superseded by
    the same source, retracted, erased), with weights and Kafka coordinates. 403 if
    the key may not read the context."""
    scope = read_scope(caller, state, context)
    key: Key = (subject_id, context, attribute)
    fold_settings = state.settings.fold_settings
    t = queries.key_trace(conn, key, fold_settings)
    if not t.entries:
        no_such_key(conn, subject_id, context, attribute, scope)
    events = []
    for entry in t.entries:
        e, pos = entry.event, t.positions[entry.event.event_id]
        observed = isinstance(e, ObservationRecorded)
        erased = e.event_id in t.erased_ids
        events.append(TraceEventOut(
            event_id=e.event_id,
            type="observed" if observed else "retracted",
            source=e.source,
            occurred_at=from_millis(e.occurred_at),
            recorded_at=from_millis(pos.recorded_at) if pos.recorded_at is not None
            else None,
            value=e.value if observed and not erased else None,
            confidence=e.confidence if observed else None,
            evidence=e.evidence if observed and not erased else None,
            retracted_event_id=None if observed else e.retracted_event_id,
            status=entry.status.value,
            reason=entry.reason,
            weight=entry.weight,
            decay=entry.decay,
            trust=entry.trust,
            log_odds=entry.log_odds,
            kafka=KafkaPosition(topic=pos.topic, partition=pos.partition, offset=pos.offset),
            writer_fingerprint=pos.writer_fingerprint,
        ))
    sources = sorted({ev.source for ev in events})
    weights: dict[str, list[float]] = {}
    for entry in t.entries:
        if entry.weight is not None and isinstance(entry.event, ObservationRecorded):
            weights.setdefault(entry.event.value, []).append(entry.weight)
    record_access(state, caller, subject_id, "trace", [context], len(events), attribute)
    return TraceOut(
        subject_id=subject_id, context=context, attribute=attribute,
        belief=with_age([belief_out(t.row)])[0] if t.row is not None else None,
        half_life_s=fold_settings.half_life_s(context),
        trust={s: fold_settings.trust_of(s) for s in sources},
        scores={v: math.fsum(ws) for v, ws in sorted(weights.items())},
        events=events,
    )
