"""Observation ingest: ``POST /v1/observations``, validated, produced, acknowledged.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from fastapi import APIRouter, HTTPException

from beliefstore.access.scopes import WILDCARD, format_scope
from beliefstore.api.deps import RETRY_AFTER_S, Caller, State
from beliefstore.api.models import (
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
from beliefstore.events.validation import validate
from beliefstore.timefmt import now_millis, to_millis

router = APIRouter()


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
    ``source`` must be the key's agent, and its context in the key's write scope."""
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
    try:
        receipt = state.producer().send(event)
    except ProduceError as exc:
        raise HTTPException(503, f"{exc}; retry later (with the same event_id the "
                            "retry is safe: events are deduplicated by event_id)",
                            headers={"Retry-After": str(RETRY_AFTER_S)}) from exc
    return ReceiptOut(**receipt.__dict__)
