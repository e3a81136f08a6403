"""The producer SDK: record observations, retractions and erasures on the event topic.

Every send is validated first (nothing invalid is ever produced), keyed by
``subject_id`` (so all events about one person stay in one partition, in order),
and returns only once the broker has acknowledged it (``acks="all"``, idempotent
producer), or raises.

This SDK writes to Kafka directly and is meant for trusted services. Agents that
only speak HTTP use ``POST /v1/observations``, which applies the same validation.
"""

from __future__ import annotations

import logging
import socket
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from kafka import KafkaProducer
from kafka.errors import KafkaError, KafkaTimeoutError

from beliefstore.errors import ProduceError
from beliefstore.events.model import (
    Event,
    ObservationRecorded,
    ObservationRetracted,
    SubjectErased,
)
from beliefstore.events.serde import AvroSerde
from beliefstore.events.validation import validate
from beliefstore.timefmt import now_millis, to_millis

log = logging.getLogger("beliefstore.producer")

UNCONFIRMED_RESENDS = 3
"""How many times a record acknowledged without an offset is sent again (see
:meth:`BeliefProducer._receipts`)."""


def _keyring_unreachable(exc: Exception, acknowledged: int, total: int) -> ProduceError:
    """The error of the events left unproduced when the keyring's database (sealing on)
    failed: how many of the ``total`` were acknowledged before."""
    return ProduceError(f"the keyring database is unreachable ({exc.__class__.__name__}); "
                        f"{acknowledged} of {total} event(s) were acknowledged")


@dataclass(frozen=True)
class Receipt:
    """Proof that the broker stored an event.

    Attributes:
        event_id: the event's UUID.
        topic: the topic it was appended to.
        partition: its partition.
        offset: its offset in that partition.
    """

    event_id: str
    topic: str
    partition: int
    offset: int


def _millis(occurred_at: int | datetime | None) -> int:
    if occurred_at is None:
        return now_millis()
    if isinstance(occurred_at, datetime):
        return to_millis(occurred_at)
    return occurred_at


