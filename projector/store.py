"""The projection's recorder: writes batches of events and their offsets to PostgreSQL.

Everything one batch produces (its observations, retractions and erasures, the
recomputed beliefs of every key it touched, and the next offset of every partition
it read) is written in **one transaction**, so a crash at any point applies each
event exactly once (the Kafka consumer documentation's "storing offsets outside
Kafka"; the ``eventsourcing`` library's tracking records).

Beliefs are recomputed from the stored events of each touched key with the pure
:func:`~beliefstore.projector.fold.fold`, so they never depend on arrival order.
This module touches PostgreSQL only; :mod:`beliefstore.projector.worker` brings Kafka.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterable, Iterator, Sequence
from concurrent.futures import as_completed
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from beliefstore.errors import FencedError
from beliefstore.events.model import (
    Event,
    ObservationRecorded,
    ObservationRetracted,
    SubjectErased,
)
from beliefstore.projector import bulk, copytext
from beliefstore.projector.changes import notify, record_staged_changes, subject_positions
from beliefstore.projector.fold import (
    Belief,
    Counting,
    FoldSettings,
    Key,
    fold_counting,
)
from beliefstore.projector.rebuild_pool import (
    ERASED,
    OBSERVED,
    RETRACTED,
    Item,
    RebuildPool,
    fold_chunk,
)
from beliefstore.projector.tables import (
    erasures,
    observations,
    projection_offsets,
    retractions,
)
from beliefstore.timefmt import from_millis, now_millis, to_millis

if TYPE_CHECKING:
    import psycopg

    from beliefstore.access.datakeys import Keyring

_CHUNK = 1000
SMALL_BATCH = 32
"""Most observations of a batch applied on the direct path: its rows go into the staging
tables with pipelined ``INSERT``s instead of ``COPY`` (which ends a pipeline), so a lone
event costs three round trips (fence and events, beliefs and offsets, commit) instead of
about ten. The statements after the staging tables are the same on both paths."""
_STAGED = "beliefstore_staging"
_STAGE_OBS_INSERT = bulk.insert_sql(bulk.STAGE_OBS, bulk.OBS_COLUMNS)
_STAGE_BELIEFS_INSERT = bulk.insert_sql(bulk.STAGE_BELIEFS, bulk.STAGE_BELIEF_COLUMNS)
"""Key of a pooled connection's ``info``: its staging tables exist."""


def _driver(conn: sa.Connection) -> psycopg.Connection:
    """The psycopg 3 connection under a SQLAlchemy connection (same transaction)."""
    return conn.connection.driver_connection  # type: ignore[return-value]


def _insert_sql(table: str, columns: Sequence[str]) -> str:
    marks = ", ".join(["%s"] * len(columns))
    return (f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks}) "
            "ON CONFLICT (event_id) DO NOTHING")


@dataclass(frozen=True)
class LogPosition:
    """Where a message sits in the event log.

    Attributes:
        topic: Kafka topic.
        partition: partition number.
        offset: offset within the partition.
        recorded_at: the broker's timestamp of the message, epoch ms (``None`` if unknown).
        writer_fingerprint: hex CRC-64-AVRO fingerprint of the message's writer schema.
    """

    topic: str
    partition: int
    offset: int
    recorded_at: int | None
    writer_fingerprint: str


@dataclass(frozen=True)
class LoggedEvent:
    """An event together with its position in the log."""

    event: Event
    position: LogPosition


@dataclass(frozen=True)
class Claim:
    """A worker's ownership of a partition.

    Attributes:
        epoch: the partition's epoch after the claim; commits must present it.
        next_offset: where the worker must resume (the stored next offset).
    """

    epoch: int
    next_offset: int


@dataclass(frozen=True)
class PartitionProgress:
    """What a batch read from one partition.

    Attributes:
        next_offset: offset of the next message to apply (last applied + 1).
        high_watermark: the partition's log end as seen in the fetch response, or ``None``.
    """

    next_offset: int
    high_watermark: int | None = None


@dataclass
class _BatchRows:
    """A batch's events as the rows of their tables (:mod:`~beliefstore.projector.bulk`'s
    row builders), in batch order; ``erased``: its erasures."""

    observations: list[tuple] = field(default_factory=list)
    retractions: list[tuple] = field(default_factory=list)
    erasures: list[tuple] = field(default_factory=list)
    erased: list[SubjectErased] = field(default_factory=list)

    @classmethod
    def of(cls, batch: Sequence[LoggedEvent]) -> _BatchRows:
        rows = cls()
        for item in batch:
            e = item.event
            if isinstance(e, ObservationRecorded):
                rows.observations.append(bulk.observation_row(e, item.position))
            elif isinstance(e, ObservationRetracted):
                rows.retractions.append(bulk.retraction_row(e, item.position))
            elif isinstance(e, SubjectErased):
                rows.erasures.append(bulk.erasure_row(e, item.position))
                rows.erased.append(e)
        return rows

    def __bool__(self) -> bool:
        return bool(self.observations or self.retractions or self.erasures)


