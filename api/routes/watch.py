"""Watch: a subject's belief changes, live, as Server-Sent Events.

``GET /v1/subjects/{id}/watch`` streams one ``belief`` event per change of the
subject's beliefs (in contexts the key may read), fed by the projector's NOTIFY (no
polling): each event's ``id`` is ``<projection>:<change id>``, so a client that
reconnects with ``Last-Event-ID`` gets every change after it, without gaps or
duplicates (see :mod:`beliefstore.projector.changes` for why the ids are gap-free per
subject). A comment line is sent every ``heartbeat_s`` seconds while nothing happens.

Other events: ``ready`` (first, no id: the stream is live), ``projection`` (the API now
serves another projection after ``replay --switch``: changes continue from its newest
one), and ``error`` (the key was revoked or the database is unreachable; the stream ends).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, HTTPException, Query
from sse_starlette import EventSourceResponse, ServerSentEvent

from beliefstore.access.keys import AuthError
from beliefstore.access.scopes import Principal
from beliefstore.api.deps import (
    AppState,
    Caller,
    Credentials,
    State,
    SubjectId,
    scope_of,
    unknown_subject,
)
from beliefstore.api.live import Change, Unavailable
from beliefstore.api.security import READ_RESPONSES

router = APIRouter()

_EVENT_ID = re.compile(r"^(?P<projection>[a-z][a-z0-9_]{0,30}):(?P<id>[0-9]{1,19})$")
BATCH = 500
"""Changes read per query while catching up."""


def change_json(subject_id: str, projection: str, change: Change) -> str:
    """The ``data`` of a ``belief`` event: the belief as the change left it (``value``
    null: it is gone), its sources and the Kafka position of the batch."""
    return orjson.dumps({
        "subject_id": subject_id, "context": change.context, "attribute": change.attribute,
        "value": change.value, "confidence": change.confidence,
        "alternatives": change.alternatives, "sources": change.sources,
        "kafka": {"partition": change.partition, "offset": change.offset},
        "change_id": change.id, "projection": projection, "changed_at": change.changed_at,
    }).decode()


def parse_event_id(value: str) -> tuple[str, int]:
    """``"<projection>:<change id>"`` → ``(projection, id)``; 422 naming the header."""
    match = _EVENT_ID.match(value.strip())
    if not match:
        raise HTTPException(422, [{
            "loc": ["header", "Last-Event-ID"], "type": "value_error",
            "msg": f"Last-Event-ID {value[:80]!r} must be <projection>:<change id> as sent in "
                   "an event's id (e.g. self_model:1234); leave it out to start from now"}])
    return match["projection"], int(match["id"])


async def _caller_now(state: AppState, token: str | None, opened_by: Principal) -> Principal:
    """The caller re-checked (a revoked key ends the stream); the opener when auth is off."""
    if token is None or not state.settings.auth:
        return opened_by
    return (await state.live.authenticate(token)).principal()


@router.get("/v1/subjects/{subject_id}/watch", tags=["handoff"],
            response_class=EventSourceResponse,
            responses={**READ_RESPONSES, 200: {
                "description": "text/event-stream: `belief` events (data: the belief as "
                "changed, JSON), `ready`, `projection`, `error`; heartbeat comments.",
                "content": {"text/event-stream": {}}},
                422: {"description": "Malformed Last-Event-ID."}})
async def watch(
    caller: Caller,
    credentials: Credentials,
    subject_id: SubjectId,
    state: State,
    last_event_id: Annotated[str | None, Header(
        alias="Last-Event-ID",
        description="Resume after this event id (<projection>:<change id>).")] = None,
    heartbeat_s: Annotated[float, Query(
        ge=0.5, le=300, description="Seconds between heartbeat comments.")] = 15.0,
) -> EventSourceResponse:
    """Stream the subject's belief changes as Server-Sent Events, live (pushed by the
    projector's commits), filtered by the key's read scope; resume with `Last-Event-ID`.
    404 like a read when the key may see nothing of the subject."""
    live = state.live
    scope = scope_of(caller, await state.restricted_async(caller))
    active = await live.active()
    model = await live.self_model(active.schema, subject_id)
    if not await live.known(active.schema, model, scope):
        raise unknown_subject(subject_id)
    if last_event_id:
        projection, after = parse_event_id(last_event_id)
        if projection != active.name:  # another read model: its ids mean nothing here
            projection, after = active.name, await live.last_change(active.schema, subject_id)
    else:
        projection, after = active.name, await live.last_change(active.schema, subject_id)
    token = credentials.credentials if credentials is not None else None

    async def events() -> AsyncIterator[Any]:
        nonlocal projection, after
        wake = live.subscribe(subject_id)
        try:
            yield ServerSentEvent(event="ready", data=orjson.dumps({
                "subject_id": subject_id, "projection": projection,
                "after": f"{projection}:{after}"}).decode())
            while not live.closing:
                wake.clear()
                try:
                    now = await _caller_now(state, token, caller)
                    readable = scope_of(now, await state.restricted_async(now))
                    current = await live.active()
                    if current.name != projection:
                        projection = current.name
                        after = await live.last_change(current.schema, subject_id)
                        yield ServerSentEvent(event="projection", id=f"{projection}:{after}",
                                              data=orjson.dumps({"projection": projection}).decode())
                    changes = await live.changes_since(current.schema, subject_id, after, BATCH)
                except AuthError as exc:
                    yield ServerSentEvent(event="error", data=str(exc))
                    return
                except HTTPException as exc:  # the key may no longer read anything
                    yield ServerSentEvent(event="error", data=str(exc.detail))
                    return
                except Unavailable as exc:
                    yield ServerSentEvent(event="error", data=f"{exc}; reconnect with "
                                          "Last-Event-ID to resume", retry=1000)
                    return
                for change in changes:
                    after = change.id
                    if readable.allows(change.context):
                        yield ServerSentEvent(event="belief", id=f"{projection}:{change.id}",
                                              data=change_json(subject_id, projection, change))
                if len(changes) == BATCH or wake.is_set():
                    continue
                await wake.wait()
        finally:
            live.unsubscribe(subject_id, wake)

    return EventSourceResponse(events(), ping=heartbeat_s, send_timeout=30)
