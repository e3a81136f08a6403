"""Observation ingest: ``POST /v1/observations`` and ``POST /v1/observations:batch``,
validated, produced, acknowledged.
"""

from __future__ import annotations

import uuid
from datetime import datetime

import orjson
from fastapi import APIRouter, HTTPException
from pydantic import ValidationError as PydanticValidationError
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from beliefstore.access.scopes import WILDCARD, Principal, format_scope
from beliefstore.api.deps import (
    RETRY_AFTER_S,
    AppState,
    Caller,
    State,
    bearer_caller,
    unavailable,
)
from beliefstore.api.live import Unavailable
from beliefstore.api.metrics import RouteTemplate
from beliefstore.api.models import (
    BatchIn,
    BatchItemOut,
    BatchOut,
    ErrorOut,
    ObservationIn,
    ReceiptOut,
)
from beliefstore.api.routes.reads import _error, bearer_credentials
from beliefstore.api.security import (
    WRITE_RESPONSES,
    forbidden,
    require_own_source,
)
from beliefstore.errors import ProduceError, ValidationError
from beliefstore.events.model import ObservationRecorded
from beliefstore.events.producer import Receipt
from beliefstore.events.validation import validate
from beliefstore.timefmt import now_millis, to_millis

router = APIRouter()

#: Most observations in one ``POST /v1/observations:batch``.
MAX_BATCH = 500
#: Largest body of a batch request, bytes (500 observations of up to ~16 KiB of JSON);
#: the other endpoints keep BELIEFSTORE_MAX_BODY_BYTES.
BATCH_MAX_BYTES = 8 * 1024 * 1024


@router.post("/v1/observations", response_model=ReceiptOut, status_code=201,
          responses={**WRITE_RESPONSES,
                     422: {"description": "The observation is invalid; the body names "
                                          "the field."},
                     503: {"model": ErrorOut, "description": "The broker did not "
                           "acknowledge."}},
          tags=["ingest"])
def post_observation(caller: Caller, body: ObservationIn, state: State) -> ReceiptOut:
    """Validate an observation (same rules as the SDK), produce it to Kafka and return
    its event id and Kafka coordinates once the broker has acknowledged it. Its
    ``source`` must be the key's agent, and its context in the key's write scope.

    Concurrent requests share a produce request (one record batch per partition); each
    is answered only once the broker has acknowledged its own event."""
    event = _event(caller, body, state)
    try:
        receipt = state.producer().send(event)
    except ProduceError as exc:
        raise _broker_down(exc) from exc
    return ReceiptOut(**receipt.__dict__)


@router.post("/v1/observations:batch", response_model=BatchOut, status_code=200,
             responses={**WRITE_RESPONSES,
                        413: {"model": ErrorOut, "description": f"More than {MAX_BATCH} "
                              "observations, or a body over the batch limit: nothing is "
                              "produced."}},
             tags=["ingest"])
def post_observations_batch(caller: Caller, body: BatchIn, state: State) -> BatchOut:
    """Record up to 500 observations in one request: one result per item, in order, with
    the item's own status: 201 and its receipt, 422 with the fields that are wrong, 403
    when the key may not write it, or 503 when the broker did not acknowledge it. The
    valid items are produced together (one record batch per partition) and each 201 is
    given only after the broker acknowledged that event (``acks=all``); invalid items
    are never produced and do not stop the valid ones."""
    if len(body.observations) > MAX_BATCH:
        raise HTTPException(413, f"{len(body.observations)} observations in one batch; the "
                            f"limit is {MAX_BATCH}: split it into several requests")
    results: list[BatchItemOut | None] = [None] * len(body.observations)
    events: list[tuple[int, ObservationRecorded]] = []
    for i, raw in enumerate(body.observations):
        try:
            item = ObservationIn.model_validate(raw)
            events.append((i, _event(caller, item, state)))
        except PydanticValidationError as exc:
            results[i] = BatchItemOut(status=422, errors=[
                {"loc": ["body", "observations", i, *e["loc"]], "msg": e["msg"],
                 "type": e["type"]} for e in exc.errors(include_url=False)])
        except ValidationError as exc:
            results[i] = BatchItemOut(status=422, errors=[
                {"loc": ["body", "observations", i, e.field], "msg": e.message,
                 "type": "value_error"} for e in exc.errors])
        except HTTPException as exc:
            results[i] = BatchItemOut(status=exc.status_code, detail=str(exc.detail))
    if events:
        try:
            sent = state.producer().send_each([e for _, e in events])
        except ProduceError as exc:
            sent = [exc] * len(events)
        for (i, _), outcome in zip(events, sent, strict=True):
            results[i] = (BatchItemOut(status=201, receipt=ReceiptOut(**outcome.__dict__))
                          if isinstance(outcome, Receipt)
                          else BatchItemOut(status=503, detail=str(outcome)))
    done = [r for r in results if r is not None]
    return BatchOut(accepted=sum(r.status == 201 for r in done),
                    rejected=sum(r.status != 201 for r in done), results=done)