def _position_columns(p: LogPosition) -> dict:
    return {
        "kafka_topic": p.topic,
        "kafka_partition": p.partition,
        "kafka_offset": p.offset,
        "recorded_at": from_millis(p.recorded_at) if p.recorded_at is not None else None,
        "writer_fingerprint": p.writer_fingerprint,
    }


def _position_of(row) -> LogPosition:
    return LogPosition(
        topic=row.kafka_topic,
        partition=row.kafka_partition,
        offset=row.kafka_offset,
        recorded_at=to_millis(row.recorded_at) if row.recorded_at is not None else None,
        writer_fingerprint=row.writer_fingerprint,
    )


class _Clock:
    """Adds the seconds since its previous call to ``timings[phase]`` at each call."""

    def __init__(self, timings: dict[str, float]):
        self.timings = timings
        self.last = time.perf_counter()

    def __call__(self, phase: str) -> None:
        now = time.perf_counter()
        self.timings[phase] = self.timings.get(phase, 0.0) + now - self.last
        self.last = now

    def skip(self) -> None:
        """Start the next phase now: the seconds since the previous call count nowhere."""
        self.last = time.perf_counter()


def _chunks(items: Sequence, size: int = _CHUNK) -> Iterable[Sequence]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def finish(stages: Generator[None, None, int]) -> int:
    """Run the rest of :meth:`ProjectionRecorder.apply_stages` after its pause; return
    its value (the beliefs recomputed)."""
    try:
        next(stages)
    except StopIteration as done:
        return int(done.value)
    raise RuntimeError("apply_stages paused twice")


