"""Observation ingest: ``POST /v1/observations`` and ``POST /v1/observations:batch``,
validated, produced, acknowledged.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from fastapi import APIRouter, HTTPException
from pydantic import ValidationError as PydanticValidationError

from beliefstore.access.scopes import WILDCARD, Principal, format_scope
from beliefstore.api.deps import RETRY_AFTER_S, AppState, Caller, State
from beliefstore.api.models import (
    BatchIn,
    BatchItemOut,
    BatchOut,
    ErrorOut,
    ObservationIn,
    ReceiptOut,
)
from beliefstore.api.security import (
    WRITE_RESPONSES,
    forbidden,
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
        raise HTTPException(503, f"{exc}; retry later (with the same event_id the "
                            "retry is safe: events are deduplicated by event_id)",
                            headers={"Retry-After": str(RETRY_AFTER_S)}) from exc
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
        if event.source != caller.agent:
            raise forbidden(
                f"source {event.source!r} is not this key's agent: observations posted with "
                f"{caller.describe()} must have source {caller.agent!r}. An agent records "
                f"only its own observations; {event.source!r} needs its own key")
        restricted = state.restricted(caller)
        if not caller.may_write(event.context, restricted):
            why = (f"context {event.context!r} is restricted and * does not cover it"
                   if event.context in restricted and WILDCARD in caller.write else
                   f"context {event.context!r} is not in its write scope "
                   f"({format_scope(caller.write)})")
            raise forbidden(
                f"{caller.describe()} may not write context {event.context!r}: {why}; ask "
                f"an admin for a key made with `beliefstore keys create --agent "
                f"{caller.agent} --write {event.context}`")
    return event