class GroupCommit:
    """Group commit for concurrent sends: callers that arrive while groups are being
    produced wait, and are produced together as the next group.

    A caller that finds fewer than ``max_inflight`` groups in flight becomes a leader: it
    takes every queued event (up to ``max_group``, its own included), calls ``flush`` once
    for all of them and hands each waiting caller its own result. No timer is involved, so
    a lone caller is never delayed; under load the group size grows with the number of
    concurrent callers (the classic database "group commit"; PostgreSQL's
    ``commit_delay`` works alike). With ``max_inflight`` 2, the next group's work before
    the broker (its data-key transaction, encoding) overlaps the previous group's wait for
    its acknowledgement (the Kafka producer still sends them one request after the other);
    a group holding an erasure is then flushed alone (it starts once no group is in
    flight, and none starts until it is done), so the erasure's keys are destroyed before
    any event of a later group is sealed. :class:`BeliefProducer` uses 1: on the durable
    embedded broker two gave no more accepted requests (bench/README.md, section 8).

    Each waiting caller sleeps on its own condition (on the one lock): a finished group
    wakes its own callers, and only the first caller still queued is woken when the next
    group may start. (One condition for all woke every waiting caller on every change,
    most of them to sleep again: with 20 concurrent callers, a quarter of the API
    process's time holding the GIL went to those wake-ups, bench/README.md section 8.)

    With ``prepare``, a group is flushed in two steps: ``prepare(events)`` (the work
    before the broker: data keys, encoding, handing the records to the Kafka producer)
    counts as the group being in flight, and returns a function that waits for the
    acknowledgements, called once the next leader may start. So the next group is prepared
    while this one waits for the broker, and the Kafka producer (one request in flight)
    sends every group prepared meanwhile in its next request. A group holding an erasure
    is flushed whole with ``flush``, once no group is being prepared or waiting.

    Args:
        flush: produces a list of events and returns one result per event, in order
            (a :class:`Receipt`, or the exception for that event alone).
        max_group: most events in one group.
        max_inflight: most groups being flushed (or prepared) at once.
        prepare: optional, see above; it must not raise for one event alone (the
            exception it raises is every event's result).
    """

    def __init__(self, flush: Callable[[Sequence[Event]], Sequence[Receipt | Exception]],
                 max_group: int = 500, max_inflight: int = 1,
                 prepare: Callable[[Sequence[Event]],
                                   Callable[[], Sequence[Receipt | Exception]]] | None = None):
        self._flush = flush
        self._prepare = prepare
        self._max_group = max_group
        self._max_inflight = max_inflight
        self._lock = threading.Lock()
        self._queue: list[_Slot] = []
        self._inflight = 0
        self._waiting = 0  # prepared groups waiting for their acknowledgements
        self._exclusive = False

    def _may_lead(self) -> bool:
        if self._exclusive or self._inflight >= self._max_inflight:
            return False
        # an erasure waiting: the next group starts only once none is in flight (no
        # starvation), and takes it along
        return (self._inflight == 0 and self._waiting == 0) or not any(
            isinstance(s.event, SubjectErased) for s in self._queue)

    def submit(self, event: Event) -> Receipt:
        """Produce ``event`` with whatever else is queued; return its receipt.

        Raises:
            ProduceError: this event was not acknowledged.
        """
        slot = _Slot(event, self._lock)
        with self._lock:
            self._queue.append(slot)
            while not slot.done and (slot.taken or not self._may_lead()):
                slot.wake.wait()
            if slot.done:
                return slot.outcome()
            # first come first, up to the limit; the leader's own event always in its group
            queue = self._queue
            group = queue[:self._max_group]
            if slot not in group:
                group = [*queue[:self._max_group - 1], slot]
            for s in group:
                s.taken = True
            self._queue = [s for s in queue if not s.taken]
            exclusive = any(isinstance(s.event, SubjectErased) for s in group)
            self._inflight += 1
            self._exclusive = exclusive
        results: list[Receipt | Exception] = []
        events = [s.event for s in group]
        released = False
        try:
            try:
                if self._prepare is None or exclusive:
                    results = list(self._flush(events))
                else:
                    wait = self._prepare(events)
                    with self._lock:  # the next leader may prepare its group now
                        self._inflight -= 1
                        self._waiting += 1
                        released = True
                        self._wake_next()
                    results = list(wait())
            except Exception as exc:  # noqa: BLE001 - every caller of the group gets it
                results = [exc] * len(group)
        finally:
            # interrupted (KeyboardInterrupt in the leader): the others must not wait forever
            results += [ProduceError("the send was interrupted before the broker answered")
                        ] * (len(group) - len(results))
            with self._lock:
                for s, r in zip(group, results, strict=True):
                    s.result, s.done = r, True
                    if s is not slot:
                        s.wake.notify()
                if released:
                    self._waiting -= 1
                else:
                    self._inflight -= 1
                if exclusive:
                    self._exclusive = False
                self._wake_next()
        return slot.outcome()

    def _wake_next(self) -> None:
        """Wake the first queued caller, which leads the next group if it may (whether one
        may lead depends on the state, not on the caller; caller holds the lock)."""
        for s in self._queue:
            if not s.taken:
                s.wake.notify()
                return


class _Slot:
    """One caller's event in a :class:`GroupCommit` and, once produced, its result."""

    __slots__ = ("event", "result", "done", "taken", "wake")

    def __init__(self, event: Event, lock: threading.Lock):
        self.event = event
        self.result: Receipt | Exception | None = None
        self.done = False
        self.taken = False
        #: this caller's own condition on the group's lock: woken when its result is in,
        #: or when it is first in the queue and the next group may start
        self.wake = threading.Condition(lock)

    def outcome(self) -> Receipt:
        if isinstance(self.result, Exception):
            raise self.result
        assert isinstance(self.result, Receipt)
        return self.result


