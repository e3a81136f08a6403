"""The API process's live read path: an async connection pool, one LISTEN connection,
and the caches that PostgreSQL's NOTIFY keeps honest.

A handoff read costs at most one database round trip, and none once warm:

* **API keys** — after a key's first scrypt check, its row is kept in memory; ``keys
  create`` and ``keys revoke`` send ``NOTIFY beliefstore_access`` in their transaction
  (:data:`beliefstore.access.keys.CHANNEL`), and this process drops the key;
* **restricted contexts** — the same channel (``contexts restrict|unrestrict``);
* **the active projection** — ``projections switch`` / ``replay --switch`` send
  ``NOTIFY beliefstore_catalog`` (:data:`beliefstore.projector.catalog.CHANNEL`);
* **self-models** — each subject's beliefs, rendered to JSON once; the projector sends
  ``NOTIFY beliefstore_changes`` with the subjects of every batch, in the batch's
  transaction (:mod:`beliefstore.projector.changes`).

PostgreSQL delivers a NOTIFY when the sending transaction commits; this process then
drops the entries within milliseconds (the window between a commit and the moment the
notification is handled is the only time an older answer can be served). A read that
was already querying when a notification came in does not store its answer
(``generation`` check), so no stale entry outlives a notification. The caches are
trusted only while the LISTEN connection is up: when it drops (database restart,
network), everything is forgotten and every read goes to the database until it is back
(and answers 503 while the database is unreachable).

The same notifications wake the watchers of ``GET /v1/subjects/{id}/watch``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import logging
import marshal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import anyio
import orjson
import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from beliefstore.access.keys import CHANNEL as ACCESS_CHANNEL
from beliefstore.access.keys import (
    ApiKey,
    burn_unknown_key,
    check_secret,
    invalid_key,
    key_of_row,
    revoked_key,
    split_token,
)
from beliefstore.access.scopes import ContextScope
from beliefstore.api.metrics import record_cache
from beliefstore.db import check_schema_name, psycopg_conninfo
from beliefstore.projector.catalog import CHANNEL as CATALOG_CHANNEL
from beliefstore.projector.catalog import CatalogError
from beliefstore.projector.changes import CHANNEL as CHANGES_CHANNEL
from beliefstore.projector.changes import parse_payload

log = logging.getLogger("beliefstore.api")

QUERY_TIMEOUT_S = 0.5
"""Seconds a read may wait for a pooled connection and its query before it answers 503
(the database is down or hung)."""

LISTEN_CHECK_S = 2.0
"""Seconds between liveness checks of the LISTEN connection when no notification comes."""

DEFAULT_CACHE_SIZE = 100_000
"""Self-models kept per API process (least recently used dropped first; settable with
``BELIEFSTORE_READ_CACHE_SIZE``). About 4 KiB each for a subject of 10 beliefs."""

MAX_LOADERS = 4
"""Self-model queries in flight at once per API process; misses arriving meanwhile wait
and are loaded together by the next query."""

MAX_LOAD_BATCH = 64
"""Most subjects loaded by one self-model query."""

SWITCH_RETRY_S = 5.0
"""Seconds between attempts of ``on_switch`` (see :class:`LiveReads`) while it reports that
the old projection's connections are still in use."""

def _utc_z(column: str) -> str:
    """SQL text of a ``timestamptz`` column as pydantic writes a UTC datetime in JSON
    (``2026-11-27T02:14:59.687174Z``; no fraction when the microseconds are 0)."""
    return (f"replace(to_char({column} AT TIME ZONE 'UTC', "
            """'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'), '.000000Z', 'Z')""")


SELF_MODEL_SQL = (
    "SELECT subject_id, context, confidence, date_part('epoch', last_observed_at), "
    """'{{"context":' || to_json(context) || ',"attribute":' || to_json(attribute) """
    """|| ',"value":' || to_json(value) || ',"confidence":' || confidence """
    """|| ',"alternatives":' || alternatives || ',"sources":' || sources """
    """|| ',"support":' || support || ',"source_count":' || source_count """
    f"""|| ',"last_observed_at":"' || {_utc_z("last_observed_at")} """
    f"""|| '","updated_at":"' || {_utc_z("updated_at")} || '"' """
    'FROM "{schema}".beliefs WHERE subject_id = ANY(%s) ORDER BY subject_id, context, attribute')
