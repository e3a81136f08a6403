"""The HTTP API (FastAPI): handoff reads, traces, observation ingest and health.

Start it with ``beliefstore api`` (or as part of ``beliefstore up``); the OpenAPI
document is served at ``/openapi.json`` and browsable at ``/docs``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any, NoReturn

import sqlalchemy as sa
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse

from beliefstore.api import queries
from beliefstore.api.models import (
    BeliefOut,
    BeliefsOut,
    CheckOut,
    ErrorOut,
    HistoryEntryOut,
    HistoryOut,
    KafkaPosition,
    ObservationIn,
    ReadyOut,
    ReceiptOut,
    SelfModelOut,
    TraceEventOut,
    TraceOut,
)
from beliefstore.errors import ProduceError, ValidationError
from beliefstore.events.model import ObservationRecorded
from beliefstore.events.producer import BeliefProducer
from beliefstore.projector.catalog import CatalogError, ProjectionCatalog
from beliefstore.projector.fold import Belief, Key
from beliefstore.projector.store import load_events, load_subject_events
from beliefstore.projector.timeline import Axis, beliefs_as_of, history
from beliefstore.settings import Settings
from beliefstore.timefmt import from_millis, to_millis

NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorOut, "description": "Unknown subject or belief."}
}


class AppState:
    """What the endpoints depend on: settings, the projection catalog and a producer.

    The producer is created on first use, so reads work while the broker is down.
    """

    def __init__(self, settings: Settings, catalog: ProjectionCatalog,
                 producer: BeliefProducer | None = None):
        self.settings = settings
        self.catalog = catalog
        self._producer = producer
        self._lock = threading.Lock()

    def engine(self) -> sa.Engine:
        """The engine of the active projection's schema (blue/green: follows a switch)."""
        return self.catalog.engine(self.catalog.active().schema)

    def producer(self) -> BeliefProducer:
        with self._lock:
            if self._producer is None:
                self._producer = BeliefProducer.from_settings(self.settings)
            return self._producer

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close()


def _state(request: Request) -> AppState:
    return request.app.state.beliefstore


def _connection(state: Annotated[AppState, Depends(_state)]) -> Iterator[sa.Connection]:
    with state.engine().connect() as conn:
        yield conn


State = Annotated[AppState, Depends(_state)]
Conn = Annotated[sa.Connection, Depends(_connection)]
SubjectId = Annotated[str, Path(description="The subject (person) id.", max_length=256)]
AsOf = Annotated[datetime | None, Query(
    description="Answer as of this instant (ISO 8601 with timezone, e.g. 2026-01-05T12:00Z): "
    "the fold of the events up to it. Erasures always apply.")]
TimeAxis = Annotated[Axis, Query(
    description="recorded: events appended to the log by as_of (what the system believed "
    "then); occurred: events observed by as_of (what we now know was true then).")]


def _belief(row: sa.Row) -> BeliefOut:
    return BeliefOut(
        context=row.context, attribute=row.attribute, value=row.value,
        confidence=row.confidence, alternatives=row.alternatives, sources=row.sources,
        support=row.support, source_count=row.source_count,
        last_observed_at=row.last_observed_at, updated_at=row.updated_at,
    )


def _computed_belief(b: Belief) -> BeliefOut:
    return BeliefOut(
        context=b.context, attribute=b.attribute, value=b.value, confidence=b.confidence,
        alternatives=b.alternatives, sources=list(b.sources), support=list(b.support),
        source_count=b.source_count, last_observed_at=from_millis(b.last_observed_at),
        updated_at=None,
    )


def _no_key(conn: sa.Connection, subject_id: str, context: str, attribute: str) -> NoReturn:
    if not queries.subject_known(conn, subject_id):
        raise _unknown(subject_id)
    raise HTTPException(404, f"subject {subject_id!r} has no observations of {context}/{attribute}")


def _unknown(subject_id: str) -> HTTPException:
    return HTTPException(
        404,
        f"no beliefs or observations about subject {subject_id!r}: check the id, or wait "
        "for the projector to catch up if it was just observed",
    )


