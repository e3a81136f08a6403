"""The HTTP API (FastAPI): handoff reads, traces, observation ingest and health.

Start it with ``beliefstore api`` (or as part of ``beliefstore up``); the OpenAPI
document is served at ``/openapi.json`` and browsable at ``/docs``.
"""

from __future__ import annotations

import math
import threading
import uuid
from collections.abc import Iterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, NoReturn

import sqlalchemy as sa
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials
from starlette.exceptions import HTTPException as StarletteHTTPException

from beliefstore.access.accesslog import AccessLogger
from beliefstore.access.keys import AuthError, KeyStore
from beliefstore.access.ratelimit import RateLimiter
from beliefstore.access.scopes import ANONYMOUS, WILDCARD, ContextScope, Principal, format_scope
from beliefstore.api import queries
from beliefstore.api.models import (
    BeliefOut,
    BeliefsOut,
    CheckOut,
    ErrorOut,
    HistoryEntryOut,
    HistoryOut,
    KafkaPosition,
    KeyOut,
    ObservationIn,
    ReadyOut,
    ReceiptOut,
    SelfModelOut,
    TraceEventOut,
    TraceOut,
    WhoAmIOut,
)
from beliefstore.api.security import (
    ADMIN_RESPONSES,
    AUTH_RESPONSES,
    READ_RESPONSES,
    TRACE_RESPONSES,
    WRITE_RESPONSES,
    BodyLimitMiddleware,
    bearer,
    forbidden,
    too_many_requests,
    unauthorized,
)
from beliefstore.errors import ProduceError, ValidationError
from beliefstore.events.model import ObservationRecorded
from beliefstore.events.producer import BeliefProducer
from beliefstore.events.validation import validate
from beliefstore.projector.catalog import CatalogError, ProjectionCatalog
from beliefstore.projector.fold import Belief, Key
from beliefstore.projector.store import load_events, load_subject_events
from beliefstore.projector.timeline import Axis, beliefs_as_of, history
from beliefstore.settings import Settings
from beliefstore.timefmt import from_millis, now_millis, to_millis


class AppState:
    """What the endpoints depend on: settings, the projection catalog, a producer, the API
    keys, the rate limiter and the access log.

    The producer is created on first use, so reads work while the broker is down.
    """

    def __init__(self, settings: Settings, catalog: ProjectionCatalog,
                 producer: BeliefProducer | None = None):
        self.settings = settings
        self.catalog = catalog
        self.keys = KeyStore.of_catalog(catalog)
        self.limiter = RateLimiter(settings.rate_limit, settings.rate_burst)
        self.access = AccessLogger(settings)
        self._producer = producer
        self._lock = threading.Lock()

    def engine(self) -> sa.Engine:
        """The engine of the active projection's schema (blue/green: follows a switch).

        Reads run in autocommit: one round trip per query, no BEGIN/ROLLBACK around them.
        """
        return self.catalog.engine(self.catalog.active().schema).execution_options(
            isolation_level="AUTOCOMMIT")

    def producer(self) -> BeliefProducer:
        with self._lock:
            if self._producer is None:
                self._producer = BeliefProducer.from_settings(self.settings)
            return self._producer

    def close(self) -> None:
        self.access.close()
        if self._producer is not None:
            self._producer.close()

    def restricted(self, caller: Principal) -> frozenset[str]:
        """The restricted contexts, when they matter to ``caller`` (``*`` scopes)."""
        return self.keys.restricted() if caller.needs_restricted else frozenset()


def _state(request: Request) -> AppState:
    return request.app.state.beliefstore


def _connection(state: Annotated[AppState, Depends(_state)]) -> Iterator[sa.Connection]:
    with state.engine().connect() as conn:
        yield conn


State = Annotated[AppState, Depends(_state)]
Conn = Annotated[sa.Connection, Depends(_connection)]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def _caller(request: Request, state: State, credentials: Credentials) -> Principal:
    """The authenticated agent (401 without a valid key), after its rate limit (429)."""
    client = request.client.host if request.client else "unknown"
    limiter = state.limiter
    if not state.settings.auth:
        wait = limiter.acquire(f"addr:{client}")
        if wait is not None:
            raise too_many_requests(
                f"rate limit of {limiter.rate:g} requests/s (bursts of {limiter.burst}) for "
                f"client {client} exceeded (BELIEFSTORE_RATE_LIMIT)", wait)
        return ANONYMOUS
    if credentials is None:
        if request.headers.get("authorization"):
            raise unauthorized("the Authorization header must be `Bearer <API key>` (an API key "
                               "from `beliefstore keys create`)", "malformed")
        raise unauthorized("missing API key: send `Authorization: Bearer <key>`; an admin makes "
                           "one with `beliefstore keys create --agent NAME --read CONTEXTS "
                           "--write CONTEXTS`", "missing")
    failures = f"authfail:{client}"
    wait = limiter.exhausted(failures)
    if wait is not None:
        raise too_many_requests(f"too many failed authentications from {client}", wait)
    try:
        key = state.keys.authenticate(credentials.credentials)
    except AuthError as exc:
        limiter.acquire(failures)
        raise unauthorized(str(exc), exc.reason) from None
    except sa.exc.SQLAlchemyError as exc:
        raise HTTPException(503, f"cannot check the API key, the database is unreachable: "
                            f"{exc.__class__.__name__}") from None
    wait = limiter.acquire(f"key:{key.key_id}")
    if wait is not None:
        raise too_many_requests(
            f"rate limit of {limiter.rate:g} requests/s (bursts of {limiter.burst}) for API key "
            f"{key.key_id} of agent {key.agent!r} exceeded (BELIEFSTORE_RATE_LIMIT, "
            "BELIEFSTORE_RATE_BURST)", wait)
    return key.principal()


