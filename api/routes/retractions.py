"""Retraction ingest: ``POST /v1/retractions`` withdraws one of the caller's own
observations (an ``ObservationRetracted`` event, validated, produced, acknowledged).
"""

from __future__ import annotations

import uuid
from datetime import datetime

from fastapi import APIRouter, HTTPException

from beliefstore.api.deps import Caller, State
from beliefstore.api.models import ErrorOut, ReceiptOut, RetractionIn
from beliefstore.api.security import WRITE_RESPONSES, forbidden, require_own_source
from beliefstore.errors import ProduceError, ValidationError
from beliefstore.events.model import ObservationRetracted
from beliefstore.events.validation import validate
from beliefstore.timefmt import now_millis, to_millis

router = APIRouter()


@router.post("/v1/retractions", response_model=ReceiptOut, status_code=201,
             responses={**WRITE_RESPONSES,
                        422: {"description": "The retraction is invalid; the body names "
                                             "the field."},
                        503: {"model": ErrorOut, "description": "The broker did not "
                              "acknowledge."}},
             tags=["ingest"])
def post_retraction(caller: Caller, body: RetractionIn, state: State) -> ReceiptOut:
    """Withdraw the observation ``retracted_event_id`` of ``subject_id``. The retraction's
    source is the key's agent (a different ``source`` is a 403), and the fold applies it
    only if that agent made the observation (otherwise it is recorded and shown as
    ``retraction_ignored`` in the trace). The key needs a non-empty write scope.
    Returns the retraction's event id and Kafka coordinates once acknowledged; send the
    same ``event_id`` again to retry safely."""
    occurred = body.occurred_at
    if isinstance(occurred, datetime):
        if occurred.tzinfo is None:
            raise ValidationError.single("occurred_at", "needs a timezone, e.g. ...Z")
        occurred = to_millis(occurred)
    source = body.source if body.source is not None else caller.agent
    event = validate(ObservationRetracted(
        event_id=body.event_id or str(uuid.uuid4()), subject_id=body.subject_id,
        source=source, occurred_at=now_millis() if occurred is None else occurred,
        retracted_event_id=body.retracted_event_id, reason=body.reason,
    ))
    require_own_source(caller, source, "retractions",
                       "Leave source out: an agent retracts only its own observations")
    if not caller.unrestricted and not caller.write:
        raise forbidden(
            f"{caller.describe()} may not write (its write scope is empty); ask an admin "
            f"for a key made with `beliefstore keys create --agent {caller.agent} "
            "--write CONTEXTS`")
    try:
        receipt = state.producer().send(event)
    except ProduceError as exc:
        raise HTTPException(503, str(exc)) from exc
    return ReceiptOut(**receipt.__dict__)
