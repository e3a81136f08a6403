"""Handoff reads: a subject's self-model and beliefs, now or as of an instant.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import sqlalchemy as sa
from fastapi import APIRouter, HTTPException, Query

from beliefstore.access.scopes import ContextScope
from beliefstore.api import queries
from beliefstore.api.deps import (
    AppState,
    AsOf,
    Caller,
    Conn,
    ContextFilter,
    State,
    SubjectId,
    TimeAxis,
    read_scope,
    record_access,
    unknown_subject,
)
from beliefstore.api.models import (
    BeliefOut,
    BeliefsOut,
    SelfModelOut,
)
from beliefstore.api.render import belief_out, computed_belief_out
from beliefstore.api.security import (
    READ_RESPONSES,
)
from beliefstore.api.staleness import MaxAge, with_age
from beliefstore.projector.store import load_subject_events
from beliefstore.projector.timeline import Axis, beliefs_as_of
from beliefstore.timefmt import to_millis

router = APIRouter()


def fetch_beliefs(conn: sa.Connection, state: AppState, subject_id: str, as_of: datetime | None,
                  time_axis: Axis, scope: ContextScope, context: str | None = None,
                  min_confidence: float | None = None) -> list[BeliefOut]:
    """The subject's beliefs within ``scope``: from the read model now, or folded from the
    stored events ``as_of`` an instant; 404 if the caller may see nothing of the subject."""
    if as_of is None:
        rows = queries.belief_rows(conn, subject_id, context, min_confidence, scope)
        found = [belief_out(r) for r in rows]
    else:
        if as_of.tzinfo is None:
            raise HTTPException(422, [{  # FastAPI's validation error shape, as documented
                "loc": ["query", "as_of"], "type": "value_error",
                "msg": "as_of needs a timezone, e.g. 2026-01-05T12:00Z"}])
        logged = load_subject_events(conn, subject_id)
        found = [
            computed_belief_out(b) for b in beliefs_as_of(
                logged, to_millis(as_of), time_axis, state.settings.fold_settings)
            if scope.allows(b.context)
            and (context is None or b.context == context)
            and (min_confidence is None or b.confidence >= min_confidence)
        ]
    if not found and not queries.subject_known(conn, subject_id, scope):
        raise unknown_subject(subject_id)
    return found


@router.get("/v1/subjects/{subject_id}/self-model", response_model=SelfModelOut,
         responses=READ_RESPONSES, tags=["handoff"])
def self_model(caller: Caller, subject_id: SubjectId, conn: Conn, state: State,
               as_of: AsOf = None, time: TimeAxis = "recorded",
               max_age_s: MaxAge = None) -> SelfModelOut:
    """Everything believed about the subject, grouped by context: each belief with its
    confidence, alternatives and the sources behind it. Now, or ``as_of`` a past
    instant (folded from the stored events; ``time`` picks the axis). Contexts the
    key may not read are left out, and with ``max_age_s`` beliefs older than that."""
    found = fetch_beliefs(conn, state, subject_id, as_of, time, read_scope(caller, state))
    found = with_age(found, max_age_s, as_of)
    contexts: dict[str, list[BeliefOut]] = {}
    for b in found:
        contexts.setdefault(b.context, []).append(b)
    record_access(state, caller, subject_id, "self-model", list(contexts), len(found), as_of=as_of)
    return SelfModelOut(subject_id=subject_id, contexts=contexts, belief_count=len(found),
                        as_of=as_of, time=time if as_of else None)

@router.get("/v1/subjects/{subject_id}/beliefs", response_model=BeliefsOut,
         responses=READ_RESPONSES, tags=["handoff"])
def subject_beliefs(
    caller: Caller,
    subject_id: SubjectId,
    conn: Conn,
    state: State,
    context: ContextFilter = None,
    min_confidence: Annotated[float | None, Query(
        ge=0.0, le=1.0, description="Only beliefs at least this confident, in [0, 1].")] = None,
    as_of: AsOf = None,
    time: TimeAxis = "recorded",
    max_age_s: MaxAge = None,
) -> BeliefsOut:
    """The subject's beliefs, optionally of one context, above a confidence and younger
    than ``max_age_s``; now or ``as_of`` a past instant. Contexts the key may not read
    are left out."""
    found = fetch_beliefs(conn, state, subject_id, as_of, time, read_scope(caller, state),
                     context, min_confidence)
    found = with_age(found, max_age_s, as_of)
    record_access(state, caller, subject_id, "beliefs", [b.context for b in found], len(found),
            as_of=as_of)
    return BeliefsOut(subject_id=subject_id, beliefs=found)