Caller = Annotated[Principal, Depends(_caller)]


def _check_readable(caller: Principal, context: str, restricted: frozenset[str]) -> None:
    """403 unless ``caller`` may read ``context``."""
    if caller.may_read(context, restricted):
        return
    if context in restricted and WILDCARD in caller.read:
        raise forbidden(
            f"context {context!r} is restricted: only keys that name it in their read scope may "
            f"read it, and * does not cover it; {caller.describe()} reads "
            f"{format_scope(caller.read)}. Ask an admin for a key made with "
            f"`beliefstore keys create --agent {caller.agent} --read {context}`")
    raise forbidden(
        f"{caller.describe()} may not read context {context!r} (its read scope: "
        f"{format_scope(caller.read)}); ask an admin for a key made with "
        f"`beliefstore keys create --agent {caller.agent} --read {context}`")


def _read_scope(caller: Principal, state: AppState, context: str | None = None) -> ContextScope:
    """The contexts ``caller`` may read; 403 if none at all, or if ``context`` is given and
    not among them."""
    if not caller.unrestricted and not caller.read:
        raise forbidden(f"{caller.describe()} may not read any context (its read scope is "
                        "empty); ask an admin for a key made with `beliefstore keys create "
                        f"--agent {caller.agent} --read CONTEXTS`")
    restricted = state.restricted(caller)
    if context is not None:
        _check_readable(caller, context, restricted)
    return caller.read_scope(restricted)


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


