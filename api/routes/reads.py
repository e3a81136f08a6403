"""Handoff reads: a subject's self-model and beliefs, now or as of an instant.

Reads of *now* take the async path (:mod:`beliefstore.api.live`): the key, the
restricted contexts, the active projection and the subject's rendered self-model come
from memory when cached, else from one query each through an async pool; the body is
written with orjson. ``as_of`` reads fold stored events in a worker thread.
"""

from __future__ import annotations

import re
import time as time_module
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import parse_qsl

import orjson
import sqlalchemy as sa
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from beliefstore.access.scopes import ContextScope, Principal
from beliefstore.api import queries
from beliefstore.api.deps import (
    AppState,
    AsOf,
    Caller,
    ContextFilter,
    State,
    SubjectId,
    TimeAxis,
    bearer_caller,
    record_access,
    scope_of,
    unavailable,
    unknown_subject,
)
from beliefstore.api.live import SelfModel, Unavailable
from beliefstore.api.metrics import RouteTemplate
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
from beliefstore.events.validation import MAX_ID_LENGTH, MAX_NAME_LENGTH, check_id, check_name
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
    if as_of is None:
        return _json(await self_model_now(state, caller, subject_id, max_age_s))
    scope = scope_of(caller, await state.restricted_async(caller))
    active = await state.live.active()
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
    if as_of is None:
        return _json(await beliefs_now(state, caller, subject_id, context, min_confidence,
                                       max_age_s))
    scope = scope_of(caller, await state.restricted_async(caller))
    active = await state.live.active()
    found = await run_in_threadpool(_as_of, state, active.schema, subject_id, as_of, time,
                                    scope, context, min_confidence)
    found = with_age(found, max_age_s, as_of)
    record_access(state, caller, subject_id, "beliefs", [b.context for b in found],
                  len(found), as_of=as_of)
    return _json(orjson.dumps(BeliefsOut(subject_id=subject_id, beliefs=found)
                              .model_dump(mode="json")))


async def _visible_model(state: AppState, caller: Principal,
                         subject_id: str) -> tuple[SelfModel, ContextScope]:
    """The subject's cached self-model in the active projection and ``caller``'s read
    scope, after the 404 when the caller may see nothing of the subject.

    Raises:
        HTTPException: 403 (the key reads no context), 404 (nothing the caller may see).
        Unavailable: the database did not answer (503).
    """
    scope = scope_of(caller, await state.restricted_async(caller))
    active = await state.live.active()
    model = await state.live.self_model(active.schema, subject_id)
    if not model.count(scope) and not await state.live.known(active.schema, model, scope):
        raise unknown_subject(subject_id)
    return model, scope


async def self_model_now(state: AppState, caller: Principal, subject_id: str,
                         max_age_s: float | None) -> bytes:
    """The ``SelfModelOut`` JSON of the subject now, as ``caller`` may see it, from the live
    caches or one query (and the access-log entry of the read).

    Raises:
        HTTPException: 403 (the key reads no context), 404 (nothing the caller may see).
        Unavailable: the database did not answer (503).
    """
    model, scope = await _visible_model(state, caller, subject_id)
    body, names, count = model.self_model_json(scope, time_module.time(), max_age_s)
    record_access(state, caller, subject_id, "self-model", names, count)
    return body


async def beliefs_now(state: AppState, caller: Principal, subject_id: str, context: str | None,
                      min_confidence: float | None, max_age_s: float | None) -> bytes:
    """The ``BeliefsOut`` JSON of the subject now (optionally of one ``context``, at least
    ``min_confidence``, at most ``max_age_s`` seconds old), as ``caller`` may see it.

    Raises:
        HTTPException: 403 (the key reads no context), 404 (nothing the caller may see).
        Unavailable: the database did not answer (503).
    """
    model, scope = await _visible_model(state, caller, subject_id)
    body, contexts = model.beliefs_json(scope, context, min_confidence, time_module.time(),
                                        max_age_s)
    record_access(state, caller, subject_id, "beliefs", contexts, len(contexts))
    return b'{"subject_id":' + orjson.dumps(subject_id) + b',"beliefs":' + body + b"}"


# -- the lean lane -------------------------------------------------------------------------

_PREFIX = "/v1/subjects/"
_NUMBER = re.compile(r"\d{1,15}(\.\d{1,15})?")  # what the lane parses itself


_SELF_MODEL = RouteTemplate("/v1/subjects/{subject_id}/self-model")
_BELIEFS = RouteTemplate("/v1/subjects/{subject_id}/beliefs")


