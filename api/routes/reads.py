"""Handoff reads: a subject's self-model and beliefs, now or as of an instant.

Reads of *now* take the async path (:mod:`beliefstore.api.live`): the key, the
restricted contexts, the active projection and the subject's rendered self-model come
from memory when cached, else from one query each through an async pool; the body is
written with orjson. ``as_of`` reads fold stored events in a worker thread.
"""

from __future__ import annotations

import time as time_module
from datetime import datetime
from typing import Annotated

import orjson
import sqlalchemy as sa
from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from beliefstore.access.scopes import ContextScope
from beliefstore.api import queries
from beliefstore.api.deps import (
    AppState,
    AsOf,
    Caller,
    ContextFilter,
    State,
    SubjectId,
    TimeAxis,
    record_access,
    scope_of,
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


def _as_of(state: AppState, schema: str, subject_id: str, as_of: datetime, time_axis: Axis,
           scope: ContextScope, context: str | None = None,
           min_confidence: float | None = None) -> list[BeliefOut]:
    """:func:`fetch_beliefs` of a past instant, on a connection of its own (a worker thread)."""
    engine = state.catalog.engine(schema).execution_options(isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        return fetch_beliefs(conn, state, subject_id, as_of, time_axis, scope, context,
                             min_confidence)


def _json(body: bytes) -> Response:
    return Response(body, media_type="application/json")


@router.get("/v1/subjects/{subject_id}/self-model", response_model=SelfModelOut,
         responses=READ_RESPONSES, tags=["handoff"])
async def self_model(caller: Caller, subject_id: SubjectId, state: State,
                     as_of: AsOf = None, time: TimeAxis = "recorded",
                     max_age_s: MaxAge = None) -> Response:
    """Everything believed about the subject, grouped by context: each belief with its
    confidence, alternatives, the sources behind it and its ``age_s``. Now, or ``as_of`` a
    past instant (folded from the stored events; ``time`` picks the axis). Contexts the
    key may not read are left out, and with ``max_age_s`` beliefs older than that."""
    scope = scope_of(caller, await state.restricted_async(caller))
    active = await state.live.active()
    if as_of is not None:
        found = await run_in_threadpool(_as_of, state, active.schema, subject_id, as_of, time,
                                        scope)
        found = with_age(found, max_age_s, as_of)
        contexts: dict[str, list[BeliefOut]] = {}
        for b in found:
            contexts.setdefault(b.context, []).append(b)
        record_access(state, caller, subject_id, "self-model", list(contexts), len(found),
                      as_of=as_of)
        out = SelfModelOut(subject_id=subject_id, contexts=contexts, belief_count=len(found),
                           as_of=as_of, time=time)
        return _json(orjson.dumps(out.model_dump(mode="json")))
    model = await state.live.self_model(active.schema, subject_id)
    if not model.count(scope) and not await state.live.known(active.schema, model, scope):
        raise unknown_subject(subject_id)
    body, names, count = model.self_model_json(scope, time_module.time(), max_age_s)
    record_access(state, caller, subject_id, "self-model", names, count)
    return _json(body)


@router.get("/v1/subjects/{subject_id}/beliefs", response_model=BeliefsOut,
         responses=READ_RESPONSES, tags=["handoff"])
async def subject_beliefs(
    caller: Caller,
    subject_id: SubjectId,
    state: State,
    context: ContextFilter = None,
    min_confidence: Annotated[float | None, Query(
        ge=0.0, le=1.0, description="Only beliefs at least this confident, in [0, 1].")] = None,
    as_of: AsOf = None,
    time: TimeAxis = "recorded",
    max_age_s: MaxAge = None,
) -> Response:
    """The subject's beliefs, optionally of one context, above a confidence and younger
    than ``max_age_s``; now or ``as_of`` a past instant. Contexts the key may not read
    are left out."""
    scope = scope_of(caller, await state.restricted_async(caller))
    active = await state.live.active()
    if as_of is not None:
        found = await run_in_threadpool(_as_of, state, active.schema, subject_id, as_of, time,
                                        scope, context, min_confidence)
        found = with_age(found, max_age_s, as_of)
        record_access(state, caller, subject_id, "beliefs", [b.context for b in found],
                      len(found), as_of=as_of)
        return _json(orjson.dumps(BeliefsOut(subject_id=subject_id, beliefs=found)
                                  .model_dump(mode="json")))
    model = await state.live.self_model(active.schema, subject_id)
    if not model.count(scope) and not await state.live.known(active.schema, model, scope):
        raise unknown_subject(subject_id)
    body, contexts = model.beliefs_json(scope, context, min_confidence, time_module.time(),
                                        max_age_s)
    record_access(state, caller, subject_id, "beliefs", contexts, len(contexts))
    return _json(b'{"subject_id":' + orjson.dumps(subject_id) + b',"beliefs":' + body + b"}")