def _no_key(conn: sa.Connection, subject_id: str, context: str, attribute: str,
            scope: ContextScope) -> NoReturn:
    if not queries.subject_known(conn, subject_id, scope):
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
        state.close()  # flushes the access log

    app = FastAPI(
        title="beliefstore",
        version="1",
        summary="What AI agents believe about the people they serve: self-models, "
        "traces and observation ingest.",
        lifespan=lifespan,
    )
    app.state.beliefstore = state
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            exc = StarletteHTTPException(400, "the request body cannot be parsed: send a JSON "
                                         "object, UTF-8 encoded, with Content-Type: "
                                         "application/json", exc.headers)
        return await http_exception_handler(request, exc)

    @app.exception_handler(ValidationError)
    async def _invalid(request: Request, exc: ValidationError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": [
            {"loc": ["body", e.field], "msg": e.message, "type": "value_error"}
            for e in exc.errors
        ]})

    def _beliefs(conn: sa.Connection, state: AppState, subject_id: str, as_of: datetime | None,
                 time_axis: Axis, scope: ContextScope, context: str | None = None,
                 min_confidence: float | None = None) -> list[BeliefOut]:
        if as_of is None:
            rows = queries.belief_rows(conn, subject_id, context, min_confidence, scope)
            found = [_belief(r) for r in rows]
        else:
            if as_of.tzinfo is None:
                raise HTTPException(422, [{  # FastAPI's validation error shape, as documented
                    "loc": ["query", "as_of"], "type": "value_error",
                    "msg": "as_of needs a timezone, e.g. 2026-01-05T12:00Z"}])
            logged = load_subject_events(conn, subject_id)
            found = [
                _computed_belief(b) for b in beliefs_as_of(
                    logged, to_millis(as_of), time_axis, state.settings.fold_settings)
                if scope.allows(b.context)
                and (context is None or b.context == context)
                and (min_confidence is None or b.confidence >= min_confidence)
            ]
        if not found and not queries.subject_known(conn, subject_id, scope):
            raise _unknown(subject_id)
        return found

    def _record(state: AppState, caller: Principal, subject_id: str, endpoint: str,
                contexts: list[str], count: int, attribute: str | None = None,
                as_of: datetime | None = None) -> None:
        state.access.record(caller.agent, caller.key_id, subject_id, endpoint, contexts,
                            attribute=attribute, count=count,
                            as_of=as_of.isoformat() if as_of is not None else None)

    @app.get("/v1/subjects/{subject_id}/self-model", response_model=SelfModelOut,
             responses=READ_RESPONSES, tags=["handoff"])
    def self_model(caller: Caller, subject_id: SubjectId, conn: Conn, state: State,
                   as_of: AsOf = None, time: TimeAxis = "recorded") -> SelfModelOut:
        """Everything believed about the subject, grouped by context: each belief with its
        confidence, alternatives and the sources behind it. Now, or ``as_of`` a past
        instant (folded from the stored events; ``time`` picks the axis). Contexts the
        key may not read are left out."""
        found = _beliefs(conn, state, subject_id, as_of, time, _read_scope(caller, state))
        contexts: dict[str, list[BeliefOut]] = {}
        for b in found:
            contexts.setdefault(b.context, []).append(b)
        _record(state, caller, subject_id, "self-model", list(contexts), len(found), as_of=as_of)
        return SelfModelOut(subject_id=subject_id, contexts=contexts, belief_count=len(found),
                            as_of=as_of, time=time if as_of else None)

    @app.get("/v1/subjects/{subject_id}/beliefs", response_model=BeliefsOut,
             responses=READ_RESPONSES, tags=["handoff"])
    def subject_beliefs(
        caller: Caller,
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
        ``as_of`` a past instant. Contexts the key may not read are left out."""
        found = _beliefs(conn, state, subject_id, as_of, time, _read_scope(caller, state),
                         context, min_confidence)
        _record(state, caller, subject_id, "beliefs", [b.context for b in found], len(found),
                as_of=as_of)
        return BeliefsOut(subject_id=subject_id, beliefs=found)

    @app.get("/v1/subjects/{subject_id}/beliefs/{context}/{attribute}/history",
             response_model=HistoryOut, responses=TRACE_RESPONSES, tags=["audit"])
    def belief_history(caller: Caller, subject_id: SubjectId, context: str, attribute: str,
                       conn: Conn, state: State) -> HistoryOut:
        """How the belief evolved: each (recorded_at, value, confidence) after an event
        that changed it, in log order, with that event. 403 if the key may not read the
        context."""
        scope = _read_scope(caller, state, context)
        key: Key = (subject_id, context, attribute)
        logged = load_events(conn, [key])
        if not any(isinstance(i.event, ObservationRecorded) for i in logged):
            _no_key(conn, subject_id, context, attribute, scope)
        changes = history(logged, key, state.settings.fold_settings)
        _record(state, caller, subject_id, "history", [context], len(changes), attribute)
        return HistoryOut(subject_id=subject_id, context=context, attribute=attribute, changes=[
            HistoryEntryOut(
                recorded_at=from_millis(c.recorded_at), value=c.value, confidence=c.confidence,
                event_id=c.event.event_id, event_type=c.event.type, source=c.event.source,
                kafka_partition=c.partition, kafka_offset=c.offset)
            for c in changes
        ])

    @app.get("/v1/subjects/{subject_id}/beliefs/{context}/{attribute}/trace",
             response_model=TraceOut, responses=TRACE_RESPONSES, tags=["audit"])
    def belief_trace(caller: Caller, subject_id: SubjectId, context: str, attribute: str,
                     conn: Conn, state: State) -> TraceOut:
        """Every event of the belief's key, counting or not, and why not (superseded by
        the same source, retracted, erased), with weights and Kafka coordinates. 403 if
        the key may not read the context."""
        scope = _read_scope(caller, state, context)
        key: Key = (subject_id, context, attribute)
        fold_settings = state.settings.fold_settings
        t = queries.key_trace(conn, key, fold_settings)
        if not t.entries:
            _no_key(conn, subject_id, context, attribute, scope)
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
        _record(state, caller, subject_id, "trace", [context], len(events), attribute)
        return TraceOut(
            subject_id=subject_id, context=context, attribute=attribute,
            belief=_belief(t.row) if t.row is not None else None,
            half_life_s=fold_settings.half_life_s(context),
            trust={s: fold_settings.trust_of(s) for s in sources},
            scores={v: math.fsum(ws) for v, ws in sorted(weights.items())},
            events=events,
        )

    @app.post("/v1/observations", response_model=ReceiptOut, status_code=201,
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
            raise HTTPException(503, str(exc)) from exc
        return ReceiptOut(**receipt.__dict__)

    @app.get("/v1/whoami", response_model=WhoAmIOut, responses=AUTH_RESPONSES, tags=["access"])
    def whoami(caller: Caller, state: State) -> WhoAmIOut:
        """The key's agent and scopes, as the API applies them."""
        restricted = state.keys.restricted() if state.settings.auth else frozenset()
        return WhoAmIOut(
            agent=caller.agent, key_id=caller.key_id, read=sorted(caller.read),
            write=sorted(caller.write), admin=caller.admin, auth=state.settings.auth,
            restricted_contexts=sorted(c for c in restricted if c in caller.read))

    @app.get("/v1/admin/keys", response_model=list[KeyOut], responses=ADMIN_RESPONSES,
             tags=["access"])
    def admin_keys(caller: Caller, state: State) -> list[KeyOut]:
        """Every API key's metadata, revoked ones included (admin keys only). Keys are
        made and revoked with the `beliefstore keys` commands."""
        if not caller.admin:
            raise forbidden(f"{caller.describe()} is not an admin key; admin keys are made with "
                            "`beliefstore keys create --agent NAME --admin`")
        return [KeyOut(key_id=k.key_id, agent=k.agent, read=sorted(k.read), write=sorted(k.write),
                       admin=k.admin, created_at=k.created_at, revoked_at=k.revoked_at)
                for k in state.keys.list_keys()]

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