class HotReads:
    """Pure ASGI middleware answering the common handoff reads of *now* without FastAPI's
    per-request work (dependency resolution, parameter models, response wrapping).

    It takes ``GET /v1/subjects/{id}/self-model`` (query: at most ``max_age_s``) and
    ``GET /v1/subjects/{id}/beliefs`` (query: at most ``context``, ``min_confidence``,
    ``max_age_s``, each once) with authentication on and a ``Bearer`` key, when every
    parameter passes the same checks as the FastAPI route's (ids by
    :func:`~beliefstore.events.validation.check_id`, names by ``check_name``, numbers as
    plain decimals within bounds). It then runs exactly the route's code for a read of now
    (:func:`bearer_caller`, :func:`self_model_now`, :func:`beliefs_now`: same 401/403/404/
    429/503 answers, scopes, restricted contexts, ``age_s``, access log). Everything else —
    a parameter that is invalid (so FastAPI's 422 names it) or unusual (``as_of``,
    ``time``, another parameter, a repeated one), no key or a console cookie, auth off —
    goes on to the FastAPI route unchanged; the OpenAPI document describes both.

    Args:
        app: the next ASGI app.
        state: the API's :class:`AppState`.
    """

    def __init__(self, app: ASGIApp, state: AppState):
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "GET" or scope.get("root_path"):
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if not path.startswith(_PREFIX):
            await self.app(scope, receive, send)
            return
        if path.endswith("/self-model"):
            template, subject_id = _SELF_MODEL, path[len(_PREFIX):-len("/self-model")]
        elif path.endswith("/beliefs"):
            template, subject_id = _BELIEFS, path[len(_PREFIX):-len("/beliefs")]
        else:
            await self.app(scope, receive, send)
            return
        token = _bearer(scope) if self.state.settings.auth else None
        query = _query(scope["query_string"], template is _BELIEFS)
        if token is None or query is None or "/" in subject_id or len(subject_id) > MAX_ID_LENGTH \
                or check_id("subject_id", subject_id):
            await self.app(scope, receive, send)
            return
        scope["route"] = template  # the metrics' label, as for the FastAPI route
        state = self.state
        client = scope.get("client")
        try:
            caller = await bearer_caller(state, client[0] if client else "unknown", token)
            if template is _SELF_MODEL:
                body = await self_model_now(state, caller, subject_id, query.get("max_age_s"))
            else:
                body = await beliefs_now(state, caller, subject_id, query.get("context"),
                                         query.get("min_confidence"), query.get("max_age_s"))
        except HTTPException as exc:
            await _error(scope, receive, send, exc)
            return
        except Unavailable as exc:
            await _error(scope, receive, send, unavailable(str(exc)))
            return
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode("ascii"))]})
        await send({"type": "http.response.body", "body": body})


def _bearer(scope: Scope) -> str | None:
    """The credentials of the first ``Authorization: Bearer <credentials>`` header (as
    FastAPI's ``HTTPBearer`` reads it), else ``None``."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            return bearer_credentials(value)
    return None


def bearer_credentials(value: bytes) -> str | None:
    """The credentials of an ``Authorization`` header's raw value if it is
    ``Bearer <credentials>`` (scheme case-insensitive, as FastAPI's ``HTTPBearer``), else
    ``None``."""
    scheme, _, credentials = value.decode("latin-1").partition(" ")
    credentials = credentials.strip()
    return credentials if scheme.lower() == "bearer" and credentials else None


def _query(raw: bytes, beliefs: bool) -> dict[str, Any] | None:
    """The lane's parameters from a query string, checked; ``None``: leave the request to
    the FastAPI route (invalid, repeated, unknown or past-view parameters)."""
    if not raw:
        return {}
    out: dict[str, Any] = {}
    for name, value in parse_qsl(raw.decode("latin-1"), keep_blank_values=True):
        if name in out:
            return None
        if name == "max_age_s":
            if not _NUMBER.fullmatch(value) or not float(value) > 0:
                return None
            out[name] = float(value)
        elif beliefs and name == "min_confidence":
            if not _NUMBER.fullmatch(value) or not 0.0 <= float(value) <= 1.0:
                return None
            out[name] = float(value)
        elif beliefs and name == "context":
            if len(value) > MAX_NAME_LENGTH or check_name("context", value):
                return None
            out[name] = value
        else:
            return None
    return out


async def _error(scope: Scope, receive: Receive, send: Send, exc: HTTPException) -> None:
    """Answer ``exc`` as the app's exception handler does (``{"detail": ...}``, headers)."""
    response = await http_exception_handler(Request(scope, receive), exc)
    await response(scope, receive, send)
