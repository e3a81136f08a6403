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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import distinct_on
from sqlalchemy.dialects.postgresql import insert as pg_insert

from beliefstore.errors import FencedError
from beliefstore.events.model import (
    Event,
    ObservationRecorded,
    ObservationRetracted,
    SubjectErased,
)
from beliefstore.projector.changes import record_changes
from beliefstore.projector.fold import Belief, FoldSettings, Key, fold
from beliefstore.projector.tables import (
    belief_sources,
    beliefs,
    erasures,
    observations,
    projection_offsets,
    retractions,
)
from beliefstore.timefmt import from_millis, now_millis, to_millis

if TYPE_CHECKING:
    from beliefstore.access.datakeys import Keyring

_CHUNK = 1000


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


def _chunks(items: Sequence, size: int = _CHUNK) -> Iterable[Sequence]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


class ProjectionRecorder:
    """Reads and writes one projection's rows and offsets.

    Args:
        engine: a SQLAlchemy engine whose ``search_path`` selects the projection's schema
            (see :func:`beliefstore.db.make_engine`); tables must be migrated.
        projection: the name offsets are stored under (``BELIEFSTORE_PROJECTION``).
        fold_settings: half-lives and trust used to recompute beliefs.
        keyring: when given, an erasure destroys the subject's data keys (created up to
            its ``occurred_at``) in the batch's transaction (crypto-shredding).
    """

    def __init__(self, engine: sa.Engine, projection: str, fold_settings: FoldSettings,
                 keyring: Keyring | None = None):
        self.engine = engine
        self.projection = projection
        self.fold_settings = fold_settings
        self.keyring = keyring

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
        """
        with self.engine.begin() as conn:
            if fence is not None and progress:
                self._check_fence(conn, topic, {p: fence.get(p, -1) for p in progress})
            keys = self._apply_events(conn, batch)
            recomputed = self.recompute(conn, keys) if keys else 0
            record_changes(conn, keys, batch)  # + NOTIFY, delivered at commit
            if progress:
                stmt = pg_insert(projection_offsets)
                conn.execute(stmt.on_conflict_do_update(
                    index_elements=["projection", "topic", "partition"],
                    set_={
                        "next_offset": stmt.excluded.next_offset,
                        "high_watermark": stmt.excluded.high_watermark,
                        "updated_at": sa.func.now(),
                    },
                ), [
                    {"projection": self.projection, "topic": topic, "partition": partition,
                     "next_offset": p.next_offset, "high_watermark": p.high_watermark}
                    for partition, p in sorted(progress.items())
                ])
        return recomputed

    def _check_fence(self, conn: sa.Connection, topic: str, epochs: dict[int, int]) -> None:
        # Lock the offset rows first: a concurrent claim waits for this transaction.
        p = projection_offsets
        rows = conn.execute(sa.select(p.c.partition, p.c.epoch).where(
            p.c.projection == self.projection, p.c.topic == topic,
            p.c.partition.in_(sorted(epochs)),
        ).with_for_update())
        current = {r.partition: r.epoch for r in rows}
        lost = sorted(part for part, epoch in epochs.items() if current.get(part) != epoch)
        if lost:
            raise FencedError(lost, f"stored epochs {current}, this worker's {epochs}")

    def _apply_events(self, conn: sa.Connection, batch: Sequence[LoggedEvent]) -> set[Key]:
        obs_rows, retraction_rows, erasure_rows = [], [], []
        for item in batch:
            e, pos = item.event, _position_columns(item.position)
            if isinstance(e, ObservationRecorded):
                obs_rows.append({
                    "event_id": e.event_id, "subject_id": e.subject_id, "context": e.context,
                    "attribute": e.attribute, "value": e.value, "confidence": e.confidence,
                    "source": e.source, "occurred_at": from_millis(e.occurred_at),
                    "evidence": e.evidence, "metadata": dict(e.metadata), **pos,
                })
            elif isinstance(e, ObservationRetracted):
                retraction_rows.append({
                    "event_id": e.event_id, "subject_id": e.subject_id, "source": e.source,
                    "occurred_at": from_millis(e.occurred_at),
                    "retracted_event_id": e.retracted_event_id, "reason": e.reason, **pos,
                })
            elif isinstance(e, SubjectErased):
                erasure_rows.append({
                    "event_id": e.event_id, "subject_id": e.subject_id, "source": e.source,
                    "occurred_at": from_millis(e.occurred_at), "reason": e.reason, **pos,
                })
        for table, rows in ((observations, obs_rows), (retractions, retraction_rows),
                            (erasures, erasure_rows)):
            if rows:
                conn.execute(pg_insert(table).on_conflict_do_nothing(), rows)

        obs_ids = sorted({r["event_id"] for r in obs_rows})
        retraction_ids = sorted({r["event_id"] for r in retraction_rows})
        erasure_ids = sorted({r["event_id"] for r in erasure_rows})
        o, r, e = observations, retractions, erasures
        # Pairs whose counting observation may have gone: refreshed from observations.
        stale: set[tuple[str, str, str, str]] = set()
        pair = (o.c.subject_id, o.c.context, o.c.attribute, o.c.source)
        if retraction_ids:
            stale.update(tuple(row) for row in conn.execute(
                sa.update(o).where(
                    r.c.event_id.in_(retraction_ids), o.c.event_id == r.c.retracted_event_id,
                    o.c.source == r.c.source, o.c.retracted_by.is_(None),
                ).values(retracted_by=r.c.event_id).returning(*pair)
            ))
        if erasure_ids and self.keyring is not None:
            for x in erasure_rows:
                self.keyring.destroy(x["subject_id"], to_millis(x["occurred_at"]),
                                     now_millis(), conn)
        if erasure_ids:
            stale.update(tuple(row) for row in conn.execute(
                sa.update(o).where(
                    e.c.event_id.in_(erasure_ids), o.c.subject_id == e.c.subject_id,
                    o.c.occurred_at <= e.c.occurred_at, o.c.erased_by.is_(None),
                ).values(erased_by=e.c.event_id, value=None, evidence=None, metadata=None)
                .returning(*pair)
            ))
        if obs_ids:
            # Retractions and erasures that arrived before these observations.
            conn.execute(sa.update(o).where(
                o.c.event_id.in_(obs_ids), r.c.retracted_event_id == o.c.event_id,
                r.c.source == o.c.source, o.c.retracted_by.is_(None),
            ).values(retracted_by=r.c.event_id))
            conn.execute(sa.update(o).where(
                o.c.event_id.in_(obs_ids), e.c.subject_id == o.c.subject_id,
                o.c.occurred_at <= e.c.occurred_at, o.c.erased_by.is_(None),
            ).values(erased_by=e.c.event_id, value=None, evidence=None, metadata=None))
            self._advance_sources(conn, obs_ids)
        if stale:
            self._refresh_sources(conn, sorted(stale))
        keys = {(x["subject_id"], x["context"], x["attribute"]) for x in obs_rows}
        keys.update(p[:3] for p in stale)
        return keys

    @staticmethod
    def _counting_latest(where: sa.ColumnElement[bool]) -> sa.Select:
        o = observations
        return (
            sa.select(o.c.subject_id, o.c.context, o.c.attribute, o.c.source, o.c.event_id,
                      o.c.occurred_at, o.c.value, o.c.confidence)
            .where(where, o.c.retracted_by.is_(None), o.c.erased_by.is_(None))
            .ext(distinct_on(o.c.subject_id, o.c.context, o.c.attribute, o.c.source))
            .order_by(o.c.subject_id, o.c.context, o.c.attribute, o.c.source,
                      o.c.occurred_at.desc(), o.c.event_id.desc())
        )

    def _advance_sources(self, conn: sa.Connection, obs_ids: list[str]) -> None:
        """Upsert each (belief, source)'s newest counting observation among ``obs_ids``,
        where it is newer than the stored one."""
        bs = belief_sources
        latest = self._counting_latest(observations.c.event_id.in_(obs_ids)).subquery()
        stmt = pg_insert(bs).from_select(
            [c.name for c in bs.columns], sa.select(*latest.c)
        )
        conn.execute(stmt.on_conflict_do_update(
            index_elements=["subject_id", "context", "attribute", "source"],
            set_={c: stmt.excluded[c] for c in ("event_id", "occurred_at", "value", "confidence")},
            where=sa.tuple_(bs.c.occurred_at, bs.c.event_id)
            < sa.tuple_(stmt.excluded.occurred_at, stmt.excluded.event_id),
        ))

    def _refresh_sources(self, conn: sa.Connection,
                         pairs: list[tuple[str, str, str, str]]) -> None:
        """Recompute ``belief_sources`` rows of ``pairs`` from ``observations``: per pair,
        one probe of the partial index ``observations_counting_latest`` (LATERAL ... LIMIT 1)."""
        bs, o = belief_sources, observations
        for chunk in _chunks(pairs):
            conn.execute(sa.delete(bs).where(
                sa.tuple_(bs.c.subject_id, bs.c.context, bs.c.attribute, bs.c.source)
                .in_(chunk)))
            wanted = sa.values(
                sa.column("s", sa.Text), sa.column("c", sa.Text), sa.column("a", sa.Text),
                sa.column("src", sa.Text), name="wanted",
            ).data(list(chunk))
            latest = (
                sa.select(o.c.subject_id, o.c.context, o.c.attribute, o.c.source,
                          o.c.event_id, o.c.occurred_at, o.c.value, o.c.confidence)
                .where(o.c.subject_id == wanted.c.s, o.c.context == wanted.c.c,
                       o.c.attribute == wanted.c.a, o.c.source == wanted.c.src,
                       o.c.retracted_by.is_(None), o.c.erased_by.is_(None))
                .order_by(o.c.occurred_at.desc(), o.c.event_id.desc())
                .limit(1)
                .lateral("latest")
            )
            conn.execute(pg_insert(bs).from_select(
                [c.name for c in bs.columns],
                sa.select(*latest.c).select_from(wanted).join(latest, sa.true())))

    def recompute(self, conn: sa.Connection, keys: Iterable[Key]) -> int:
        """Refold ``keys`` from their ``belief_sources`` rows; upsert (or delete) their beliefs."""
        ordered = sorted(keys)
        bs = belief_sources
        for chunk in _chunks(ordered):
            events = [
                ObservationRecorded(
                    event_id=row.event_id, subject_id=row.subject_id, source=row.source,
                    occurred_at=to_millis(row.occurred_at), context=row.context,
                    attribute=row.attribute, value=row.value, confidence=row.confidence,
                )
                for row in conn.execute(sa.select(bs).where(
                    sa.tuple_(bs.c.subject_id, bs.c.context, bs.c.attribute).in_(chunk)))
            ]
            folded = {b.key: b for b in fold(events, self.fold_settings)}
            gone = [k for k in chunk if k not in folded]
            if folded:
                stmt = pg_insert(beliefs)
                conn.execute(stmt.on_conflict_do_update(
                    index_elements=["subject_id", "context", "attribute"],
                    set_={c: stmt.excluded[c] for c in _BELIEF_FIELDS} | {
                        "updated_at": sa.func.now()
                    },
                ), [_belief_row(b) for b in folded.values()])
            if gone:
                conn.execute(sa.delete(beliefs).where(
                    sa.tuple_(beliefs.c.subject_id, beliefs.c.context, beliefs.c.attribute)
                    .in_(gone)
                ))
        return len(ordered)


_BELIEF_FIELDS = ("value", "confidence", "score", "alternatives", "support", "sources",
                  "source_count", "last_observed_at")


def _belief_row(b: Belief) -> dict:
    return {
        "subject_id": b.subject_id, "context": b.context, "attribute": b.attribute,
        "value": b.value, "confidence": b.confidence, "score": b.score,
        "alternatives": b.alternatives, "support": list(b.support), "sources": list(b.sources),
        "source_count": b.source_count, "last_observed_at": from_millis(b.last_observed_at),
    }


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
