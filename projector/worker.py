"""The projector worker: the one place that touches Kafka and PostgreSQL together.

Loop: poll a batch from the event topic → decode each message (poison messages go
to the dead-letter topic with headers naming the error and the original
topic/partition/offset) → apply the batch and every partition's next offset in one
PostgreSQL transaction (:meth:`ProjectionRecorder.apply`). On start it seeks every
partition to the offset stored in ``projection_offsets`` (offset 0 when none), so a
crash at any point applies each event exactly once. Kafka's own consumer-group
offsets are never committed: PostgreSQL is the only record of progress.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field, replace
from typing import Any

import sqlalchemy as sa
from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import OffsetOutOfRangeError

from beliefstore.errors import LogResetError, PoisonEvent
from beliefstore.events.model import ObservationRecorded, SubjectErased
from beliefstore.events.sealing import EventShredded
from beliefstore.events.serde import AvroSerde, DecodedEvent
from beliefstore.events.topics import ensure_topics
from beliefstore.projector import bulk, metrics
from beliefstore.projector.rebuild_pool import (
    MIN_EVENTS,
    POISON,
    RANGE,
    SHREDDED,
    Item,
    RebuildPool,
    default_workers,
    gc_paused,
)
from beliefstore.projector.store import (
    FreshLoad,
    LoggedEvent,
    LogPosition,
    PartitionProgress,
    ProjectionRecorder,
    finish,
)
from beliefstore.settings import Settings

log = logging.getLogger("beliefstore.projector")


DLQ_HEADERS = (
    "beliefstore.error.kind",
    "beliefstore.error.reason",
    "beliefstore.original.topic",
    "beliefstore.original.partition",
    "beliefstore.original.offset",
    "beliefstore.original.timestamp",
)
"""Headers (UTF-8 values) of every message on the dead-letter topic."""

LOG_END_CONFIRM_S = 3.0
"""How long a partition's high watermark must stay below the worker's position before that
is a log reset, seconds. Tansu 0.6.0 on S3 storage can answer a fetch with a high
watermark below one it already served (its in-memory copy of the partition's
``watermark.json`` is overwritten by a concurrent request's older copy; the stored one
never goes back), and the next fetch reads the right one; a broker that lost its log
stays below for good."""

FETCH_MAX_WAIT_MS = 20
"""Default longest wait of a projector fetch at the broker, ms (``BELIEFSTORE_FETCH_MAX_WAIT_MS``
unset). Tansu does not answer a waiting fetch when a record arrives: it looks at its
storage, sleeps the rest of the wait and looks again (``tansu-broker`` ``fetch.rs``), so
on the embedded ``memory://`` broker a lone event waits for up to this long before the
projector sees it. Measured here (one record at a time, kafka-python consumer): ack →
consumer p50 16 ms, max 50 ms with 100 ms; 2 ms, max 6 ms with 10 ms; an idle consumer
costs 1.7 % of a core (and Tansu 1.3 %) with 100 ms, 7 % (3.5 %) with 20 ms, 12 %
(4.5 %) with 10 ms. A broker that answers a waiting fetch at once (Apache Kafka) only
sees more empty fetches while the topic is idle."""


@dataclass
class WorkerStats:
    """Counters since the worker started.

    Attributes:
        batches: transactions committed.
        events: valid events applied (duplicates included).
        poison: messages sent to the dead-letter topic.
        beliefs_recomputed: beliefs refolded (a key counts once per batch).
        shredded: sealed observations skipped because their subject was erased.
        started: ``time.monotonic()`` at start, seconds.
    """

    batches: int = 0
    events: int = 0
    poison: int = 0
    beliefs_recomputed: int = 0
    shredded: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def rate(self) -> float:
        """Messages (valid + poison + shredded) per second since start."""
        return (self.events + self.poison + self.shredded) / max(
            time.monotonic() - self.started, 1e-9)


@dataclass
class _Prepared:
    """A polled and decoded batch, ready for :meth:`ProjectorWorker._commit`.

    Attributes:
        batch: the valid events; progress: every polled partition's next offset.
        poison, shredded: messages dead-lettered, sealed messages of erased subjects.
        messages: every message polled; first_offsets: partition → first offset polled.
        epochs: the partitions' epochs when it was polled (the commit's fence).
        started: ``time.perf_counter()`` at the poll, seconds.
        deferred: records not decoded yet (not in ``batch``, ``poison`` or ``shredded``):
            those about subjects whose erasure was committing when this batch was read
            ahead (:meth:`ProjectorWorker.process_batch`).
    """

    batch: list[LoggedEvent]
    progress: dict[int, PartitionProgress]
    poison: int
    shredded: int
    messages: int
    first_offsets: dict[int, int]
    epochs: dict[int, int]
    started: float
    deferred: dict[Any, list[ConsumerRecord]] = field(default_factory=dict)


class ProjectorWorker:
    """Consumes the event topic and keeps the read model up to date.

    Args:
        settings: topic, DLQ topic, batch size, poll timeout, projection name, fold settings.
        engine: engine on the read model's schema (tables migrated).
        serde: Avro serde (default: :meth:`AvroSerde.for_settings`; pass one built from the
            base settings when ``settings.db_schema`` is a projection's schema, since the
            keyring lives in the base schema).
        partitions: the partitions to own (manual assignment); default all of the topic's.
        group: consumer-group id; when set, partitions are spread over the group's
            members by Kafka (``partitions`` is ignored) and each member claims those it
            gets in PostgreSQL (see :meth:`ProjectionRecorder.claim`).

    Every worker claims its partitions (bumping their epoch) and presents the epochs at
    each commit: a worker that lost a partition, to a rebalance or to a second worker,
    cannot commit for it any more (:class:`~beliefstore.errors.FencedError`).

    The batch transactions (claims and everything else stay synchronous) commit
    asynchronously (``SET LOCAL synchronous_commit TO off``,
    :attr:`ProjectionRecorder.asynchronous_commit`). Why: freshness. A batch's commit
    then returns without waiting for the WAL flush (an fsync: milliseconds, and far more
    on a busy disk), and the NOTIFY that tells the API is delivered at once. Exactly once
    still holds: a batch's rows and its partitions' next offsets are in one transaction,
    so a PostgreSQL crash loses both (at most the last ~3 × ``wal_writer_delay``, 0.6 s by
    default) or neither, and the projector re-reads the lost events from Kafka, where
    they are kept. Only an answer read in that window may revert until they are
    re-applied.
    """

    def __init__(
        self,
        settings: Settings,
        engine: sa.Engine,
        *,
        serde: AvroSerde | None = None,
        partitions: list[int] | None = None,
        group: str | None = None,
    ):
        if not settings.kafka_bootstrap_servers:
            raise ValueError("settings.kafka_bootstrap_servers is not set")
        self.settings = settings
        self.serde = serde or AvroSerde.for_settings(settings)
        self.recorder = ProjectionRecorder(
            engine, settings.projection, settings.fold_settings,
            keyring=self.serde.sealer.keyring if self.serde.sealer else None,
            temp_buffers_kib=bulk.live_temp_buffers_kib(settings.batch_size))
        # Freshness: the batch transactions (only they) commit asynchronously.
        self.recorder.asynchronous_commit = True
        self.stats = WorkerStats()
        self.timings: dict[str, float] = {}
        """Seconds spent since this worker was made polling (``poll``) and decoding and
        dead-lettering (``decode``) its batches, for benchmarks and profiles (the
        apply's own phases are :attr:`ProjectionRecorder.timings`)."""
        self._wanted_partitions = partitions
        self.group = group
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._epochs: dict[int, int] = {}
        self._consumer: KafkaConsumer | None = None
        self._dlq: KafkaProducer | None = None
        #: partitions whose high watermark is below the position: since when (monotonic s)
        self._behind_end: dict[TopicPartition, float] = {}
        #: the next batch, polled and decoded while PostgreSQL applied the previous one
        self._ahead: _Prepared | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Create the topics if needed, assign partitions and seek to the stored offsets.

        On failure (the broker or PostgreSQL unreachable, most often at the claim) the
        Kafka clients made so far are closed before the error propagates: each has a
        network thread that would otherwise keep reconnecting for the life of the
        process (one more per retry of :class:`~beliefstore.runtime.serve.ProjectorThread`).
        """
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        s = self.settings
        assert s.kafka_bootstrap_servers  # checked in __init__
        ensure_topics(
            s.kafka_bootstrap_servers,
            {s.topic: s.partitions, s.dlq_topic: s.partitions},
            replication_factor=s.replication_factor,
            client_config=s.kafka_client_config(),
        )
        self._consumer = KafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap_servers,
            client_id=f"beliefstore-projector-{s.projection}",
            group_id=self.group,
            # Offsets live in PostgreSQL only; the group is used for assignment alone.
            enable_auto_commit=False,
            # Never jump silently: a stored offset outside the log is a LogResetError.
            auto_offset_reset="none",
            max_poll_records=s.batch_size,
            # Freshness: see FETCH_MAX_WAIT_MS (100 ms on `up`'s durable embedded broker,
            # whose fetch lists the partition's objects: runtime/startup.py).
            fetch_max_wait_ms=s.fetch_max_wait_ms or FETCH_MAX_WAIT_MS,
            session_timeout_ms=10_000,
            heartbeat_interval_ms=3_000,
            **s.kafka_client_config(),
        )
        self._dlq = KafkaProducer(
            bootstrap_servers=s.kafka_bootstrap_servers,
            client_id="beliefstore-projector-dlq",
            acks="all",
            enable_idempotence=True,
            max_in_flight_requests_per_connection=1,  # see events/producer.py
            **s.kafka_client_config(),
        )
        if self.group:
            self._consumer.subscribe([s.topic], listener=_Rebalance(self))
            log.info("projector %r joining consumer group %r on %s as %s", s.projection,
                     self.group, s.topic, self.owner)
            return
        partitions = self._wanted_partitions or self._topic_partitions()
        tps = [TopicPartition(s.topic, p) for p in partitions]
        self._consumer.assign(tps)
        self._claim(tps)

    def _claim(self, tps: list[TopicPartition]) -> None:
        """Claim ``tps`` in PostgreSQL and seek each to its stored next offset."""
        assert self._consumer is not None
        claims = self.recorder.claim(self.settings.topic, [tp.partition for tp in tps],
                                     self.owner)
        for tp in tps:
            self._epochs[tp.partition] = claims[tp.partition].epoch
            self._consumer.seek(tp, claims[tp.partition].next_offset)
        log.info("projector %r owns partition(s) %s of %s; resuming at %s",
                 self.settings.projection, sorted(claims), self.settings.topic,
                 {p: c.next_offset for p, c in sorted(claims.items())})

    def _topic_partitions(self, timeout_s: float = 30.0) -> list[int]:
        assert self._consumer is not None
        deadline = time.monotonic() + timeout_s
        while True:
            found = self._consumer.partitions_for_topic(self.settings.topic)
            if found:
                return sorted(found)
            if time.monotonic() > deadline:
                raise RuntimeError(f"topic {self.settings.topic!r} has no partitions")
            time.sleep(0.2)

    def close(self) -> None:
        """Release the Kafka clients (the read model is always consistent)."""
        if self._consumer is not None:
            self._consumer.close(autocommit=False)
            self._consumer = None
        if self._dlq is not None:
            self._dlq.close(timeout=10)
            self._dlq = None

    def __enter__(self) -> ProjectorWorker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the loop ----------------------------------------------------------------------

    def run(
        self,
        stop: threading.Event | None = None,
        *,
        until_caught_up: bool = False,
        on_batch: Callable[[WorkerStats], None] | None = None,
        keep_running: Callable[[], bool] | None = None,
    ) -> WorkerStats:
        """Process batches until ``stop`` is set, or ``keep_running()`` turns false (checked
        between batches), or, with ``until_caught_up``, every partition's position reaches
        its high watermark. The batch in progress is always finished and committed first;
        a batch read ahead (:meth:`process_batch`) is left for the next call, or dropped
        with the worker: it was not applied, so a new worker reads it again from the
        stored offsets.
        """
        if self._consumer is None:
            self.start()
        while not (stop is not None and stop.is_set()):
            if keep_running is not None and not keep_running():
                break
            applied = self.process_batch()
            if applied and on_batch is not None:
                on_batch(self.stats)
            if until_caught_up and not applied and self.lag() == 0:
                break
        return self.stats

    def lag(self) -> int | None:
        """Messages not yet applied: between this worker's positions and the high
        watermarks, plus the batch read ahead (:meth:`process_batch`); ``None`` if a
        partition's high watermark is not known yet (no fetch response seen), is below the
        position (not yet confirmed as a log reset: :data:`LOG_END_CONFIRM_S`), or no
        partition is assigned (yet)."""
        assert self._consumer is not None
        if not self._consumer.assignment():
            return None
        total = 0
        for tp in self._consumer.assignment():
            hw = self._consumer.highwater(tp)
            if hw is None or tp in self._behind_end:
                return None
            total += max(0, hw - self._next_to_apply(tp))
        return total

    def partition_lags(self) -> dict[int, int]:
        """Messages not yet applied of each assigned partition whose high watermark is
        known (after the last poll): between the position and the high watermark, plus
        those of the batch read ahead."""
        assert self._consumer is not None
        lags = {}
        for tp in self._consumer.assignment():
            hw = self._consumer.highwater(tp)
            if hw is not None:
                lags[tp.partition] = max(0, hw - self._next_to_apply(tp))
        return lags

    def _next_to_apply(self, tp: TopicPartition) -> int:
        """Offset of ``tp``'s next message not yet applied: the first of the batch read
        ahead, else the consumer's position."""
        assert self._consumer is not None
        ahead = self._ahead
        if ahead is not None and tp.partition in ahead.first_offsets:
            return ahead.first_offsets[tp.partition]
        return self._consumer.position(tp)

    def process_batch(self) -> int:
        """Apply the next batch in one transaction; return messages handled (0: nothing
        came back from a poll).

        The next batch is the one read ahead during the previous call, or else one poll.
        While PostgreSQL works on the batch's events (the pause of
        :meth:`ProjectionRecorder.apply_stages`), the batch after it is read ahead: polled
        (without waiting: only what the consumer has fetched already) and decoded, so
        this process's decoding overlaps the server's work. Not in a consumer group (a
        rebalance inside that poll would claim partitions whose offset rows the batch
        holds locked). The messages read ahead about a subject the batch erases are
        decoded only after it commits, which destroys the subject's data keys: a sealed
        observation among them is then shredded, as when the batches run one after the
        other.

        After an error the worker must be closed: its consumer's position is past the
        batch that failed (:class:`~beliefstore.runtime.serve.ProjectorThread` builds a
        new worker, which resumes at the stored offsets).
        """
        prepared, self._ahead = self._ahead, None
        if prepared is None:
            prepared = self._prepare()
        elif prepared.deferred:
            prepared = self._complete(prepared)
        return 0 if prepared is None else self._commit(prepared)

    def _prepare(self, timeout_ms: int | None = None,
                 defer: frozenset[bytes] = frozenset()) -> _Prepared | None:
        """Poll once (``timeout_ms``, default the settings' poll timeout), decode,
        dead-letter the poison: the next batch, ready to apply (``None``: nothing came
        back). Messages keyed by a subject of ``defer`` (or not keyed) are left
        undecoded, in :attr:`_Prepared.deferred` (see :meth:`_complete`). Touches Kafka
        only, and the keyring's data keys for sealed observations."""
        assert self._consumer is not None
        started = time.perf_counter()
        try:
            polled = self._consumer.poll(
                timeout_ms=self.settings.poll_timeout_ms if timeout_ms is None else timeout_ms,
                max_records=self.settings.batch_size,
            )
        except OffsetOutOfRangeError as exc:
            raise self._log_reset(str(exc)) from exc
        self.timings["poll"] = self.timings.get("poll", 0.0) + time.perf_counter() - started
        for tp in self._consumer.assignment():
            hw = self._consumer.highwater(tp)
            if hw is None or self._consumer.position(tp) <= hw:
                self._behind_end.pop(tp, None)
                continue
            since = self._behind_end.setdefault(tp, time.monotonic())
            if time.monotonic() - since >= LOG_END_CONFIRM_S:
                raise self._log_reset(
                    f"partition {tp.partition}: stored offset {self._consumer.position(tp)} is "
                    f"beyond the log end {hw} for {LOG_END_CONFIRM_S:.0f} s"
                )
        metrics.record_lag(self.settings.topic, self.partition_lags())
        if not polled:
            return None
        now, deferred = polled, {}
        if defer:
            now = {tp: [r for r in records if r.key is not None and r.key not in defer]
                   for tp, records in polled.items()}
            deferred = {tp: waiting for tp, records in polled.items()
                        if (waiting := [r for r in records
                                        if r.key is None or r.key in defer])}
        batch, poison, shredded = self._open(now)
        return _Prepared(
            batch=batch, progress={tp.partition: PartitionProgress(
                next_offset=records[-1].offset + 1,
                high_watermark=self._consumer.highwater(tp),
            ) for tp, records in polled.items()},
            poison=poison, shredded=shredded,
            messages=sum(len(records) for records in polled.values()),
            first_offsets={tp.partition: records[0].offset for tp, records in polled.items()
                           if records},
            epochs=dict(self._epochs), started=started, deferred=deferred)

    def _open(self, polled: dict[Any, list[ConsumerRecord]]
              ) -> tuple[list[LoggedEvent], int, int]:
        """Decode ``polled`` and dead-letter its poison: ``(events, poison, shredded)``,
        the last two counts of messages. Its seconds add to ``timings["decode"]``."""
        started = time.perf_counter()
        batch: list[LoggedEvent] = []
        poison: list[tuple[ConsumerRecord, PoisonEvent]] = []
        shredded = 0
        opened = self._decode_all(polled)
        for records in polled.values():
            for record in records:
                item = opened[id(record)]
                if item is None:
                    shredded += 1
                elif isinstance(item, PoisonEvent):
                    poison.append((record, item))
                else:
                    batch.append(item)
        if poison:
            self._dead_letter(poison)
        self.timings["decode"] = self.timings.get("decode", 0.0) + time.perf_counter() \
            - started
        return batch, len(poison), shredded

    def _complete(self, p: _Prepared) -> _Prepared:
        """``p`` with its deferred messages decoded (after the erasures they waited for
        committed)."""
        batch, poison, shredded = self._open(p.deferred)
        return replace(p, batch=p.batch + batch, poison=p.poison + poison,
                       shredded=p.shredded + shredded, deferred={})

    def _commit(self, p: _Prepared) -> int:
        """Apply a prepared batch in one transaction, reading the next one ahead in its
        pause when allowed (see :meth:`process_batch`); return its messages. An error of
        the read-ahead is raised once the batch has committed."""
        stages = self.recorder.apply_stages(self.settings.topic, p.batch, p.progress,
                                            p.epochs)
        ahead_error: Exception | None = None
        try:
            next(stages)
            if self.group is None:
                erased = frozenset(item.event.subject_id.encode("utf-8") for item in p.batch
                                   if isinstance(item.event, SubjectErased))
                try:
                    self._ahead = self._prepare(timeout_ms=0, defer=erased)
                except Exception as exc:  # the read-ahead's: raised after the commit
                    ahead_error = exc
            recomputed = finish(stages)
        except BaseException:
            self._ahead = None
            raise
        finally:
            stages.close()
        self.stats.batches += 1
        self.stats.events += len(p.batch)
        self.stats.poison += p.poison
        self.stats.shredded += p.shredded
        self.stats.beliefs_recomputed += recomputed
        metrics.record_batch(time.perf_counter() - p.started, len(p.batch), p.poison,
                             p.messages - len(p.batch) - p.poison)
        log.debug("batch: %d events, %d poison, %d beliefs", len(p.batch), p.poison,
                  recomputed)
        if ahead_error is not None:
            raise ahead_error
        return p.messages

    def rebuild(self, on_progress: Callable[[WorkerStats, int | None], None] | None = None,
                *, max_records: int = 20_000, workers: int | None = None) -> WorkerStats:
        """The bulk path of a replay into a fresh projection: read every owned partition
        from its stored offset (0: the projection must be empty) to its high watermark in
        large polls (``max_records`` messages each), decode them (poison to the
        dead-letter topic, as :meth:`process_batch`) and stream them into one
        transaction that ends with the offsets (:meth:`ProjectionRecorder.fresh_load`).

        ``workers``: processes that read ranges of the partitions themselves, decode
        them and build their ``COPY`` lines
        (:class:`~beliefstore.projector.rebuild_pool.RebuildPool`, :meth:`_load_ranges`)
        while this one streams the lines in log order and keeps what crosses partitions
        (deduplication, retractions, erasures, marks); ``0``: read and decode here;
        ``None`` (default): one per CPU when the partitions' end offsets show at least
        :data:`~beliefstore.projector.rebuild_pool.MIN_EVENTS` messages to read and
        there is more than one CPU, else ``0``. Both give the same rows.

        ``on_progress(stats, total)`` is called after every poll or loaded range
        (``total``: messages to read, ``None`` until every high watermark is known). Afterwards
        ``rebuild_timings`` holds the seconds of each phase (reading and streaming the
        log, then those of :attr:`FreshLoad.timings
        <beliefstore.projector.store.FreshLoad.timings>`, and with worker processes
        ``fold_in_workers_s``: from the fold's start to its last part). Without a crash
        the result equals what :meth:`run` would have built; a crash leaves the
        projection empty.

        Raises:
            ValueError: the projection already holds events, or the worker is in a
                consumer group, or ``workers`` < 0.
            LogResetError, FencedError: as :meth:`process_batch`.
        """
        if self.group:
            raise ValueError("a bulk rebuild owns its partitions: no consumer group")
        if workers is not None and workers < 0:
            raise ValueError(f"workers must be 0 or more, not {workers}")
        if self._consumer is None:
            self.start()
        assert self._consumer is not None
        started = {tp: self._consumer.position(tp) for tp in self._consumer.assignment()}
        progress: dict[int, PartitionProgress] = {}
        clock = time.perf_counter()
        with contextlib.ExitStack() as stack:
            # millions of rows' tuples and strings, no cycles: no collector passes over them
            stack.enter_context(gc_paused())
            load = stack.enter_context(self.recorder.fresh_load(self.settings.topic,
                                                                self._epochs))
            pool: RebuildPool | None = None
            if workers != 0:
                # The log's size now. Tansu 0.6.0 can answer ListOffsets with less than
                # the log end (tests/test_replay_pool.py lost the last events of each
                # partition when these were taken as the ends): a lower bound only, and
                # the last range of each partition reads on to the end its fetches report.
                ends = self._consumer.end_offsets(list(started))
                todo = {tp: (pos, max(pos, ends.get(tp) or 0))
                        for tp, pos in started.items()}
                ahead = sum(end - pos for pos, end in todo.values())
                count = workers if workers is not None else (
                    default_workers() if ahead >= MIN_EVENTS else 1)
                if workers is not None or count > 1:
                    pool = stack.enter_context(RebuildPool(self.settings, self.serde,
                                                           count))
                    self._load_ranges(load, pool, todo, progress, on_progress)
            while pool is None:  # one process: this one reads and decodes
                try:
                    polled = self._consumer.poll(timeout_ms=self.settings.poll_timeout_ms,
                                                 max_records=max_records)
                except OffsetOutOfRangeError as exc:
                    raise self._log_reset(str(exc)) from exc
                lag = self.lag()
                for tp, records in polled.items():
                    progress[tp.partition] = PartitionProgress(
                        next_offset=records[-1].offset + 1,
                        high_watermark=self._consumer.highwater(tp))
                self._load_polled(load, polled)
                if on_progress is not None:
                    done = self.stats.events + self.stats.poison + self.stats.shredded
                    on_progress(self.stats, None if lag is None else done + lag)
                if not polled and lag == 0:
                    break
            for tp, position in started.items():
                progress.setdefault(tp.partition, PartitionProgress(
                    next_offset=position, high_watermark=self._consumer.highwater(tp)))
            read_s = time.perf_counter() - clock
            self.stats.beliefs_recomputed += load.finish(progress, pool)
            self.rebuild_timings: dict[str, float] = {"read_and_stream_s": read_s, **load.timings,
                                    "workers": pool.workers if pool else 0}
            if pool is not None:  # the workers' fold, from its start (in marks_and_fold_s)
                self.rebuild_timings["fold_in_workers_s"] = pool.fold_seconds
        self.rebuild_timings["total_s"] = time.perf_counter() - clock
        log.info("rebuild phases: %s", self.rebuild_timings)
        self.stats.batches += 1
        return self.stats

    def _load_ranges(self, load: FreshLoad, pool: RebuildPool,
                     todo: dict[TopicPartition, tuple[int, int]],
                     progress: dict[int, PartitionProgress],
                     on_progress: Callable[[WorkerStats, int | None], None] | None) -> None:
        """A rebuild's reading phase with the worker processes reading the log themselves
        (:meth:`RebuildPool.read <beliefstore.projector.rebuild_pool.RebuildPool.read>`):
        ``todo`` maps each partition to its ``(start, end)`` offsets, ``end`` known to be
        on the log (a lower bound of its end); each is cut into ranges of
        :data:`~beliefstore.projector.rebuild_pool.RANGE` offsets and one last range that
        reads on to the end the fetches report, read and decoded by whichever worker is
        free (a few ranges in flight, round robin over the partitions), and loaded here
        in log order per partition (:meth:`_load_items`). ``progress``
        gets each partition's offsets as its ranges are loaded."""
        total = sum(end - start for start, end in todo.values())
        done0 = self.stats.events + self.stats.poison + self.stats.shredded
        cursor: dict[TopicPartition, int | None] = {tp: start
                                                    for tp, (start, _) in todo.items()}
        queues: dict[TopicPartition, collections.deque[Future]] = {
            tp: collections.deque() for tp in todo}
        limit = 3 * pool.workers
        inflight = 0
        while True:
            while inflight < limit:  # round robin over the partitions with ranges left
                left = [tp for tp in todo if cursor[tp] is not None]
                if not left:
                    break
                for tp in sorted(left, key=lambda tp: len(queues[tp])):
                    start = cursor[tp]
                    if inflight >= limit or start is None:
                        break
                    end = todo[tp][1]
                    stop = start + RANGE if start + RANGE < end else None
                    queues[tp].append(pool.read(tp.topic, tp.partition, start, stop))
                    cursor[tp] = stop
                    inflight += 1
            heads = [q[0] for q in queues.values() if q]
            if not heads:
                return
            wait(heads, return_when=FIRST_COMPLETED)
            for tp, queue in queues.items():
                while queue and queue[0].done():
                    future = queue.popleft()
                    inflight -= 1
                    try:
                        items, poisoned, next_offset = future.result()
                    except OffsetOutOfRangeError as exc:
                        raise self._log_reset(str(exc)) from exc
                    records = {i: ConsumerRecord(tp.topic, tp.partition, -1, offset,
                                                 timestamp, 0, key, value, [], None,
                                                 -1, -1, -1)
                               for i, (offset, timestamp, key, value) in poisoned.items()}
                    self._load_items(load, tp.partition, records, items)
                    progress[tp.partition] = PartitionProgress(
                        next_offset=next_offset,
                        high_watermark=max(next_offset, todo[tp][1]))
                    if on_progress is not None:
                        done = self.stats.events + self.stats.poison + self.stats.shredded
                        on_progress(self.stats, max(done, done0 + total))

    def _load_polled(self, load: FreshLoad, polled: dict[Any, list[ConsumerRecord]]) -> None:
        """One poll of a rebuild decoded here (poison to the dead-letter topic), into
        ``load``."""
        opened = self._decode_all(polled)
        poison: list[tuple[ConsumerRecord, PoisonEvent]] = []
        logged: list[LoggedEvent] = []
        for records in polled.values():
            for record in records:
                item = opened[id(record)]
                if item is None:
                    self.stats.shredded += 1
                elif isinstance(item, PoisonEvent):
                    poison.append((record, item))
                else:
                    logged.append(item)
        if poison:
            self._dead_letter(poison)
            self.stats.poison += len(poison)
        load.add(logged)
        self.stats.events += len(logged)

    def _load_items(self, load: FreshLoad, partition: int,
                    records: list[ConsumerRecord] | dict[int, ConsumerRecord],
                    items: list[Item]) -> None:
        """Decoded records of one partition (:data:`~beliefstore.projector.rebuild_pool.Item`
        s) into ``load``; a ``POISON`` item's record (``records[index]``) to the
        dead-letter topic."""
        poison = [(records[item[1]], PoisonEvent(item[2], item[3]))
                  for item in items if item[0] == POISON]
        shredded = sum(1 for item in items if item[0] == SHREDDED)
        if poison:
            self._dead_letter(poison)
            self.stats.poison += len(poison)
        self.stats.shredded += shredded
        load.add_items(partition, items)
        self.stats.events += len(items) - len(poison) - shredded

    def _log_reset(self, detail: str) -> LogResetError:
        s = self.settings
        return LogResetError(
            f"the read model's offsets for topic {s.topic!r} lie beyond the broker's log "
            f"({detail}): the broker lost its log, the topic was recreated, or "
            f"KAFKA_BOOTSTRAP_SERVERS={s.kafka_bootstrap_servers} is another cluster. Point "
            "at the cluster that holds the log, or rebuild the projection into a fresh "
            f"schema (BELIEFSTORE_DB_SCHEMA) from offset 0. Refusing to skip or re-apply events."
        )

    def _decode_all(self, polled: dict[Any, list[ConsumerRecord]]
                    ) -> dict[int, LoggedEvent | PoisonEvent | None]:
        """Decode every polled record (keyed by ``id(record)``). Sealed observations are
        opened after one query for all the data keys the batch needs."""
        first: dict[int, DecodedEvent | PoisonEvent] = {}
        key_ids: set[str] = set()
        decode_valid = self.serde.decode_valid
        for records in polled.values():
            for record in records:
                quick = decode_valid(record.value)
                if quick is not None:  # the common case: valid, unsealed, current schema
                    first[id(record)] = quick
                    continue
                try:
                    decoded = self.serde.decode(record.value, open_sealed=False)
                except PoisonEvent as exc:
                    first[id(record)] = exc
                    continue
                sealed = decoded.record.get("sealed")
                if isinstance(sealed, dict):
                    key_ids.add(str(sealed["key_id"]))
                first[id(record)] = decoded
        if key_ids and self.serde.sealer is not None:
            self.serde.sealer.keyring.prefetch(key_ids)
        return {
            id(record): self._decode(record, first[id(record)])
            for records in polled.values() for record in records
        }

    def _decode(self, record: ConsumerRecord, parsed: DecodedEvent | PoisonEvent | None = None
                ) -> LoggedEvent | PoisonEvent | None:
        try:
            if isinstance(parsed, PoisonEvent):
                raise parsed
            if parsed is None:
                decoded = self.serde.decode(record.value)
            elif parsed.record.get("sealed") is not None and isinstance(
                    parsed.event, ObservationRecorded):
                decoded = self.serde.open_decoded(parsed)
            else:
                decoded = parsed  # decode() validated it already: only sealed ones wait
        except PoisonEvent as exc:
            return exc
        except EventShredded:
            return None  # its subject was erased: nothing left to project
        if record.key is not None and record.key != decoded.event.subject_id.encode("utf-8"):
            return PoisonEvent(
                "invalid_event",
                f"message key {record.key!r} is not the event's subject_id "
                f"{decoded.event.subject_id!r}",
            )
        return LoggedEvent(decoded.event, LogPosition(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            recorded_at=record.timestamp if record.timestamp is not None
            and record.timestamp >= 0 else None,
            writer_fingerprint=decoded.writer.fingerprint.hex(),
        ))

    def _dead_letter(self, poison: list[tuple[ConsumerRecord, PoisonEvent]]) -> None:
        # Acknowledged before the batch commits: a crash in between re-sends the
        # message to the DLQ (at-least-once there), but never loses it.
        assert self._dlq is not None
        futures = []
        for record, error in poison:
            log.warning(
                "poison message %s[%d]@%d → %s: %s",
                record.topic, record.partition, record.offset, self.settings.dlq_topic, error,
            )
            headers = [
                (name, str(value).encode("utf-8"))
                for name, value in zip(DLQ_HEADERS, (
                    error.kind, error.reason, record.topic, record.partition, record.offset,
                    record.timestamp,
                ), strict=True)
            ]
            futures.append(self._dlq.send(
                self.settings.dlq_topic, key=record.key, value=record.value, headers=headers
            ))
        for f in futures:
            f.get(timeout=self.settings.produce_timeout_s)


class _Rebalance(ConsumerRebalanceListener):
    """Claims the partitions the group assigns, and forgets the ones it revokes.

    Kafka runs these callbacks inside ``poll()``, between batches, so no batch of this
    worker is in flight when a partition moves; a worker that stalls past the session
    timeout is fenced off by the epoch check instead.
    """

    def __init__(self, worker: ProjectorWorker):
        self.worker = worker

    def on_partitions_revoked(self, revoked) -> None:
        for tp in revoked:
            self.worker._epochs.pop(tp.partition, None)
        if revoked:
            log.info("partition(s) %s revoked from %s", sorted(tp.partition for tp in revoked),
                     self.worker.owner)

    def on_partitions_assigned(self, assigned) -> None:
        if assigned:
            self.worker._claim(sorted(assigned, key=lambda tp: tp.partition))