class ProjectionRecorder:
    """Reads and writes one projection's rows and offsets.

    Args:
        engine: a SQLAlchemy engine whose ``search_path`` selects the projection's schema
            (see :func:`beliefstore.db.make_engine`); tables must be migrated.
        projection: the name offsets are stored under (``BELIEFSTORE_PROJECTION``).
        fold_settings: half-lives and trust used to recompute beliefs.
        keyring: when given, an erasure destroys the subject's data keys (created up to
            its ``occurred_at``) in the batch's transaction (crypto-shredding).
        temp_buffers_kib: ``temp_buffers`` of a connection whose first staging is a batch
            of :meth:`apply` (see :func:`beliefstore.projector.bulk.live_temp_buffers_kib`);
            ``None``: PostgreSQL's setting. The bulk rebuild keeps PostgreSQL's setting.
    """

    def __init__(self, engine: sa.Engine, projection: str, fold_settings: FoldSettings,
                 keyring: Keyring | None = None, *, temp_buffers_kib: int | None = None):
        self.engine = engine
        self.projection = projection
        self.fold_settings = fold_settings
        self.keyring = keyring
        self.temp_buffers_kib = temp_buffers_kib
        self.small_batch = SMALL_BATCH
        """Most observations of a batch :meth:`apply` takes on the direct path."""
        self.asynchronous_commit = False
        self.timings: dict[str, float] = {}
        """Seconds :meth:`apply` spent in each of its phases since this recorder was made
        (``rows``, ``checkout``, ``copy_observations``, ``send_events``, ``paused`` (the
        caller's work in :meth:`apply_stages`' pause), ``events_pipeline`` (the rest of the
        wait for the fence and the events), ``fold``, ``belief_rows``, ``copy_beliefs``,
        ``beliefs_pipeline``, ``commit``, ``checkin``), for benchmarks and profiles."""
        """Whether :meth:`apply`'s transactions commit without waiting for the WAL flush
        (``SET LOCAL synchronous_commit TO off``; the worker's choice, see
        :class:`~beliefstore.projector.worker.ProjectorWorker`)."""

    # -- offsets -----------------------------------------------------------------------

    def stored_offsets(self, topic: str) -> dict[int, int]:
        """Partition → next offset to apply, for every partition this projection has seen."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(projection_offsets.c.partition, projection_offsets.c.next_offset).where(
                    projection_offsets.c.projection == self.projection,
                    projection_offsets.c.topic == topic,
                )
            )
            return {r.partition: r.next_offset for r in rows}

    def claim(self, topic: str, partitions: Iterable[int], owner: str) -> dict[int, Claim]:
        """Take ownership of ``partitions``: bump each one's epoch and record ``owner``.

        Returns partition → :class:`Claim` (the new epoch and the stored next offset to
        seek to). A claim waits for a batch of the previous owner that is being committed
        (it holds the row lock), so the offset it returns is never stale; a batch of the
        previous owner that commits later is fenced off by the epoch check in
        :meth:`apply`.
        """
        p = projection_offsets
        claims: dict[int, Claim] = {}
        with self.engine.begin() as conn:
            for partition in sorted(partitions):
                stmt = pg_insert(p).values(projection=self.projection, topic=topic,
                                           partition=partition, next_offset=0, owner=owner,
                                           epoch=1)
                row = conn.execute(stmt.on_conflict_do_update(
                    index_elements=["projection", "topic", "partition"],
                    set_={"owner": owner, "epoch": p.c.epoch + 1, "updated_at": sa.func.now()},
                ).returning(p.c.epoch, p.c.next_offset)).one()
                claims[partition] = Claim(row.epoch, row.next_offset)
        return claims

    # -- the batch transaction ---------------------------------------------------------

    def apply(
        self,
        topic: str,
        batch: Sequence[LoggedEvent],
        progress: dict[int, PartitionProgress],
        fence: dict[int, int] | None = None,
    ) -> int:
        """Apply one batch in one transaction; return the number of beliefs recomputed.

        The whole of :meth:`apply_stages`, with nothing done in its pause (see there for
        the arguments, the steps and the errors).
        """
        stages = self.apply_stages(topic, batch, progress, fence)
        try:
            next(stages)
            return finish(stages)
        finally:
            stages.close()

    def apply_stages(
        self,
        topic: str,
        batch: Sequence[LoggedEvent],
        progress: dict[int, PartitionProgress],
        fence: dict[int, int] | None = None,
    ) -> Generator[None, None, int]:
        """:meth:`apply` in two stages, for a caller that works while PostgreSQL does.

        A generator: the first ``next()`` runs the batch up to its first pipeline, sent
        and not yet waited for (the fence, the events and the touched rows: most of the
        batch's database work), and pauses there; :func:`finish` then waits for the
        results, folds, writes the beliefs and the offsets and commits, and returns the
        number of beliefs recomputed. The caller's work in the pause must not use this
        recorder's connection. ``close()`` before the end rolls the batch back (nothing
        of it is committed); so does any error.

        Apply one batch in one transaction.

        ``batch`` holds the valid events read (any order, duplicates allowed: rows are
        keyed by ``event_id``); ``progress`` holds, for every partition read (including
        partitions whose messages were all poison), the next offset to store; ``fence``
        holds the epoch of every partition of ``progress`` from :meth:`claim` (``None``:
        no ownership check, for a sole worker without claims).

        Each subject's events live in one partition (key = subject_id), so two workers
        never write the same belief at once: partition ownership is all the locking
        the read model needs.

        Raises:
            FencedError: a partition was claimed by another worker since; nothing of the
                batch is committed.

        Steps: insert the events; mark retractions and wipe erased observations (both
        directions, as a retraction or erasure may arrive before its observation);
        bring ``belief_sources`` up to date (an upsert for new observations, a refresh
        from ``observations`` for pairs a retraction or erasure touched); refold every
        touched key from its ``belief_sources`` rows; store the offsets.

        Two paths, the same statements: a batch of at most :attr:`small_batch`
        (:data:`SMALL_BATCH`) observations fills the staging tables with pipelined ``INSERT``s (three round
        trips in all: fence and events, beliefs and offsets, commit); a larger one with
        ``COPY``, which is faster per row but ends a pipeline (its observations are
        loaded by ``COPY`` first, then the fence and the events go in one pipeline).
        """
        clock = _Clock(self.timings)
        rows = _BatchRows.of(batch)
        clock("rows")
        small = len(rows.observations) <= self.small_batch
        epochs = {p: fence.get(p, -1) for p in progress} if fence is not None and progress \
            else None
        with self.engine.connect() as conn:
            raw = _driver(conn)
            self._ensure_staging(conn, self.temp_buffers_kib)
            clock("checkout")
            with conn.begin(), raw.cursor() as cur, raw.cursor() as locked:
                if rows and not small:
                    # The session's own staging table: nothing another worker sees, so it
                    # may be loaded before the fence.
                    bulk.copy_rows(cur, bulk.STAGE_OBS, bulk.OBS_COLUMNS, rows.observations)
                    clock("copy_observations")
                # One round trip: the fence first (its row locks before any shared table is
                # written), then the events. A fenced batch's writes roll back with it.
                with raw.pipeline():
                    if self.asynchronous_commit:
                        cur.execute(bulk.ASYNCHRONOUS_COMMIT)
                    if epochs is not None:
                        locked.execute(bulk.LOCK_OFFSETS,
                                       (self.projection, topic, sorted(epochs)))
                    if rows:
                        self._write_events(cur, rows, staged=not small)
                    clock("send_events")
                    yield  # PostgreSQL works on the pipeline; the caller may meanwhile
                    clock("paused")
                if epochs is not None:
                    self._check_epochs(dict(locked.fetchall()), epochs)
                touched = cur.fetchall() if rows else []
                clock("events_pipeline")
                if rows.erased and self.keyring is not None:
                    for x in rows.erased:
                        self.keyring.destroy(x.subject_id, x.occurred_at, now_millis(), conn)
                keys, folded = self._refold(touched)
                clock("fold")
                staged = bulk.staged_belief_rows(keys, folded, subject_positions(batch)) \
                    if keys else []
                clock("belief_rows")
                if staged and not small:
                    bulk.copy_rows(cur, bulk.STAGE_BELIEFS, bulk.STAGE_BELIEF_COLUMNS, staged)
                    clock("copy_beliefs")
                with raw.pipeline():
                    if staged:
                        if small:
                            cur.executemany(_STAGE_BELIEFS_INSERT, staged)
                        cur.execute(bulk.UPSERT_BELIEFS)
                        cur.execute(bulk.DELETE_GONE_BELIEFS)
                        # + NOTIFY, delivered at commit
                        record_staged_changes(cur, bulk.STAGE_BELIEFS, (k[0] for k in keys))
                    if progress:
                        cur.executemany(bulk.UPSERT_OFFSETS, [
                            (self.projection, topic, partition, p.next_offset,
                             p.high_watermark)
                            for partition, p in sorted(progress.items())
                        ])
                clock("beliefs_pipeline")
            clock("commit")
        clock("checkin")
        return len(keys)

    @staticmethod
    def _write_events(cur: psycopg.Cursor, rows: _BatchRows, *, staged: bool) -> None:
        """Queue (in the caller's pipeline) the batch's rows and the set-based statements
        that bring ``observations`` and ``belief_sources`` up to date, ending with
        ``TOUCHED_SOURCES`` (whose rows the caller fetches). ``staged``: the observations
        are already in the staging table (``COPY``); else they are inserted into it here,
        row by row (the direct path of a small batch)."""
        # Every statement below is driven by at most a batch of rows: probe indexes,
        # never hash or scan a whole table, whatever the statistics say (see the constant).
        cur.execute(bulk.INDEX_PROBES_ONLY)
        if rows.observations and not staged:
            cur.executemany(_STAGE_OBS_INSERT, rows.observations)
        if rows.retractions:
            cur.executemany(_insert_sql("retractions", bulk.RETRACTION_COLUMNS),
                            rows.retractions)
        if rows.erasures:
            cur.executemany(_insert_sql("erasures", bulk.ERASURE_COLUMNS), rows.erasures)
        if rows.observations:
            cur.execute(bulk.INSERT_OBSERVATIONS)
        if rows.retractions:
            cur.execute(bulk.MARK_RETRACTED, ([r[0] for r in rows.retractions],))
        if rows.erasures:
            cur.execute(bulk.MARK_ERASED, ([r[0] for r in rows.erasures],))
        if rows.retractions or rows.erasures:
            for statement in bulk.REFRESH_STALE:
                cur.execute(statement)
        cur.execute(bulk.TOUCHED_SOURCES)

    @staticmethod
    def _check_epochs(current: dict[int, int], epochs: dict[int, int]) -> None:
        lost = sorted(part for part, epoch in epochs.items() if current.get(part) != epoch)
        if lost:
            raise FencedError(lost, f"stored epochs {current}, this worker's {epochs}")

    def _refold(self, rows: Sequence[tuple]) -> tuple[list[Key], dict[Key, Belief]]:
        """Fold ``TOUCHED_SOURCES`` rows: the sorted touched keys and their beliefs.

        The rows are each key's counting observations (``belief_sources``: one per
        source), so :func:`~beliefstore.projector.fold.fold_counting` folds them without
        the pure fold's dedupe, marks and supersession (equal results:
        ``tests/test_fold.py``)."""
        keys = sorted({(row[0], row[1], row[2]) for row in rows})
        # unordered: the keys are sorted above, the beliefs only looked up by key
        beliefs = fold_counting((row for row in rows if row[3] is not None), self.fold_settings,
                                ordered=False)
        return keys, {(b.subject_id, b.context, b.attribute): b for b in beliefs}

    @contextmanager
    def fresh_load(self, topic: str, fence: dict[int, int] | None = None
                   ) -> Iterator[FreshLoad]:
        """Bulk rebuild of this **empty** projection, in one transaction.

        Yields a :class:`FreshLoad`: :meth:`FreshLoad.add` the log's events as they are
        read (their observation rows stream into ``observations`` through one ``COPY``
        while the caller reads on), then :meth:`FreshLoad.finish` with every partition's
        progress; the transaction commits when the block ends, and rolls back (leaving
        the projection empty) if it raises. ``fence`` is checked first, as in
        :meth:`apply`, and the offset rows stay locked until the end.

        Raises:
            ValueError: the projection already holds events (use :meth:`apply`).
            FencedError: as :meth:`apply`.
        """
        with self.engine.connect() as conn:
            self._ensure_staging(conn)
            with conn.begin():
                yield from self._fresh_load(conn, topic, fence)
        with self.engine.connect() as conn:
            # Fresh statistics for the planner (autovacuum would take a while).
            for table in ("observations", "retractions", "erasures", "belief_sources",
                          "beliefs"):
                conn.execute(sa.text(f"ANALYZE {table}"))
            conn.commit()

    def _fresh_load(self, conn: sa.Connection, topic: str,
                    fence: dict[int, int] | None) -> Iterator[FreshLoad]:
        if fence is not None:
            self._check_fence(conn, topic, dict(fence))
        if conn.execute(sa.select(sa.exists().select_from(observations))).scalar() or \
                conn.execute(sa.select(sa.exists().select_from(erasures))).scalar():
            raise ValueError("the projection is not empty: a bulk rebuild needs a "
                             "fresh projection (replay into a new name)")
        load = FreshLoad(self, conn, topic)
        try:
            yield load
        finally:
            load.close()

    @staticmethod
    def _ensure_staging(conn: sa.Connection, temp_buffers_kib: int | None = None) -> None:
        if not conn.connection.info.get(_STAGED):
            bulk.ensure_staging(_driver(conn), temp_buffers_kib)
            conn.connection.info[_STAGED] = True

    def _check_fence(self, conn: sa.Connection, topic: str, epochs: dict[int, int]) -> None:
        # Lock the offset rows first: a concurrent claim waits for this transaction.
        p = projection_offsets
        rows = conn.execute(sa.select(p.c.partition, p.c.epoch).where(
            p.c.projection == self.projection, p.c.topic == topic,
            p.c.partition.in_(sorted(epochs)),
        ).with_for_update())
        self._check_epochs({r.partition: r.epoch for r in rows}, epochs)


def load_events(conn: sa.Connection, keys: Sequence[Key]) -> list[LoggedEvent]:
    """Every stored event that bears on ``keys``: their observations, the retractions
    targeting those observations, and the erasures of their subjects.

    Erased observations come back with an empty ``value`` (it was wiped); the fold
    drops them because their erasure is among the events.
    """
    if not keys:
        return []
    o = observations
    return _load(conn, sa.tuple_(o.c.subject_id, o.c.context, o.c.attribute).in_(keys),
                 sorted({k[0] for k in keys}))


def load_subject_events(conn: sa.Connection, subject_id: str) -> list[LoggedEvent]:
    """Every stored event about ``subject_id``: its observations, the retractions
    targeting them, and its erasures (as :func:`load_events`)."""
    return _load(conn, observations.c.subject_id == subject_id, [subject_id])


def _load(conn: sa.Connection, which: sa.ColumnElement[bool],
          subjects: list[str]) -> list[LoggedEvent]:
    o, r, e = observations, retractions, erasures
    out: list[LoggedEvent] = []
    obs_ids: list[str] = []
    for row in conn.execute(sa.select(o).where(which)):
        obs_ids.append(row.event_id)
        out.append(LoggedEvent(ObservationRecorded(
            event_id=row.event_id, subject_id=row.subject_id, source=row.source,
            occurred_at=to_millis(row.occurred_at), context=row.context,
            attribute=row.attribute, value=row.value if row.value is not None else "",
            confidence=row.confidence, evidence=row.evidence, metadata=row.metadata or {},
        ), _position_of(row)))
    for chunk in _chunks(obs_ids):
        for row in conn.execute(sa.select(r).where(r.c.retracted_event_id.in_(chunk))):
            out.append(LoggedEvent(ObservationRetracted(
                event_id=row.event_id, subject_id=row.subject_id, source=row.source,
                occurred_at=to_millis(row.occurred_at),
                retracted_event_id=row.retracted_event_id, reason=row.reason,
            ), _position_of(row)))
    for row in conn.execute(sa.select(e).where(e.c.subject_id.in_(subjects))):
        out.append(LoggedEvent(SubjectErased(
            event_id=row.event_id, subject_id=row.subject_id, source=row.source,
            occurred_at=to_millis(row.occurred_at), reason=row.reason,
        ), _position_of(row)))
    return out


_CHANGE_COLUMNS = ("subject_id", "context", "attribute", "value", "confidence", "alternatives",
                   "sources", "kafka_partition", "kafka_offset")


class FreshLoad:
    """One bulk rebuild in progress (from :meth:`ProjectionRecorder.fresh_load`).

    Observation rows stream into ``observations`` through one ``COPY`` as they are
    added, without marks; retractions, erasures and each observation's counting fields
    are kept in memory until :meth:`finish`, which sets the marks with the rules of
    :meth:`ProjectionRecorder.apply` (an observation is retracted by the first
    own-source retraction of it in log order, and erased by the first erasure in log
    order of its subject that occurred at or after it; the first delivery of an
    ``event_id`` is the one stored), then ``COPY``s the other tables. Rows are
    ``COPY`` text lines (:mod:`beliefstore.projector.copytext`): built here from
    events (:meth:`add`) or by the worker processes of
    :mod:`beliefstore.projector.rebuild_pool` (:meth:`add_items`).
    """

    def __init__(self, recorder: ProjectionRecorder, conn: sa.Connection, topic: str):
        self.recorder = recorder
        self.conn = conn
        self.topic = topic
        self._raw = _driver(conn)
        self._cursor = self._raw.cursor()
        # The projection is empty (checked in this transaction): truncating its tables
        # changes no row, and lets every COPY of the load write its rows frozen
        # (PostgreSQL documentation, "COPY", FREEZE: the table was truncated in the
        # current transaction), so no later scan (the marks' UPDATE, the index builds,
        # ANALYZE) sets their hint bits page by page, each a full-page image in the WAL
        # when data checksums are on (PostgreSQL 18's default).
        self._cursor.execute(f"TRUNCATE {', '.join(_LOADED_TABLES)}")
        self._indexes = _drop_indexes(self._cursor, "observations")
        # the belief tables are loaded at the end, and indexed after their load too
        self._belief_indexes = [statement for table in _BELIEF_TABLES
                                for statement in _drop_indexes(self._cursor, table)]
        self._copy = self._cursor.copy(
            f"COPY observations ({', '.join(bulk.OBS_COLUMNS)}) FROM STDIN WITH (FREEZE)")
        self._writer = self._copy.__enter__()
        self._seen: set[str] = set()
        self._observed: list[Counting] = []
        self._own: dict[tuple[str, str], str] = {}  # (retracted id, source) → retraction
        self._erased: dict[str, list[tuple[str, int]]] = {}  # subject → (id, occurred_at)
        self._retraction_lines: list[bytes] = []
        self._erasure_lines: list[bytes] = []
        self._where: dict[str, tuple[int, int]] = {}
        self._open = True
        self.timings: dict[str, float] = {}
        """Seconds of each phase of :meth:`finish` (for benchmarks and logs)."""

    def add(self, logged: Iterable[LoggedEvent]) -> None:
        """Add events in log order (per partition); duplicates of an ``event_id`` skipped."""
        items: list[tuple[int, list[Item]]] = []
        for item in logged:
            e, p = item.event, item.position
            if not items or items[-1][0] != p.partition:
                items.append((p.partition, []))
            args = (p.topic, p.partition, p.offset, p.recorded_at, p.writer_fingerprint)
            if isinstance(e, ObservationRecorded):
                items[-1][1].append((OBSERVED, p.offset, copytext.observation(
                    e.event_id, e.subject_id, e.context, e.attribute, e.value, e.confidence,
                    e.source, e.occurred_at, e.evidence, e.metadata, *args),
                    (e.subject_id, e.context, e.attribute, e.source, e.event_id,
                     e.occurred_at, e.value, e.confidence)))
            elif isinstance(e, ObservationRetracted):
                items[-1][1].append((RETRACTED, p.offset, copytext.retraction(
                    e.event_id, e.subject_id, e.source, e.occurred_at, e.retracted_event_id,
                    e.reason, *args), e.event_id, e.subject_id, e.retracted_event_id,
                    e.source))
            elif isinstance(e, SubjectErased):
                items[-1][1].append((ERASED, p.offset, copytext.erasure(
                    e.event_id, e.subject_id, e.source, e.occurred_at, e.reason, *args),
                    e.event_id, e.subject_id, e.occurred_at))
        for partition, part in items:
            self.add_items(partition, part)

    def add_items(self, partition: int, items: Iterable[Item]) -> None:
        """Add decoded records of ``partition`` in log order (:data:`rebuild_pool.Item
        <beliefstore.projector.rebuild_pool.Item>` s; poison and shredded ones are
        ignored here, the caller handles them); duplicates of an ``event_id`` skipped."""
        seen, where, out = self._seen, self._where, []
        for item in items:
            kind = item[0]
            if kind == OBSERVED:
                c = item[3]
                subject, event_id = c[0], c[4]
            elif kind == RETRACTED or kind == ERASED:
                subject, event_id = item[4], item[3]
            else:
                continue
            held = where.get(subject)
            if held is None or item[1] > held[1]:
                where[subject] = (partition, item[1])
            if event_id in seen:
                continue
            seen.add(event_id)
            if kind == OBSERVED:
                out.append(item[2])
                self._observed.append(c)
            elif kind == RETRACTED:
                self._own.setdefault((item[5], item[6]), event_id)
                self._retraction_lines.append(item[2])
            else:
                self._erased.setdefault(subject, []).append((event_id, item[5]))
                self._erasure_lines.append(item[2])
        if out:
            self._writer.write(b"".join(out))

    def finish(self, progress: dict[int, PartitionProgress],
               pool: RebuildPool | None = None) -> int:
        """End the load: marks, ``belief_sources``, beliefs, one ``belief_changes`` row per
        belief, one NOTIFY, and every partition's offsets. Returns the number of beliefs.
        With ``pool``, the fold and its rows are computed in its worker processes, split
        by subject (:meth:`RebuildPool.fold
        <beliefstore.projector.rebuild_pool.RebuildPool.fold>`), while PostgreSQL loads
        the retractions and erasures, applies the marks and builds the observations'
        indexes; each part's ``belief_sources`` rows are sent as soon as it is folded.
        The belief tables' indexes (dropped when the load began) are built after their
        ``COPY``, as the observations' are."""
        clock = _Clock(self.timings)
        self._copy.__exit__(None, None, None)
        self._open = False
        recorder, cur = self.recorder, self._cursor
        clock("observations_copy_end_s")
        if self._erased and recorder.keyring is not None:
            for subject, erased in self._erased.items():
                for _, occurred_at in erased:
                    recorder.keyring.destroy(subject, occurred_at, now_millis(), self.conn)
        clock.skip()  # the erased subjects' data keys: in no phase
        marks: list[tuple[str, str | None, str | None]] = []
        latest: dict[tuple[str, str, str, str], Counting] = {}
        own, erasures_of = self._own, self._erased
        for o in self._observed:
            retracted_by = own.get((o[4], o[3])) if own else None
            of_subject = erasures_of.get(o[0]) if erasures_of else None
            erased_by = None if of_subject is None else next(
                (x for x, at in of_subject if o[5] <= at), None)
            if retracted_by is not None or erased_by is not None:
                marks.append((o[4], retracted_by, erased_by))
                continue
            pair = (o[0], o[1], o[2], o[3])
            held = latest.get(pair)
            if held is None or (held[5], held[4]) < (o[5], o[4]):
                latest[pair] = o
        counting = list(latest.values())
        if pool is not None:  # the workers fold while PostgreSQL takes the marks, indexes
            folding = pool.fold(counting, recorder.fold_settings, self._where)
        else:
            parts = [fold_chunk(counting, recorder.fold_settings, self._where)]
        clock("marks_and_fold_s")
        _copy_lines(cur, "retractions", bulk.RETRACTION_COLUMNS, self._retraction_lines)
        _copy_lines(cur, "erasures", bulk.ERASURE_COLUMNS, self._erasure_lines)
        if marks:
            bulk.copy_rows(cur, bulk.STAGE_MARKS, ("event_id", "retracted_by", "erased_by"),
                           marks)
            cur.execute(bulk.APPLY_MARKS)
        clock("retractions_erasures_marks_s")
        cur.execute(f"SET LOCAL maintenance_work_mem = '{INDEX_BUILD_MEMORY_MB}MB'")
        for statement in self._indexes:
            cur.execute(statement)
        clock("observation_indexes_s")
        if pool is not None:
            # each part's belief_sources lines go to PostgreSQL as soon as it is folded,
            # while the workers fold the others
            parts = []

            def done_parts() -> Iterator[bytes]:
                for future in as_completed(folding):
                    parts.append(future.result())
                    yield parts[-1][1]

            _copy_lines(cur, "belief_sources", bulk.SOURCE_COLUMNS, done_parts())
        else:
            _copy_lines(cur, "belief_sources", bulk.SOURCE_COLUMNS, (p[1] for p in parts))
        _copy_lines(cur, "beliefs", bulk.BELIEF_COLUMNS, (p[2] for p in parts))
        _copy_lines(cur, "belief_changes", _CHANGE_COLUMNS, (p[3] for p in parts))
        count = sum(p[0] for p in parts)
        clock("fold_wait_and_beliefs_copy_s")
        for statement in self._belief_indexes:
            cur.execute(statement)
        clock("belief_indexes_s")
        if count:
            cur.execute("SELECT max(id), current_schema() FROM belief_changes")
            max_id, schema = cur.fetchone()  # type: ignore[misc]
            notify(cur, schema, max_id or 0, (s for p in parts for s in p[4]))
        if progress:
            cur.executemany(bulk.UPSERT_OFFSETS, [
                (recorder.projection, self.topic, partition, p.next_offset, p.high_watermark)
                for partition, p in sorted(progress.items())
            ])
        return count

    def close(self) -> None:
        """Abandon an unfinished ``COPY`` (the transaction then rolls back) and the cursor."""
        if self._open:
            self._open = False
            with suppress(Exception):
                self._copy.__exit__(RuntimeError, RuntimeError("rebuild abandoned"), None)
        self._cursor.close()