class BeliefProducer:
    """Produces beliefstore events to Kafka.

    Args:
        bootstrap_servers: ``host:port[,host:port]`` of the Kafka cluster.
        topic: the event topic (default ``beliefstore.events``).
        serde: the Avro serde (default: the shipped schemas).
        timeout_s: how long a send may wait for the broker's acknowledgement, seconds.
        idempotent: Kafka's idempotent producer (default; ``BELIEFSTORE_IDEMPOTENT_PRODUCER``
            off turns it off, ``up`` included). Without it, Tansu 0.6.0 skips one of its
            three S3 writes per produce (every producer's sequences live in one
            cluster-wide S3 object, read-modify-written by each produce, so producers and
            fetches reading it conflict), and a retried record may be stored twice, which
            the fold counts once (observations are keyed by ``event_id``, and the fold
            orders by ``(occurred_at, event_id)``, not by offset). Measured on ``up``
            (bench/README.md, section 8, fourth stop): off, 644 against 553 and 573
            accepted req/s on a quiet machine, but with two CPU-bound processes beside
            it the API accepted more than the projector could follow (freshness p99 7.0
            and 10.4 s against 1.2 s idempotent). Every acknowledged record is in
            the log either way (``acks="all"``; ``tests/test_services.py`` checks two
            producers, idempotent and not, against the read model). One request stays in
            flight (Tansu serves a connection's requests one after the other, so more
            would not overlap the broker's work), so records keep their order.
        **kafka_config: more :class:`kafka.KafkaProducer` settings (e.g. ``security_protocol``,
            ``sasl_mechanism``); ``acks`` and ``enable_idempotence`` are fixed.

    Raises:
        ProduceError: the cluster cannot be reached.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str = "beliefstore.events",
        *,
        serde: AvroSerde | None = None,
        timeout_s: float = 30.0,
        idempotent: bool = True,
        **kafka_config: Any,
    ):
        self.topic = topic
        self.bootstrap_servers = bootstrap_servers
        self.serde = serde or AvroSerde()
        self.timeout_s = timeout_s
        self._config: dict[str, Any] = {
            "bootstrap_servers": bootstrap_servers,
            "client_id": "beliefstore-producer",
            # No linger: with one request in flight, records queued while a request is
            # in flight go together in the next one anyway (a group commit), and a lone
            # record (or a group handed over whole) should not wait.
            "linger_ms": 0,
            "request_timeout_ms": int(timeout_s * 1000),
            # kafka-python requires delivery > linger + request timeout.
            "delivery_timeout_ms": int(timeout_s * 1000) + 5_000,
            # a send waiting for metadata (broker down) gives up within the timeout too
            "max_block_ms": int(timeout_s * 1000),
            # One request in flight per broker connection: Tansu answered pipelined
            # idempotent batches with OutOfOrderSequenceNumber under load (the producer
            # still batches every event queued meanwhile into the next request).
            "max_in_flight_requests_per_connection": 1,
            **kafka_config,
            "acks": "all",
            "enable_idempotence": idempotent,
        }
        self._producer = self._connect()
        self._failed = False
        self._swap = threading.Lock()  # guards replacing a failed producer
        # One group at a time is prepared (data keys, encoding) while the groups before it
        # wait for their acknowledgements; the producer sends all that is queued in its
        # next request (bench/README.md, section 8).
        self._group = GroupCommit(self.send_each, prepare=self._prepare_run)

    def _connect(self) -> KafkaProducer:
        try:
            return KafkaProducer(**self._config)
        except KafkaError as exc:
            raise ProduceError(
                f"cannot reach Kafka at {self.bootstrap_servers}: {exc}; check "
                "KAFKA_BOOTSTRAP_SERVERS or start the embedded services with `beliefstore up`"
            ) from exc

    @classmethod
    def from_settings(cls, settings=None) -> BeliefProducer:
        """A producer for the configured cluster and topic (see :mod:`beliefstore.settings`),
        with its Kafka security settings (SASL/SSL, :meth:`Settings.kafka_client_config`).

        Raises:
            ProduceError: KAFKA_BOOTSTRAP_SERVERS is unset and no ``beliefstore up`` runs here.
        """
        from beliefstore.settings import Settings

        settings = settings or Settings.from_env()
        if not settings.kafka_bootstrap_servers:
            raise ProduceError(
                "no Kafka cluster configured: set KAFKA_BOOTSTRAP_SERVERS, or run "
                "`beliefstore up` in this directory first"
            )
        return cls(settings.kafka_bootstrap_servers, settings.topic,
                   serde=AvroSerde.for_settings(settings),
                   timeout_s=settings.produce_timeout_s,
                   idempotent=settings.idempotent_producer, **settings.kafka_client_config())

    # -- the three calls ---------------------------------------------------------------

    def observe(
        self,
        subject_id: str,
        context: str,
        attribute: str,
        value: str,
        confidence: float,
        source: str,
        evidence: str | None = None,
        metadata: Mapping[str, str] | None = None,
        occurred_at: int | datetime | None = None,
        event_id: str | None = None,
    ) -> Receipt:
        """Record that ``source`` observed ``context.attribute = value`` about ``subject_id``.

        ``confidence`` is in [0, 1]; ``occurred_at`` is epoch ms or an aware datetime
        (default: now); ``event_id`` defaults to a new UUID4.

        Raises:
            ValidationError: a field is invalid (nothing is produced).
            ProduceError: the broker did not acknowledge within ``timeout_s``.
        """
        return self.send(ObservationRecorded(
            event_id=event_id or str(uuid.uuid4()),
            subject_id=subject_id,
            source=source,
            occurred_at=_millis(occurred_at),
            context=context,
            attribute=attribute,
            value=value,
            confidence=confidence,
            evidence=evidence,
            metadata=dict(metadata) if metadata is not None else {},
        ))

    def retract(
        self,
        subject_id: str,
        retracted_event_id: str,
        source: str,
        reason: str | None = None,
        occurred_at: int | datetime | None = None,
        event_id: str | None = None,
    ) -> Receipt:
        """Withdraw observation ``retracted_event_id``; only counts if ``source`` made it.

        Raises:
            ValidationError, ProduceError: as :meth:`observe`.
        """
        return self.send(ObservationRetracted(
            event_id=event_id or str(uuid.uuid4()),
            subject_id=subject_id,
            source=source,
            occurred_at=_millis(occurred_at),
            retracted_event_id=retracted_event_id,
            reason=reason,
        ))

    def erase(
        self,
        subject_id: str,
        source: str,
        reason: str | None = None,
        occurred_at: int | datetime | None = None,
        event_id: str | None = None,
    ) -> Receipt:
        """Forget everything observed about ``subject_id`` up to ``occurred_at`` (default now).

        Raises:
            ValidationError, ProduceError: as :meth:`observe`.
        """
        return self.send(SubjectErased(
            event_id=event_id or str(uuid.uuid4()),
            subject_id=subject_id,
            source=source,
            occurred_at=_millis(occurred_at),
            reason=reason,
        ))

    # -- sending -----------------------------------------------------------------------

    def send(self, event: Event) -> Receipt:
        """Validate, encode and produce one event; wait for the acknowledgement.

        Concurrent calls from several threads (an API serving many agents) are grouped:
        while one group is being prepared (its data keys in one keyring statement, its
        encoding), the events that arrive queue up and become the next group, prepared
        while the groups before it wait for the broker; the Kafka producer (one request in
        flight) sends every record queued meanwhile in its next request (one record batch
        per partition). Each call still returns only once the broker has acknowledged
        *its* event. A lone caller is sent at once (no added wait).

        Raises:
            ValidationError: the event is invalid (nothing is produced).
            ProduceError: the broker did not acknowledge within ``timeout_s``.
        """
        return self._group.submit(validate(event))

    def send_many(self, events: Iterable[Event]) -> list[Receipt]:
        """Produce several events pipelined, then wait for every acknowledgement.

        All events are validated before the first is sent, so an invalid one means
        none is produced. With sealing on, an acknowledged :class:`SubjectErased` destroys
        the subject's data keys (created up to its ``occurred_at``) before any later
        event is sealed, so later observations get a fresh key.

        Raises:
            ValidationError: an event is invalid (nothing is produced).
            ProduceError: an acknowledgement did not arrive within ``timeout_s`` (the
                first such failure; others may have been stored).
        """
        results = self.send_each([validate(e) for e in events])
        for r in results:
            if isinstance(r, ProduceError):
                raise r
        return results  # type: ignore[return-value]

    def send_each(self, events: Sequence[Event]) -> list[Receipt | ProduceError]:
        """Produce already-validated events pipelined; one result per event, in order.

        Each result is the event's :class:`Receipt` once acknowledged (``acks="all"``),
        or the :class:`ProduceError` of that event alone. Erasures are handled as in
        :meth:`send_many`. Records of one partition go out as one record batch.
        """
        batch = list(events)
        results: list[Receipt | ProduceError] = []
        start = 0
        try:
            for i, e in enumerate(batch):
                if isinstance(e, SubjectErased) or i == len(batch) - 1:
                    part = self._send_acked(batch[start:i + 1])
                    results += part
                    start = i + 1
                    if isinstance(e, SubjectErased) and self.serde.sealer is not None \
                            and isinstance(part[-1], Receipt):
                        self.serde.sealer.keyring.destroy(e.subject_id, e.occurred_at,
                                                          now_millis())
        except sa.exc.OperationalError as exc:  # the keyring's database (sealing on)
            error = _keyring_unreachable(exc, sum(isinstance(r, Receipt) for r in results),
                                         len(batch))
            results += [error] * (len(batch) - len(results))
        return results

    def _data_keys(self, batch: Sequence[Event]) -> dict[str, tuple[str, bytes]] | None:
        """The data keys that seal ``batch`` (``None`` without sealing): one keyring
        statement for every subject of the batch (no second lookup per event)."""
        if self.serde.sealer is None:
            return None
        return self.serde.sealer.keyring.data_keys(
            {e.subject_id for e in batch if isinstance(e, ObservationRecorded)}, now_millis())

    def _send_acked(self, batch: list[Event]) -> list[Receipt | ProduceError]:
        """Produce one run of events (no erasure inside); a receipt per event, or the
        failure for each of them (some may have been stored: a retry with the same
        event ids is safe, the fold counts an event_id once)."""
        keys = self._data_keys(batch)
        return self._acked(batch, [self.serde.encode(e, keys) for e in batch])

    def _prepare_run(self, events: Sequence[Event]) -> Callable[[], list[Receipt | ProduceError]]:
        """The first step of a group (:class:`GroupCommit`'s ``prepare``; no erasure in
        it): its data keys, its encoding, and its records handed to the Kafka producer,
        which sends them with whatever else is queued once its request in flight is
        answered. Returns the second step: wait for the acknowledgements (with
        :meth:`_send_acked`'s retry and errors)."""
        batch = list(events)
        try:
            keys = self._data_keys(batch)
        except sa.exc.OperationalError as exc:  # the keyring's database (sealing on)
            error = _keyring_unreachable(exc, 0, len(batch))
            return lambda: [error] * len(batch)
        payloads = [self.serde.encode(e, keys) for e in batch]
        try:
            sent = self._enqueue(batch, payloads)
        except KafkaError as exc:
            first = exc
            return lambda: self._acked(batch, payloads, first=first)
        return lambda: self._acked(batch, payloads, sent)

    def _acked(self, batch: list[Event], payloads: list[bytes],
               sent: tuple[KafkaProducer, list[Any]] | None = None,
               first: KafkaError | None = None) -> list[Receipt | ProduceError]:
        """The receipts of ``batch``: waited for if already ``sent``, else sent now (and
        flushed); after a failure other than a timeout (``first``), sent once more."""
        if first is None:
            try:
                return list(self._receipts(batch, payloads, sent if sent is not None
                                           else self._enqueue(batch, payloads, flush=True)))
            except KafkaTimeoutError as exc:  # the broker is away: no retry past the timeout
                return [ProduceError(f"the broker did not acknowledge the event(s): {exc}")
                        ] * len(batch)
            except KafkaError as exc:
                first = exc
        # Another failure may be the idempotent producer's fatal state (a restarted or
        # busy broker refused InitProducerId once): once, with a fresh producer.
        try:
            return list(self._receipts(batch, payloads,
                                       self._enqueue(batch, payloads, flush=True)))
        except KafkaError as exc:
            error = ProduceError(f"the broker did not acknowledge the event(s): {exc} "
                                 f"(first attempt: {first})")
        return [error] * len(batch)

    def _enqueue(self, batch: list[Event], payloads: list[bytes], flush: bool = False
                 ) -> tuple[KafkaProducer, list[Any]]:
        """Hand ``payloads`` to the Kafka producer (a fresh one after a failure); return
        it and the records' futures. ``flush``: send them now rather than after
        ``linger_ms`` (a run queued whole; lingering would only delay it)."""
        with self._swap:
            if self._failed:
                # After a failed send the idempotent producer may be stuck in a fatal
                # state: start afresh with a new producer id (records still queued in the
                # old one fail, and their groups send them once more). A re-sent event may
                # then be stored twice; the fold counts an event_id once.
                self._abandon()
                self._producer = self._connect()
                self._failed = False
            producer = self._producer
            try:
                futures = [producer.send(self.topic, key=e.subject_id.encode("utf-8"), value=p)
                           for e, p in zip(batch, payloads, strict=True)]
            except KafkaError:
                self._failed = True
                raise
        if flush:
            try:
                producer.flush(timeout=self.timeout_s)
            except KafkaError:
                self._fail(producer)
                raise
        return producer, futures

    def _receipts(self, batch: list[Event], payloads: list[bytes],
                  sent: tuple[KafkaProducer, list[Any]]) -> list[Receipt]:
        """Wait for the acknowledgement of each record of ``batch``; a record
        acknowledged without an offset is sent again, up to :data:`UNCONFIRMED_RESENDS`
        times, until the broker gives it one.

        Why: kafka-python counts a produce answered with DuplicateSequenceNumber as
        acknowledged, at offset -1 ("already written"). Tansu 0.6.0 on S3 storage writes
        the producer's sequence (``meta.json``) before the record batch, so a retried batch
        whose first try stopped in between is answered that way though the log never got
        it (seen: acknowledged records missing from the log, ``tests/test_services.py``'s
        tailing test). Sent again, the record gets a new sequence and an offset; if the
        first try was written after all, the log holds the event twice and the fold counts
        an ``event_id`` once.

        Raises:
            KafkaError: one was not acknowledged (its producer is then replaced), or still
                had no offset after the resends.
        """
        receipts = self._wait(batch, sent)
        for _ in range(UNCONFIRMED_RESENDS):
            unconfirmed = [i for i, r in enumerate(receipts) if r.offset < 0]
            if not unconfirmed:
                return receipts
            log.warning("%d record(s) acknowledged without an offset (a duplicate of a batch "
                        "the broker may not have written): sending them again",
                        len(unconfirmed))
            again = [batch[i] for i in unconfirmed]
            resent = self._wait(again, self._enqueue(again, [payloads[i] for i in unconfirmed],
                                                     flush=True))
            for i, receipt in zip(unconfirmed, resent, strict=True):
                receipts[i] = receipt
        if any(r.offset < 0 for r in receipts):
            raise KafkaError(f"records acknowledged without an offset {UNCONFIRMED_RESENDS + 1} "
                             "times")
        return receipts

    def _wait(self, batch: list[Event], sent: tuple[KafkaProducer, list[Any]]
              ) -> list[Receipt]:
        """The broker's acknowledgement of each record of ``batch`` as sent.

        Raises:
            KafkaError: one was not acknowledged (its producer is then replaced).
        """
        producer, futures = sent
        receipts = []
        try:
            for e, f in zip(batch, futures, strict=True):
                md = f.get(timeout=self.timeout_s)
                receipts.append(Receipt(e.event_id, md.topic, md.partition, md.offset))
        except KafkaError:
            self._fail(producer)
            raise
        return receipts

    def _fail(self, producer: KafkaProducer) -> None:
        """Mark ``producer`` failed (the next send starts a fresh one), unless it was
        already replaced."""
        with self._swap:
            if producer is self._producer:
                self._failed = True

    def connected(self, timeout_s: float = 2.0) -> bool:
        """Whether the cluster is reachable: a bootstrap server accepts a TCP connection
        within ``timeout_s``.

        (kafka-python 3's ``bootstrap_connected()`` is only true while the bootstrap is in
        flight, so it cannot answer this.)
        """
        for server in self.bootstrap_servers.split(","):
            host, _, port = server.strip().rpartition(":")
            try:
                socket.create_connection((host.strip("[]"), int(port)), timeout_s).close()
                return True
            except (OSError, ValueError):
                continue
        return False

    def _abandon(self) -> None:
        """Close the Kafka producer at once, dropping unacknowledged records (never
        reported as sent). kafka-python's close() raises while such records remain and
        leaves the producer open, to fail again noisily in ``__del__``."""
        try:
            self._producer.close(timeout=0)
        except KafkaError:
            sender = getattr(self._producer, "_sender", None)
            if sender is not None:
                sender.force_close()
            self._producer._closed = True

    def flush(self) -> None:
        """Wait until every send so far is acknowledged."""
        self._producer.flush(timeout=self.timeout_s)

    def close(self, timeout_s: float | None = None) -> None:
        """Flush and release the connections (Kafka, and the keyring's database pool);
        waits up to ``timeout_s`` seconds (default: the send timeout) for unsent events."""
        try:
            self._producer.close(timeout=self.timeout_s if timeout_s is None else timeout_s)
        except KafkaError:
            self._abandon()
        if self.serde.sealer is not None:
            self.serde.sealer.keyring.dispose()

    def __enter__(self) -> BeliefProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