def create_app(settings: Settings, catalog: ProjectionCatalog,
               producer: BeliefProducer | None = None) -> FastAPI:
    """Build the API; it serves the catalog's active projection.

    Args:
        settings: topic and fold settings (for traces).
        catalog: the projection catalog (migrated, see :meth:`ProjectionCatalog.ensure`).
        producer: used by ``POST /v1/observations``; by default one is made from
            ``settings`` on the first POST.
    """
    state = AppState(settings, catalog, producer)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state.close()

    app = FastAPI(
        title="beliefstore",
        version="1",
        summary="What AI agents believe about the people they serve: self-models, "
        "traces and observation ingest.",
        lifespan=lifespan,
    )
    app.state.beliefstore = state

    @app.exception_handler(ValidationError)
    async def _invalid(request: Request, exc: ValidationError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": [
            {"loc": ["body", e.field], "msg": e.message, "type": "value_error"}
            for e in exc.errors
        ]})

    def _beliefs(conn: sa.Connection, state: AppState, subject_id: str, as_of: datetime | None,
                 time_axis: Axis, context: str | None = None,
                 min_confidence: float | None = None) -> list[BeliefOut]:
        if as_of is None:
            rows = queries.belief_rows(conn, subject_id, context, min_confidence)
            found = [_belief(r) for r in rows]
        else:
            if as_of.tzinfo is None:
                raise HTTPException(422, "as_of needs a timezone, e.g. 2026-01-05T12:00Z")
            logged = load_subject_events(conn, subject_id)
            found = [
                _computed_belief(b) for b in beliefs_as_of(
                    logged, to_millis(as_of), time_axis, state.settings.fold_settings)
                if (context is None or b.context == context)
                and (min_confidence is None or b.confidence >= min_confidence)
            ]
        if not found and not queries.subject_known(conn, subject_id):
            raise _unknown(subject_id)
        return found

    @app.get("/v1/subjects/{subject_id}/self-model", response_model=SelfModelOut,
             responses=NOT_FOUND, tags=["handoff"])
    def self_model(subject_id: SubjectId, conn: Conn, state: State, as_of: AsOf = None,
                   time: TimeAxis = "recorded") -> SelfModelOut:
        """Everything believed about the subject, grouped by context: each belief with its
        confidence, alternatives and the sources behind it. Now, or ``as_of`` a past
        instant (folded from the stored events; ``time`` picks the axis)."""
        found = _beliefs(conn, state, subject_id, as_of, time)
        contexts: dict[str, list[BeliefOut]] = {}
        for b in found:
            contexts.setdefault(b.context, []).append(b)
        return SelfModelOut(subject_id=subject_id, contexts=contexts, belief_count=len(found),
                            as_of=as_of, time=time if as_of else None)

    @app.get("/v1/subjects/{subject_id}/beliefs", response_model=BeliefsOut,
             responses=NOT_FOUND, tags=["handoff"])
    def subject_beliefs(
        subject_id: SubjectId,
        conn: Conn,
        state: State,
        context: Annotated[str | None, Query(description="Only this context.")] = None,
        min_confidence: Annotated[float | None, Query(
            ge=0.0, le=1.0, description="Only beliefs at least this confident, in [0, 1].")] = None,
        as_of: AsOf = None,
        time: TimeAxis = "recorded",
    ) -> BeliefsOut:
        """The subject's beliefs, optionally of one context and above a confidence; now or
        ``as_of`` a past instant."""
        found = _beliefs(conn, state, subject_id, as_of, time, context, min_confidence)
        return BeliefsOut(subject_id=subject_id, beliefs=found)

    @app.get("/v1/subjects/{subject_id}/beliefs/{context}/{attribute}/history",
             response_model=HistoryOut, responses=NOT_FOUND, tags=["audit"])
    def belief_history(subject_id: SubjectId, context: str, attribute: str, conn: Conn,
                       state: State) -> HistoryOut:
        """How the belief evolved: each (recorded_at, value, confidence) after an event
        that changed it, in log order, with that event."""
        key: Key = (subject_id, context, attribute)
        logged = load_events(conn, [key])
        if not any(isinstance(i.event, ObservationRecorded) for i in logged):
            _no_key(conn, subject_id, context, attribute)
        changes = history(logged, key, state.settings.fold_settings)
        return HistoryOut(subject_id=subject_id, context=context, attribute=attribute, changes=[
            HistoryEntryOut(
                recorded_at=from_millis(c.recorded_at), value=c.value, confidence=c.confidence,
                event_id=c.event.event_id, event_type=c.event.type, source=c.event.source,
                kafka_partition=c.partition, kafka_offset=c.offset)
            for c in changes
        ])

    @app.get("/v1/subjects/{subject_id}/beliefs/{context}/{attribute}/trace",
             response_model=TraceOut, responses=NOT_FOUND, tags=["audit"])
    def belief_trace(subject_id: SubjectId, context: str, attribute: str, conn: Conn,
                     state: State) -> TraceOut:
        """Every event of the belief's key, counting or not, and why not (superseded by
        the same source, retracted, erased), with weights and Kafka coordinates."""
        key: Key = (subject_id, context, attribute)
        fold_settings = state.settings.fold_settings
        t = queries.key_trace(conn, key, fold_settings)
        if not t.entries:
            _no_key(conn, subject_id, context, attribute)
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
        return TraceOut(
            subject_id=subject_id, context=context, attribute=attribute,
            belief=_belief(t.row) if t.row is not None else None,
            half_life_s=fold_settings.half_life_s(context),
            trust={s: fold_settings.trust_of(s) for s in sources},
            scores={v: math.fsum(ws) for v, ws in sorted(weights.items())},
            events=events,
        )

    @app.post("/v1/observations", response_model=ReceiptOut, status_code=201,
              responses={422: {"description": "The observation is invalid; the body names "
                                              "the field."},
                         503: {"model": ErrorOut, "description": "The broker did not "
                               "acknowledge."}},
              tags=["ingest"])
    def post_observation(body: ObservationIn, state: State) -> ReceiptOut:
        """Validate an observation (same rules as the SDK), produce it to Kafka and return
        its event id and Kafka coordinates once the broker has acknowledged it."""
        occurred = body.occurred_at
        if isinstance(occurred, datetime):
            if occurred.tzinfo is None:
                raise ValidationError.single("occurred_at", "needs a timezone, e.g. ...Z")
            occurred = to_millis(occurred)
        try:
            receipt = state.producer().observe(
                subject_id=body.subject_id, context=body.context, attribute=body.attribute,
                value=body.value, confidence=body.confidence, source=body.source,
                evidence=body.evidence, metadata=body.metadata, occurred_at=occurred,
                event_id=body.event_id,
            )
        except ProduceError as exc:
            raise HTTPException(503, str(exc)) from exc
        return ReceiptOut(**receipt.__dict__)

    @app.get("/healthz", tags=["operations"])
    def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=ReadyOut, tags=["operations"],
             responses={503: {"model": ReadyOut, "description": "A dependency is down."}})
    def readyz(state: State) -> JSONResponse:
        """Readiness: the database and the broker are reachable; reports projection lag."""
        lag = None
        try:
            with state.engine().connect() as conn:
                conn.execute(sa.text("SELECT 1"))
                lag = queries.projection_lag(conn, state.catalog.active().name,
                                             state.settings.topic)
            database = CheckOut(ok=True, detail="reachable")
        except (sa.exc.SQLAlchemyError, CatalogError) as exc:
            database = CheckOut(ok=False, detail=f"unreachable: {exc.__class__.__name__}")
        try:
            connected = state.producer().connected()
            broker = CheckOut(ok=connected, detail="reachable" if connected else "not connected")
        except Exception as exc:  # any client failure means not ready
            broker = CheckOut(ok=False, detail=f"unreachable: {exc}")
        body = ReadyOut(ready=database.ok and broker.ok, database=database, broker=broker,
                        projection_lag=lag)
        return JSONResponse(status_code=200 if body.ready else 503,
                            content=body.model_dump(mode="json"))

    return app