"""The self-models of a list of subjects (``{schema}``: the projection's schema): per
belief ``(subject_id, context, confidence, last_observed_at in epoch seconds, its
BeliefOut JSON without age_s and the closing brace)``, written by PostgreSQL.

The JSON is the API model's (:class:`beliefstore.api.models.BeliefOut`, same fields in the
same order): strings through ``to_json``, ``confidence`` as float8 text (shortest exact
form: the pool's sessions set ``extra_float_digits = 3``), the JSONB columns as their
text, timestamps as :func:`_utc_z`. Measured against building it in Python from decoded
rows (psycopg's JSONB and timestamp loaders, then orjson): 18–30 µs of Python per subject
of 10 beliefs instead of 110–125 µs, for about 30 µs more of PostgreSQL
(``bench/README.md``, issue 10)."""


class Unavailable(Exception):
    """The database did not answer within :data:`QUERY_TIMEOUT_S` (HTTP 503)."""


@dataclass(frozen=True)
class Active:
    """The projection the API serves: its name and PostgreSQL schema."""

    name: str
    schema: str


@dataclass(frozen=True)
class Change:
    """One row of ``belief_changes``: a belief as a batch left it (``value`` ``None``: gone).

    Attributes:
        id: the change id (commit-ordered per subject).
        partition, offset: Kafka position of the batch's last event about the subject.
        changed_at: when the batch committed it (ISO 8601).
    """

    id: int
    context: str
    attribute: str
    value: str | None
    confidence: float | None
    alternatives: dict[str, float] | None
    sources: list[str] | None
    partition: int | None
    offset: int | None
    changed_at: str