def _event(caller: Principal, body: ObservationIn, state: AppState) -> ObservationRecorded:
    """The validated event of ``body``, once ``caller`` may write it.

    Raises:
        ValidationError: a field is invalid (422).
        HTTPException: 403, the key may not write this source or context.
    """
    occurred = body.occurred_at
    if isinstance(occurred, datetime):
        if occurred.tzinfo is None:
            raise ValidationError.single("occurred_at", "needs a timezone, e.g. ...Z")
        occurred = to_millis(occurred)
    event = validate(ObservationRecorded(
        event_id=body.event_id or str(uuid.uuid4()), subject_id=body.subject_id,
        source=body.source, occurred_at=now_millis() if occurred is None else occurred,
        context=body.context, attribute=body.attribute, value=body.value,
        confidence=body.confidence, evidence=body.evidence,
        metadata=dict(body.metadata) if body.metadata is not None else {},
    ))
    if not caller.unrestricted:
        check_writable(caller, event, state.restricted(caller))
    return event


def check_writable(caller: Principal, event: ObservationRecorded,
                   restricted: frozenset[str]) -> None:
    """403 unless ``caller`` may post ``event``: its source is the key's agent and its
    context is in the key's write scope (``restricted``: the restricted contexts, which
    ``*`` does not cover).

    Raises:
        HTTPException: 403, naming the source or context and the fix.
    """
    require_own_source(caller, event.source, "observations",
                       f"An agent records only its own observations; {event.source!r} "
                       "needs its own key")
    if not caller.unrestricted and not caller.may_write(event.context, restricted):
        why = (f"context {event.context!r} is restricted and * does not cover it"
               if event.context in restricted and WILDCARD in caller.write else
               f"context {event.context!r} is not in its write scope "
               f"({format_scope(caller.write)})")
        raise forbidden(
            f"{caller.describe()} may not write context {event.context!r}: {why}; ask "
            f"an admin for a key made with `beliefstore keys create --agent "
            f"{caller.agent} --write {event.context}`")


# -- the lean lane -------------------------------------------------------------------------

_POST_PATH = "/v1/observations"
#: The body fields the lane builds an event from: what :class:`ObservationIn` allows.
_FIELDS = frozenset(ObservationIn.model_fields)
_REQUIRED_TEXT = ("subject_id", "context", "attribute", "value", "source")


_POST_TEMPLATE = RouteTemplate(_POST_PATH)


