"""What the routes share: the app state, the authenticated caller (401/429), read scopes
(403), the path and query parameter types, and the 404s.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Annotated, Any, NoReturn

import sqlalchemy as sa
from fastapi import Depends, HTTPException, Path, Query, Request
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import AfterValidator
from starlette.concurrency import run_in_threadpool

from beliefstore.access.accesslog import AccessLogger
from beliefstore.access.consolesessions import COOKIE_NAME, ConsoleSessions
from beliefstore.access.keys import AuthError, KeyStore
from beliefstore.access.ratelimit import RateLimiter
from beliefstore.access.scopes import (
    ANONYMOUS,
    WILDCARD,
    ContextScope,
    KeyStoreError,
    Principal,
    format_scope,
)
from beliefstore.api import queries
from beliefstore.api.live import LiveReads, Unavailable
from beliefstore.api.security import (
    bearer,
    forbidden,
    too_many_requests,
    unauthorized,
)
from beliefstore.errors import FieldError
from beliefstore.events.producer import BeliefProducer
from beliefstore.events.validation import MAX_ID_LENGTH, MAX_NAME_LENGTH, check_id, check_name
from beliefstore.projector.catalog import ProjectionCatalog
from beliefstore.projector.timeline import Axis
from beliefstore.settings import Settings

#: Seconds a client is told to wait (``Retry-After``) when the broker or database is down.
RETRY_AFTER_S = 5


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
        self.console = ConsoleSessions.of_catalog(catalog)
        # The async read path: pool, LISTEN connection and NOTIFY-invalidated caches.
        self.live = LiveReads(catalog.database_url, catalog.base_schema,
                              cache_size=settings.read_cache_size,
                              on_switch=self.follow_switch)
        self._producer = producer
        self._lock = threading.Lock()

    def engine(self) -> sa.Engine:
        """The engine of the active projection's schema (blue/green: follows a switch).

        Reads run in autocommit: one round trip per query, no BEGIN/ROLLBACK around them.
        """
        return self.catalog.engine(self.catalog.active().schema).execution_options(
            isolation_level="AUTOCOMMIT")

    def follow_switch(self, active_schema: str, again: bool = False) -> bool:
        """After a projection switch to ``active_schema`` (notified; from a worker thread):
        close the engines of the other projections read so far and their pooled
        connections; whether none of them is left. One still in use is closed by a later
        call with ``again`` (which only retries those)."""
        busy = (self.catalog.release_retired() if again
                else self.catalog.retire_projections(active_schema))
        return not busy

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
        """The restricted contexts, when they matter to ``caller`` (``*`` scopes); from the
        live cache when it is trusted, else from the database."""
        if not caller.needs_restricted:
            return frozenset()
        cached = self.live.cached_restricted()
        return cached if cached is not None else self.keys.restricted()

    async def restricted_async(self, caller: Principal) -> frozenset[str]:
        """:meth:`restricted` for async routes (never blocks the event loop).

        Raises:
            Unavailable: the database is unreachable (503).
        """
        return await self.live.restricted() if caller.needs_restricted else frozenset()


async def get_state(request: Request) -> AppState:
    """The app's :class:`AppState` (a FastAPI dependency; async, so that FastAPI does not
    hop to its thread pool for it on every request)."""
    return request.app.state.beliefstore


def get_connection(state: Annotated[AppState, Depends(get_state)]) -> Iterator[sa.Connection]:
    """A connection to the active projection for one request (autocommit)."""
    with state.engine().connect() as conn:
        yield conn


State = Annotated[AppState, Depends(get_state)]
Conn = Annotated[sa.Connection, Depends(get_connection)]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def unavailable(what: str) -> HTTPException:
    """503 with ``Retry-After: 1``: the database did not answer in time."""
    return HTTPException(503, f"{what}: the database is unreachable; retry shortly",
                         headers={"Retry-After": "1"})


async def get_caller(request: Request, state: State, credentials: Credentials) -> Principal:
    """The authenticated agent (401 without a valid key), after its rate limit (429).

    A key verified before is answered from memory (see :mod:`beliefstore.api.live`)."""
    client = request.client.host if request.client else "unknown"
    limiter = state.limiter
    if not state.settings.auth:
        wait = limiter.acquire(f"addr:{client}")
        if wait is not None:
            raise too_many_requests(
                f"rate limit of {limiter.rate:g} requests/s (bursts of {limiter.burst}) for "
                f"client {client} exceeded (BELIEFSTORE_RATE_LIMIT)", wait)
        return ANONYMOUS
    if credentials is None and request.cookies.get(COOKIE_NAME) \
            and not request.headers.get("authorization"):
        # a session lookup in PostgreSQL (sync): off the event loop
        return await run_in_threadpool(console_caller, request, state,
                                       request.cookies[COOKIE_NAME])
    if credentials is None:
        if request.headers.get("authorization"):
            raise unauthorized("the Authorization header must be `Bearer <API key>` (an API key "
                               "from `beliefstore keys create`)", "malformed")
        raise unauthorized("missing API key: send `Authorization: Bearer <key>`; an admin makes "
                           "one with `beliefstore keys create --agent NAME --read CONTEXTS "
                           "--write CONTEXTS`", "missing")
    return await bearer_caller(state, client, credentials.credentials)


async def bearer_caller(state: AppState, client: str, token: str) -> Principal:
    """The agent of the bearer API key ``token`` (authentication on), after its rate limit:
    what :func:`get_caller` answers for a request with ``Authorization: Bearer <token>``
    from address ``client`` (also called directly by the lean read path).

    Raises:
        HTTPException: 401 (invalid or revoked key), 429 (rate limit, or too many failed
            authentications from ``client``), 503 (the database is unreachable).
    """
    limiter = state.limiter
    failures = f"authfail:{client}"
    wait = limiter.exhausted(failures)
    if wait is not None:
        raise too_many_requests(f"too many failed authentications from {client}", wait)
    try:
        key = await state.live.authenticate(token)
    except AuthError as exc:
        limiter.acquire(failures)
        raise unauthorized(str(exc), exc.reason) from None
    except Unavailable:
        raise unavailable("cannot check the API key") from None
    except sa.exc.SQLAlchemyError as exc:
        raise HTTPException(503, f"cannot check the API key, the database is unreachable: "
                            f"{exc.__class__.__name__}; retry later",
                            headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    wait = limiter.acquire(f"key:{key.key_id}")
    if wait is not None:
        raise too_many_requests(
            f"rate limit of {limiter.rate:g} requests/s (bursts of {limiter.burst}) for API key "
            f"{key.key_id} of agent {key.agent!r} exceeded (BELIEFSTORE_RATE_LIMIT, "
            "BELIEFSTORE_RATE_BURST)", wait)
    return key.principal()


def console_caller(request: Request, state: AppState, session: str) -> Principal:
    """The caller of a request authenticated by a console session cookie (the web console):
    the session's key, loaded afresh (a revoked key is a 401), after its rate limit.

    Only safe methods (GET, HEAD) are accepted with the cookie: a state-changing request
    needs the bearer header, so a cross-site form cannot act with the console's session
    (CSRF), on top of the cookie being ``SameSite=Strict``.
    """
    if request.method not in ("GET", "HEAD"):
        raise unauthorized(f"the console session cookie only authenticates GET requests; send "
                           f"{request.method} requests with `Authorization: Bearer <API key>`",
                           "missing")
    try:
        key_id = state.console.session_key(session)
        key = state.keys.get(key_id) if key_id is not None else None
    except KeyStoreError:
        key = None
    except sa.exc.SQLAlchemyError as exc:
        raise HTTPException(503, f"cannot check the console session, the database is "
                            f"unreachable: {exc.__class__.__name__}") from None
    if key is None or not key.active:
        raise unauthorized("the console session expired, was ended, or its API key was revoked: "
                           "log in again (/console/, or a new link from `beliefstore console`)",
                           "invalid")
    wait = state.limiter.acquire(f"key:{key.key_id}")
    if wait is not None:
        raise too_many_requests(
            f"rate limit of {state.limiter.rate:g} requests/s (bursts of {state.limiter.burst}) "
            f"for API key {key.key_id} of agent {key.agent!r} exceeded", wait)
    return key.principal()


Caller = Annotated[Principal, Depends(get_caller)]


def check_readable(caller: Principal, context: str, restricted: frozenset[str]) -> None:
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


def read_scope(caller: Principal, state: AppState, context: str | None = None) -> ContextScope:
    """The contexts ``caller`` may read; 403 if none at all, or if ``context`` is given and
    not among them."""
    if not caller.unrestricted and not caller.read:
        raise forbidden(f"{caller.describe()} may not read any context (its read scope is "
                        "empty); ask an admin for a key made with `beliefstore keys create "
                        f"--agent {caller.agent} --read CONTEXTS`")
    return scope_of(caller, state.restricted(caller), context)


def scope_of(caller: Principal, restricted: frozenset[str],
             context: str | None = None) -> ContextScope:
    """:func:`read_scope` with the restricted contexts given (async routes fetch them with
    :meth:`AppState.restricted_async`); 403 as there."""
    if not caller.unrestricted and not caller.read:
        raise forbidden(f"{caller.describe()} may not read any context (its read scope is "
                        "empty); ask an admin for a key made with `beliefstore keys create "
                        f"--agent {caller.agent} --read CONTEXTS`")
    if context is not None:
        check_readable(caller, context, restricted)
    return caller.read_scope(restricted)


def _valid(name: str, check: Callable[[str, Any], list[FieldError]]) -> AfterValidator:
    """A path/query parameter check with the POST body's rules: a 422 naming ``name``, so
    nothing PostgreSQL cannot store (NUL, surrogates) ever reaches a query."""

    def validator(value: str | None) -> str | None:
        if value is not None and (problems := check(name, value)):
            raise ValueError(f"{name} {problems[0].message}")
        return value

    return AfterValidator(validator)


#: What the OpenAPI document says of ids and names (the validators above enforce more).
ID_PATTERN = r"^[^\x00-\x1f\x7f]+$"
NAME_PATTERN = r"^[A-Za-z0-9_.:-]+$"

SubjectId = Annotated[str, Path(description="The subject (person) id.", max_length=MAX_ID_LENGTH,
                                json_schema_extra={"pattern": ID_PATTERN}),
                      _valid("subject_id", check_id)]
ContextName = Annotated[str, Path(description="The context, e.g. `support`.",
                                  max_length=MAX_NAME_LENGTH,
                                  json_schema_extra={"pattern": NAME_PATTERN}),
                        _valid("context", check_name)]
AttributeName = Annotated[str, Path(description="The attribute, e.g. `emotional_state`.",
                                    max_length=MAX_NAME_LENGTH,
                                    json_schema_extra={"pattern": NAME_PATTERN}),
                          _valid("attribute", check_name)]
ContextFilter = Annotated[str | None, Query(description="Only this context.",
                                            max_length=MAX_NAME_LENGTH,
                                            json_schema_extra={"pattern": NAME_PATTERN}),
                          _valid("context", check_name)]
SubjectPrefix = Annotated[str, Query(max_length=MAX_ID_LENGTH,
                                     description="The subject id starts with it (empty: every "
                                     "subject)."),
                          _valid("prefix", lambda name, value: check_id(name, value) if value
                                 else [])]
AsOf = Annotated[datetime | None, Query(
    description="Answer as of this instant (ISO 8601 with timezone, e.g. 2026-01-05T12:00Z): "
    "the fold of the events up to it. Erasures always apply.")]
TimeAxis = Annotated[Axis, Query(
    description="recorded: events appended to the log by as_of (what the system believed "
    "then); occurred: events observed by as_of (what we now know was true then).")]


def no_such_key(conn: sa.Connection, subject_id: str, context: str, attribute: str,
                scope: ContextScope) -> NoReturn:
    """404: the subject is unknown (within ``scope``), or has no observation of the key."""
    if not queries.subject_known(conn, subject_id, scope):
        raise unknown_subject(subject_id)
    raise HTTPException(404, f"subject {subject_id!r} has no observations of {context}/{attribute}")


def unknown_subject(subject_id: str) -> HTTPException:
    """The 404 of a subject with nothing the caller may see."""
    return HTTPException(
        404,
        f"no beliefs or observations about subject {subject_id!r}: check the id, or wait "
        "for the projector to catch up if it was just observed",
    )


def record_access(state: AppState, caller: Principal, subject_id: str, endpoint: str,
                  contexts: list[str], count: int, attribute: str | None = None,
                  as_of: datetime | None = None) -> None:
    """Queue an access-log record of an answered read (never blocks on the broker)."""
    state.access.record(caller.agent, caller.key_id, subject_id, endpoint, contexts,
                        attribute=attribute, count=count,
                        as_of=as_of.isoformat() if as_of is not None else None)