@dataclass(slots=True)
class SelfModel:
    """A subject's beliefs in one projection, each rendered to JSON once (by PostgreSQL,
    :data:`SELF_MODEL_SQL`).

    The cache keeps it as one ``bytes`` object (:meth:`to_bytes`, :func:`marshal.dumps`
    of :attr:`groups`), so a cache of 100,000 subjects is a ``dict`` of ``str`` → ``bytes``
    that the garbage collector never tracks (its full collections used to scan every
    cached belief and stall reads for 50–130 ms; ``bench/README.md``, issue 10); each read
    unpacks its subject's model (about 2 µs) and writes the answer for its key's scope.
    The JSON of a belief is kept open (without its closing brace): its ``age_s`` depends
    on the read's instant and is appended when the answer is written.

    Attributes:
        subject_id: the subject.
        groups: the beliefs by context, in (context, attribute) order, as the answers
            write them: ``(context, context as a JSON string, ((last_observed_at in epoch
            seconds, confidence, BeliefOut JSON without age_s and the closing brace),
            ...))``.
    """

    subject_id: str
    groups: tuple[tuple[str, bytes, tuple[tuple[float, float, bytes], ...]], ...] = ()

    @classmethod
    def of_rows(cls, subject_id: str, rows: Sequence[Sequence[Any]]) -> SelfModel:
        """From rows ``(context, confidence, last_observed_at in epoch seconds, open
        BeliefOut JSON as str or bytes)`` in (context, attribute) order, as
        :data:`SELF_MODEL_SQL` returns them (after its ``subject_id``)."""
        by_context: dict[str, list[tuple[float, float, bytes]]] = {}
        for context, confidence, observed_s, body in rows:
            by_context.setdefault(context, []).append(
                (observed_s, confidence, body.encode() if isinstance(body, str) else body))
        return cls(subject_id, tuple((c, orjson.dumps(c), tuple(b))
                                     for c, b in by_context.items()))

    def to_bytes(self) -> bytes:
        """The model as one bytes object (:func:`marshal.dumps`; read back with
        :meth:`of_bytes` in the same interpreter)."""
        return marshal.dumps((self.subject_id, self.groups))

    @classmethod
    def of_bytes(cls, blob: bytes) -> SelfModel:
        """The model :meth:`to_bytes` made."""
        subject_id, groups = marshal.loads(blob)
        return cls(subject_id, groups)

    @property
    def items(self) -> list[tuple[str, float, float, bytes]]:
        """Every belief as ``(context, confidence, last_observed_at in epoch seconds, open
        JSON)``, in (context, attribute) order."""
        return [(c, confidence, observed_s, body) for c, _, beliefs in self.groups
                for observed_s, confidence, body in beliefs]

    def count(self, scope: ContextScope) -> int:
        """How many beliefs ``scope`` allows (whatever their age)."""
        return sum(len(beliefs) for context, _, beliefs in self.groups if scope.allows(context))

    def beliefs_json(self, scope: ContextScope, context: str | None = None,
                     min_confidence: float | None = None, now_s: float | None = None,
                     max_age_s: float | None = None) -> tuple[bytes, list[str]]:
        """The JSON array of the beliefs ``scope`` allows (optionally of one context, at
        least ``min_confidence`` and at most ``max_age_s`` seconds old at ``now_s``,
        epoch seconds, default now), and their contexts (one per belief).

        ``age_s`` is ``now_s − last_observed_at`` in seconds (≥ 0), rounded to ms, as
        :func:`beliefstore.api.staleness.with_age` computes it for past views."""
        now_s = time.time() if now_s is None else now_s
        contexts: list[str] = []
        bodies: list[bytes] = []
        for c, _, beliefs in self.groups:
            if (context is not None and c != context) or not scope.allows(c):
                continue
            for observed_s, confidence, body in beliefs:
                if min_confidence is not None and confidence < min_confidence:
                    continue
                age = now_s - observed_s
                if age < 0.0:
                    age = 0.0
                elif max_age_s is not None and age > max_age_s:
                    continue
                contexts.append(c)
                bodies.append(body + b',"age_s":' + orjson.dumps(round(age, 3)) + b"}")
        return b"[" + b",".join(bodies) + b"]", contexts

    def self_model_json(self, scope: ContextScope, now_s: float | None = None,
                        max_age_s: float | None = None) -> tuple[bytes, list[str], int]:
        """The ``SelfModelOut`` body for a reader with ``scope`` at ``now_s`` (epoch
        seconds, default now), without beliefs older than ``max_age_s``; the contexts in
        it and the number of beliefs."""
        now_s = time.time() if now_s is None else now_s
        names: list[str] = []
        parts: list[bytes] = []
        count = 0
        for context, key, beliefs in self.groups:
            if not scope.allows(context):
                continue
            bodies = []
            for observed_s, _, body in beliefs:
                age = now_s - observed_s
                if age < 0.0:
                    age = 0.0
                elif max_age_s is not None and age > max_age_s:
                    continue
                bodies.append(body + b',"age_s":' + orjson.dumps(round(age, 3)) + b"}")
            if bodies:
                names.append(context)
                parts.append(key + b":[" + b",".join(bodies) + b"]")
                count += len(bodies)
        body = (b'{"subject_id":' + orjson.dumps(self.subject_id) + b',"contexts":{'
                + b",".join(parts) + b'},"belief_count":' + str(count).encode()
                + b',"as_of":null,"time":null}')
        return body, names, count