class HotIngest:
    """Pure ASGI middleware answering ``POST /v1/observations`` without FastAPI's
    per-request work (dependency resolution, the pydantic body and response models, the
    hop of a sync route): it parses the body with orjson, builds and validates the event
    with the route's own rules (:func:`~beliefstore.events.validation.validate`), checks
    the key like the route (:func:`bearer_caller`: 401/429/503; :func:`check_writable`:
    403 naming the source or context), produces it through the same group-committing
    producer and answers ``201`` with the :class:`ReceiptOut` JSON only once the broker
    has acknowledged the event (``acks=all``), or ``503`` with ``Retry-After`` as the route
    does. The metrics see the route's template.

    It takes only requests whose body is a JSON object of exactly the types the route's
    model accepts in strict mode (strings; ``confidence`` a number; ``occurred_at`` an
    integer or absent; ``metadata`` an object of strings) and whose event is valid, with
    authentication on, a ``Bearer`` key and ``Content-Type: application/json``. Everything
    else — an invalid field (so the route's 422 names it), an ISO 8601 ``occurred_at``,
    unparseable JSON, no key, auth off — goes on to the FastAPI route with the body
    unchanged. It must sit inside :class:`~beliefstore.api.security.BodyLimitMiddleware`
    (the body it reads is already within the limit).

    Args:
        app: the next ASGI app.
        state: the API's :class:`AppState`.
    """

    def __init__(self, app: ASGIApp, state: AppState):
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" \
                or scope["path"] != _POST_PATH or scope.get("root_path") \
                or not self.state.settings.auth:
            await self.app(scope, receive, send)
            return
        token, json_body = _headers(scope)
        if token is None or not json_body:
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        chunks: list[bytes] = []
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        event = _lane_event(b"".join(chunks)) if messages[-1]["type"] == "http.request" \
            else None
        if event is None:
            await self.app(scope, replay, send)
            return
        scope["route"] = _POST_TEMPLATE  # the metrics' label, as for the FastAPI route
        state = self.state
        client = scope.get("client")
        try:
            caller = await bearer_caller(state, client[0] if client else "unknown", token)
            check_writable(caller, event, await state.restricted_async(caller))
        except HTTPException as exc:
            await _error(scope, replay, send, exc)
            return
        except Unavailable as exc:
            await _error(scope, replay, send, unavailable(str(exc)))
            return
        try:
            receipt = await run_in_threadpool(_send, state, event)
        except ProduceError as exc:
            await _error(scope, replay, send, _broker_down(exc))
            return
        body = orjson.dumps({"event_id": receipt.event_id, "topic": receipt.topic,
                             "partition": receipt.partition, "offset": receipt.offset})
        await send({"type": "http.response.start", "status": 201, "headers": [
            (b"content-length", str(len(body)).encode("ascii")),
            (b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


def _send(state: AppState, event: ObservationRecorded) -> Receipt:
    """Produce ``event`` and wait for its acknowledgement (in a worker thread)."""
    return state.producer().send(event)


def _broker_down(exc: ProduceError) -> HTTPException:
    """The 503 of an event the broker did not acknowledge."""
    return HTTPException(503, f"{exc}; retry later (with the same event_id the retry is "
                         "safe: events are deduplicated by event_id)",
                         headers={"Retry-After": str(RETRY_AFTER_S)})


def _headers(scope: Scope) -> tuple[str | None, bool]:
    """The bearer credentials (as :func:`beliefstore.api.routes.reads._bearer`) and whether
    the body is declared ``application/json``."""
    token: str | None = None
    seen_auth = json_body = False
    for name, value in scope["headers"]:
        if name == b"authorization" and not seen_auth:
            seen_auth = True
            token = bearer_credentials(value)
        elif name == b"content-type":
            json_body = value.split(b";", 1)[0].strip().lower() == b"application/json"
    return token, json_body


def _lane_event(raw: bytes) -> ObservationRecorded | None:
    """The valid event of a POST body, or ``None``: leave the request to the FastAPI route
    (not JSON, unusual types, or any field the route would refuse)."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if type(body) is not dict or not _FIELDS.issuperset(body):
        return None
    for name in _REQUIRED_TEXT:
        if type(body.get(name)) is not str:
            return None
    confidence = body.get("confidence")
    if type(confidence) not in (float, int):
        return None
    for name in ("evidence", "event_id"):
        if body.get(name) is not None and type(body[name]) is not str:
            return None
    metadata = body.get("metadata")
    if metadata is not None and (type(metadata) is not dict
                                 or any(type(v) is not str for v in metadata.values())):
        return None
    occurred = body.get("occurred_at")
    if occurred is not None and type(occurred) is not int:
        return None
    try:
        return validate(ObservationRecorded(  # type: ignore[return-value]
            event_id=body.get("event_id") or str(uuid.uuid4()),
            subject_id=body["subject_id"], source=body["source"],
            occurred_at=now_millis() if occurred is None else occurred,
            context=body["context"], attribute=body["attribute"], value=body["value"],
            confidence=confidence, evidence=body.get("evidence"),
            metadata=metadata if metadata is not None else {}))
    except ValidationError:
        return None