_BELIEF_TABLES = ("belief_sources", "beliefs", "belief_changes")
"""The tables a bulk rebuild loads at its end (from the fold), indexed after their load."""

_LOADED_TABLES = ("observations", "retractions", "erasures", *_BELIEF_TABLES)
"""Every table a bulk rebuild loads with ``COPY … FREEZE``."""

INDEX_BUILD_MEMORY_MB = 256
"""``maintenance_work_mem`` of a bulk rebuild's index builds (one sort of the whole
``observations`` table per index: 1M observations sort in about 100 MB)."""


def _drop_indexes(cur: psycopg.Cursor, table: str) -> list[str]:
    """Drop every index of ``table`` (its primary key too) in the current schema, in the
    caller's transaction, and return the statements that recreate them (PostgreSQL's
    own definitions: ``pg_get_constraintdef``, ``pg_indexes.indexdef``).

    Why (PostgreSQL documentation, "Populating a Database", 14.4.3 "Remove Indexes"):
    loading rows into a table without indexes and building each index in one sort
    afterwards is much cheaper than updating four b-trees row by row, and a fresh
    projection has no reader until it is switched to. The drop and the rebuild are in
    the load's transaction: a failed load rolls both back."""
    cur.execute("SELECT conname, pg_get_constraintdef(c.oid), conindid::regclass::text "
                "FROM pg_constraint c WHERE conrelid = %s::regclass AND contype = 'p'",
                (table,))
    primary = cur.fetchall()
    cur.execute("SELECT indexname, indexdef FROM pg_indexes "
                "WHERE schemaname = current_schema() AND tablename = %s", (table,))
    owned = {name for _, _, name in primary}
    indexes = [(name, definition) for name, definition in cur.fetchall()
               if name not in owned]
    for name, _, _ in primary:
        cur.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
    for name, _ in indexes:
        cur.execute(f'DROP INDEX "{name}"')
    return ([f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}'
             for name, definition, _ in primary] + [definition for _, definition in indexes])


def _copy_lines(cur: psycopg.Cursor, table: str, columns: Sequence[str],
                lines: Iterable[bytes], chunk: int = 4096) -> None:
    """``COPY table (columns) FROM STDIN WITH (FREEZE)`` of ready ``COPY`` text lines
    (``table`` truncated in the caller's transaction), written in chunks of ``chunk``
    lines."""
    with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN WITH (FREEZE)") as copy:
        buffer: list[bytes] = []
        for data in lines:
            buffer.append(data)
            if len(buffer) >= chunk:
                copy.write(b"".join(buffer))
                buffer.clear()
        if buffer:
            copy.write(b"".join(buffer))