class LiveReads:
    """One API process's pool, LISTEN connection, caches and watchers.

    Args:
        database_url: the PostgreSQL URL.
        base_schema: the catalog's base schema (keys, restricted contexts, projections).
        cache_size: self-models kept (least recently used dropped first, see
            :func:`_bound`; 0: none).
        pool_size: most pooled connections for reads.
        on_switch: called in a worker thread when a projection switch is notified, with
            the new active projection's schema (read through this pool) and
            ``again=False`` (the API closes the other projections' engines there); returns
            whether it is done, else it is called again (``again=True``) every
            :data:`SWITCH_RETRY_S` seconds until it is.

    Use from the API's event loop only: :meth:`start` in the lifespan, :meth:`stop` at
    its end.
    """

    def __init__(self, database_url: str, base_schema: str = "public", *,
                 cache_size: int = DEFAULT_CACHE_SIZE, pool_size: int = 10,
                 on_switch: Callable[[str, bool], bool] | None = None):
        self.conninfo = psycopg_conninfo(database_url)
        self.on_switch = on_switch
        self._followers: set[asyncio.Task] = set()
        self.base = check_schema_name(base_schema)
        self.cache_size = cache_size
        self.pool_size = pool_size
        self.pool: AsyncConnectionPool | None = None
        self.listening = False
        self.generation = 0
        self.stats = {"hits": 0, "misses": 0, "loads": 0, "notifications": 0}
        self._keys: dict[str, tuple[ApiKey, bytes]] = {}
        self._verified: dict[str, tuple[bytes, bytes]] = {}
        self._restricted: frozenset[str] | None = None
        self._active: Active | None = None
        # "<schema>\0<subject>" -> SelfModel.to_bytes(), least recently used first: str
        # keys and bytes values, so the garbage collector never tracks this dict
        self._models: dict[str, bytes] = {}
        # the same keys -> the contexts the subject has observations in, "\n"-joined
        self._observed: dict[str, str] = {}
        self._loads: dict[str, asyncio.Future[SelfModel]] = {}
        self._queued: list[str] = []
        self._loaders: set[asyncio.Task] = set()
        self._watchers: dict[str, set[asyncio.Event]] = {}
        self._listener: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self.connected: asyncio.Event | None = None  # set while listening (from start())

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the pool (connections are made in the background) and start listening."""
        if self.pool is not None:
            return
        self.connected = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self.pool = AsyncConnectionPool(
            self.conninfo, min_size=1, max_size=self.pool_size, open=False,
            timeout=QUERY_TIMEOUT_S, kwargs={"autocommit": True, "connect_timeout": 2},
            configure=_configure, name="beliefstore-reads")
        await self.pool.open(wait=False)
        self._listener = asyncio.create_task(self._listen(), name="beliefstore-listen")

    async def stop(self) -> None:
        """Stop listening, wake every watcher (they end) and close the pool."""
        self._closing = True
        self._wake_all()
        for task in [*self._loaders, *self._followers]:
            task.cancel()
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
        if self.pool is not None:
            await self.pool.close(timeout=2)

    def end_watches_threadsafe(self) -> None:
        """From any thread: end every open watch stream (before a server stops, so its
        graceful shutdown does not wait for endless responses)."""

        def end() -> None:
            self._closing = True
            self._wake_all()

        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(end)

    @property
    def closing(self) -> bool:
        return self._closing

    # -- LISTEN ----------------------------------------------------------------------------

    async def _listen(self) -> None:
        delay = 0.1
        while not self._closing:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self.conninfo, autocommit=True, connect_timeout=2)
            except (psycopg.Error, OSError) as exc:
                log.warning("cannot LISTEN for cache invalidations (%s); retrying in %.1f s",
                            exc.__class__.__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            try:
                async with conn:
                    for channel in (ACCESS_CHANNEL, CATALOG_CHANNEL, CHANGES_CHANNEL):
                        await conn.execute(f"LISTEN {channel}")
                    self._forget_all()
                    self.listening = True
                    assert self.connected is not None
                    self.connected.set()
                    delay = 0.1
                    while not self._closing:
                        async for note in conn.notifies(timeout=LISTEN_CHECK_S):
                            self._on_notify(note.channel, note.payload)
                        check = asyncio.ensure_future(conn.execute("SELECT 1"))
                        done, _ = await asyncio.wait({check}, timeout=QUERY_TIMEOUT_S)
                        if not done:  # a hung server: give up on this connection now
                            check.cancel()
                            check.add_done_callback(_quiet)
                            self.listening = False
                            self._forget_all()
                            raise TimeoutError("the LISTEN connection stopped answering")
                        check.result()
            except (psycopg.Error, OSError, TimeoutError) as exc:
                if not self._closing:
                    log.warning("lost the LISTEN connection (%s): caches off until it is back",
                                exc.__class__.__name__)
            finally:
                self.listening = False
                assert self.connected is not None
                self.connected.clear()
                self._forget_all()
            if not self._closing:
                await asyncio.sleep(delay)

    def _on_notify(self, channel: str, payload: str) -> None:
        self.stats["notifications"] += 1
        self.generation += 1
        if channel == CHANGES_CHANNEL:
            try:
                schema, _, subjects = parse_payload(payload)
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring a malformed %s payload %r", channel, payload[:200])
                return
            if subjects is None:
                prefix = schema + "\0"
                for cache in (self._models, self._observed):
                    for key in [k for k in cache if k.startswith(prefix)]:
                        del cache[key]
                self._wake_all()
                return
            for subject in subjects:
                key = f"{schema}\0{subject}"
                self._models.pop(key, None)
                self._observed.pop(key, None)
                for event in self._watchers.get(subject, ()):
                    event.set()
        elif channel == ACCESS_CHANNEL:
            base, _, what = payload.partition(" ")
            if base != self.base:
                return
            kind, _, key_id = what.partition(" ")
            if kind == "key":
                self._keys.pop(key_id, None)
            else:
                self._restricted = None
            self._wake_all()
        elif channel == CATALOG_CHANNEL and payload == self.base:
            self._active = None
            self._models.clear()
            self._observed.clear()
            self._wake_all()
            self._follow_switch()

    def _follow_switch(self) -> None:
        """Run :attr:`on_switch` off the event loop until it reports done."""
        on_switch = self.on_switch
        if on_switch is None:
            return

        async def follow() -> None:
            again = False
            while not self._closing:
                try:
                    schema = (await self.active()).schema
                    if await anyio.to_thread.run_sync(on_switch, schema, again):
                        return
                except Exception:
                    log.warning("following a projection switch failed", exc_info=True)
                again = True
                await asyncio.sleep(SWITCH_RETRY_S)

        task = asyncio.ensure_future(follow())
        self._followers.add(task)
        task.add_done_callback(self._followers.discard)

    def _forget_all(self) -> None:
        self.generation += 1
        self._keys.clear()
        self._restricted = None
        self._active = None
        self._models.clear()
        self._observed.clear()
        self._wake_all()

    def _wake_all(self) -> None:
        for events in self._watchers.values():
            for event in events:
                event.set()

    # -- queries ---------------------------------------------------------------------------

    async def _fetch(self, sql: str, params: Sequence[Any] = (), *, dicts: bool = False) -> list:
        if self.pool is None:
            await self.start()
        assert self.pool is not None
        pool = self.pool

        async def run() -> list:
            async with pool.connection() as conn:
                cur = conn.cursor(row_factory=dict_row) if dicts else conn.cursor()
                await cur.execute(sql, params)  # type: ignore[call-overload]
                return await cur.fetchall()

        # The query runs as its own task: on a hung server psycopg's cancellation itself
        # can wait for seconds, and the read must answer 503 now, not then.
        task = asyncio.ensure_future(run())
        done, _ = await asyncio.wait({task}, timeout=QUERY_TIMEOUT_S)
        if not done:
            task.cancel()
            task.add_done_callback(_quiet)
            raise Unavailable(f"the database did not answer within {QUERY_TIMEOUT_S:g} s")
        try:
            return task.result()
        except (psycopg.OperationalError, PoolTimeout, OSError) as exc:
            raise Unavailable(f"the database is unreachable ({exc.__class__.__name__})") from None

    async def authenticate(self, token: str) -> ApiKey:
        """The active key ``token`` names: from memory once verified (while listening),
        else one query and, the first time, a scrypt check off the event loop.

        Raises:
            AuthError: malformed, unknown, wrong secret or revoked.
            Unavailable: the database is unreachable.
        """
        key_id, secret = split_token(token)
        presented = hashlib.sha256(secret.encode("ascii")).digest()
        if self.listening:
            hit = self._keys.get(key_id)
            if hit is not None and hmac.compare_digest(hit[1], presented):
                if not hit[0].active:
                    raise revoked_key(hit[0])
                return hit[0]
        generation = self.generation
        rows = await self._fetch(
            f'SELECT * FROM "{self.base}".api_keys WHERE key_id = %s', (key_id,), dicts=True)
        if not rows:
            await anyio.to_thread.run_sync(burn_unknown_key, secret)
            raise invalid_key()
        row = SimpleNamespace(**rows[0])
        stored = bytes(row.secret_hash)
        verified = self._verified.get(key_id)
        if verified is not None and hmac.compare_digest(verified[0], stored) \
                and hmac.compare_digest(verified[1], presented):
            ok = True
        else:
            ok = await anyio.to_thread.run_sync(check_secret, secret, bytes(row.salt), row.kdf,
                                                stored)
            if ok:
                if len(self._verified) >= 10_000:
                    self._verified.clear()
                self._verified[key_id] = (stored, presented)
        if not ok:
            raise invalid_key()
        key = key_of_row(row)
        if self.listening and generation == self.generation:
            self._keys[key_id] = (key, presented)
        if not key.active:
            raise revoked_key(key)
        return key

    async def restricted(self) -> frozenset[str]:
        """The restricted contexts (cached while listening)."""
        cached = self._restricted
        if cached is not None and self.listening:
            return cached
        generation = self.generation
        rows = await self._fetch(f'SELECT context FROM "{self.base}".restricted_contexts')
        found = frozenset(r[0] for r in rows)
        if self.listening and generation == self.generation:
            self._restricted = found
        return found

    def cached_restricted(self) -> frozenset[str] | None:
        """The restricted contexts if known and trusted now, else ``None``."""
        return self._restricted if self.listening else None

    async def active(self) -> Active:
        """The projection the API serves (cached while listening).

        Raises:
            CatalogError: no active projection (run ``beliefstore migrate``).
        """
        cached = self._active
        if cached is not None and self.listening:
            return cached
        generation = self.generation
        rows = await self._fetch(
            f'SELECT name, schema_name FROM "{self.base}".projections WHERE active')
        if not rows:
            raise CatalogError("no active projection: run `beliefstore migrate` first")
        found = Active(rows[0][0], check_schema_name(rows[0][1]))
        if self.listening and generation == self.generation:
            self._active = found
        return found

    async def self_model(self, schema: str, subject_id: str) -> SelfModel:
        """The subject's beliefs in ``schema``: from memory, or loaded from the database.

        Misses are coalesced: at most :data:`MAX_LOADERS` queries run at once, each loading
        up to :data:`MAX_LOAD_BATCH` waiting subjects (``subject_id = ANY(...)``), and
        concurrent reads of one subject share its load; under load, many misses cost one
        round trip.

        Raises:
            Unavailable: the database did not answer within :data:`QUERY_TIMEOUT_S`.
        """
        key = f"{schema}\0{subject_id}"
        if self.listening:
            models = self._models
            hit = models.pop(key, None)
            if hit is not None:
                models[key] = hit  # the most recently used last
                self.stats["hits"] += 1
                record_cache("self_model", True)
                return SelfModel.of_bytes(hit)
        self.stats["misses"] += 1
        record_cache("self_model", False)
        future = self._loads.get(key)
        if future is None:
            future = self._loads[key] = asyncio.get_running_loop().create_future()
            future.add_done_callback(_quiet)
            self._queued.append(key)
            if len(self._loaders) < MAX_LOADERS:
                task = asyncio.ensure_future(self._load_queued())
                self._loaders.add(task)
                task.add_done_callback(self._loaders.discard)
        # shielded: a reader that goes away does not cancel the others' load
        return await asyncio.shield(future)

    async def _load_queued(self) -> None:
        """Load the waiting subjects, :data:`MAX_LOAD_BATCH` per query, until none wait."""
        while self._queued:
            batch, self._queued = self._queued[:MAX_LOAD_BATCH], self._queued[MAX_LOAD_BATCH:]
            by_schema: dict[str, list[str]] = {}
            for key in batch:
                schema, _, subject = key.partition("\0")
                by_schema.setdefault(schema, []).append(subject)
            for schema, subjects in by_schema.items():
                # The futures leave _loads as the query starts: a read arriving from now
                # on queues a load of its own, so it never gets an answer older than itself.
                futures = {s: self._loads.pop(f"{schema}\0{s}") for s in subjects}
                generation = self.generation
                self.stats["loads"] += 1
                try:
                    rows = await self._fetch(SELF_MODEL_SQL.format(schema=schema), (subjects,))
                except BaseException as exc:
                    for future in futures.values():
                        if not future.done():
                            future.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                found: dict[str, list[Any]] = {}
                for row in rows:
                    found.setdefault(row[0], []).append(row[1:])
                keep = self.listening and generation == self.generation
                for subject in subjects:
                    model = SelfModel.of_rows(subject, found.get(subject, ()))
                    if keep:
                        self._models[f"{schema}\0{subject}"] = model.to_bytes()
                    future = futures[subject]
                    if not future.done():
                        future.set_result(model)
                if keep:
                    _bound(self._models, self.cache_size)

    async def known(self, schema: str, model: SelfModel, scope: ContextScope) -> bool:
        """Whether the subject has any belief or observation in a context ``scope`` allows
        (a second query, only for subjects whose visible beliefs are none; its answer is
        kept like the self-model's)."""
        if model.count(scope):
            return True
        key = f"{schema}\0{model.subject_id}"
        observed = self._observed.get(key) if self.listening else None
        if observed is None:
            generation = self.generation
            rows = await self._fetch(
                f'SELECT DISTINCT context FROM "{schema}".observations WHERE subject_id = %s',
                (model.subject_id,))
            observed = "\n".join(r[0] for r in rows)
            if self.listening and generation == self.generation:
                self._observed[key] = observed
                _bound(self._observed, self.cache_size)
        return any(scope.allows(c) for c in observed.split("\n") if c)

    # -- watch -----------------------------------------------------------------------------

    def subscribe(self, subject_id: str) -> asyncio.Event:
        """An event set whenever the subject's beliefs may have changed (or the caches
        were reset); :meth:`unsubscribe` it when done."""
        event = asyncio.Event()
        self._watchers.setdefault(subject_id, set()).add(event)
        return event

    def unsubscribe(self, subject_id: str, event: asyncio.Event) -> None:
        events = self._watchers.get(subject_id)
        if events is not None:
            events.discard(event)
            if not events:
                del self._watchers[subject_id]

    def watcher_count(self) -> int:
        return sum(len(v) for v in self._watchers.values())

    async def last_change(self, schema: str, subject_id: str) -> int:
        """The subject's newest change id in ``schema`` (0 when none)."""
        rows = await self._fetch(
            f'SELECT coalesce(max(id), 0) FROM "{schema}".belief_changes WHERE subject_id = %s',
            (subject_id,))
        return int(rows[0][0])

    async def changes_since(self, schema: str, subject_id: str, after: int,
                            limit: int = 500) -> list[Change]:
        """The subject's changes with id > ``after``, oldest first, at most ``limit``."""
        rows = await self._fetch(
            "SELECT id, context, attribute, value, confidence, alternatives, sources, "
            f'kafka_partition, kafka_offset, changed_at FROM "{schema}".belief_changes '
            "WHERE subject_id = %s AND id > %s ORDER BY id LIMIT %s", (subject_id, after, limit))
        return [Change(id=r[0], context=r[1], attribute=r[2], value=r[3], confidence=r[4],
                       alternatives=r[5], sources=r[6], partition=r[7], offset=r[8],
                       changed_at=r[9].isoformat()) for r in rows]


def _bound(cache: dict[str, Any], size: int) -> None:
    """Drop the least recently used entries of ``cache`` (oldest first in its order) when
    it holds more than ``size``: down to ``size`` less a sixteenth, so that the scan past
    the holes that deleted entries leave at the front of a ``dict`` is paid once per
    ``size / 16`` insertions, not at each."""
    excess = len(cache) - size
    if excess > 0:
        for key in list(itertools.islice(cache, excess + size // 16)):
            del cache[key]


def _quiet(task: asyncio.Future) -> None:
    """Retrieve an abandoned query's outcome, so asyncio does not log it."""
    if not task.cancelled():
        task.exception()


def _configure_sync(conn: Any) -> None:
    set_json_loads(orjson.loads, conn)


async def _configure(conn: psycopg.AsyncConnection) -> None:
    _configure_sync(conn)
    # float8 as text in its shortest exact form, whatever the server's default
    # (SELF_MODEL_SQL writes confidence so)
    await conn.execute("SET extra_float_digits = 3")


__all__ = ["Active", "Change", "LiveReads", "SelfModel", "Unavailable"]
