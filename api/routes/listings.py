"""Read-only listings the web console needs: subjects by id prefix, the projections and
which one is served, and a subject's access log (admin keys only).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query

from beliefstore.access.accesslog import AccessLogError, read_access_log
from beliefstore.api import queries
from beliefstore.api.deps import Caller, Conn, State, SubjectId, SubjectPrefix, read_scope
from beliefstore.api.models import (
    AccessLogOut,
    AccessRecordOut,
    ErrorOut,
    ProjectionOut,
    SubjectSummaryOut,
)
from beliefstore.api.security import ADMIN_RESPONSES, AUTH_RESPONSES, forbidden
from beliefstore.timefmt import from_millis

router = APIRouter()


@router.get("/v1/subjects", response_model=list[SubjectSummaryOut], tags=["listings"],
            responses={**AUTH_RESPONSES, 403: {"model": ErrorOut,
                                               "description": "The key may read no context."}})
def find_subjects(
    caller: Caller, conn: Conn, state: State,
    prefix: SubjectPrefix = "",
    limit: Annotated[int, Query(ge=1, le=500, description="At most this many subjects.")] = 50,
    exact: Annotated[bool, Query(description="Only the subject whose id is prefix.")] = False,
) -> list[SubjectSummaryOut]:
    """Subjects with observations in the contexts the key may read, most recently observed
    first: counts, contexts and times, never values (not recorded in the access log)."""
    scope = read_scope(caller, state)
    return [SubjectSummaryOut(
        subject_id=r.subject_id, contexts=sorted(r.contexts), keys=sorted(r.keys),
        observations=r.observations,
        beliefs=r.beliefs, last_observed_at=r.last_observed_at, changed_at=r.changed_at,
        erased=r.erased) for r in queries.subject_summaries(conn, prefix, limit, scope, exact)]


@router.get("/v1/projections", response_model=list[ProjectionOut], responses=AUTH_RESPONSES,
            tags=["listings"])
def projections(caller: Caller, state: State) -> list[ProjectionOut]:
    """The read models (projections) of the catalog; ``active`` marks the one the API
    serves (`beliefstore projections switch` changes it)."""
    return [ProjectionOut(name=p.name, schema_name=p.schema, active=p.active, status=p.status,
                          created_at=p.created_at, switched_at=p.switched_at)
            for p in state.catalog.list()]


@router.get("/v1/subjects/{subject_id}/access-log", response_model=AccessLogOut,
            responses={**ADMIN_RESPONSES, 503: {"model": ErrorOut,
                                                "description": "The access topic cannot be read."}},
            tags=["listings"])
def access_log(caller: Caller, subject_id: SubjectId, state: State) -> AccessLogOut:
    """Which agents read the subject's beliefs, from the access topic (admin keys only);
    the same records as `beliefstore access-log --subject S`."""
    if not caller.admin:
        raise forbidden(f"{caller.describe()} is not an admin key; the access log is for admin "
                        "keys (`beliefstore keys create --agent NAME --admin`)")
    topic = state.settings.access_topic
    try:
        records, skipped = read_access_log(state.settings, subject_id, timeout_s=10.0)
    except AccessLogError as exc:
        if "does not exist" in str(exc):  # nothing was ever read: an empty log
            records, skipped = [], 0
        else:
            raise HTTPException(503, f"cannot read the access log: {exc}") from None
    return AccessLogOut(subject_id=subject_id, topic=topic, skipped=skipped, records=[
        AccessRecordOut(at=from_millis(r.at), agent=r.agent, key_id=r.key_id, endpoint=r.endpoint,
                        contexts=list(r.contexts), attribute=r.attribute, as_of=r.as_of,
                        count=r.count, partition=r.partition, offset=r.offset)
        for r in records])
