"""The access log: who read what about whom, on its own Kafka topic.

Every answered read of a subject's self-model, beliefs, history or trace through the
HTTP API is recorded as one JSON *entry* on ``BELIEFSTORE_ACCESS_TOPIC`` (default
``beliefstore.access``), in the partition of its subject id (the partition Kafka's default
partitioner gives the key ``subject_id``), so all reads of one person land in one
partition, in order. One entry::

    {"access_id": "…uuid…", "at": 1767225600123, "agent": "billing_agent",
     "key_id": "3f9c…", "subject_id": "user-42", "endpoint": "self-model",
     "contexts": ["billing", "support"], "attribute": null, "as_of": null, "count": 5}

Wire format, version 2 (since 2026-11-26): entries travel in **batches**, one Kafka
record per partition and flush holding up to :data:`MAX_BATCH` entries,
``{"v": 2, "entries": [entry, ...]}``, with no key (the partition is chosen
explicitly). Version 1 records — one entry per Kafka record, keyed by the subject id,
``{"v": 1, ...entry}`` — are still read: :func:`parse_message` accepts both, so a topic
written before the change reads back whole.

A read only appends a tuple to an in-memory deque (no lock, no encoding, no broker
call); a background thread wakes every :data:`FLUSH_INTERVAL_S` seconds (sooner once
:data:`MAX_BATCH` entries wait), encodes the waiting entries and produces them, batched,
with ``acks="all"``. :meth:`AccessLogger.close` (the API's shutdown) sends everything
still waiting and waits for the acknowledgements. If the broker is unreachable for
long, entries wait in memory up to a bound (``max_pending``) and then are dropped with
an error in the API's log; the API's reads keep working.

``beliefstore access-log --subject S`` reads them back (:func:`read_access_log`).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError

from beliefstore.errors import BeliefstoreError
from beliefstore.events.eventlog import partition_of_key
from beliefstore.settings import Settings

log = logging.getLogger("beliefstore.access")

RECORD_VERSION = 2
"""The version of the Kafka records :class:`AccessLogger` writes (a batch of entries)."""

ENDPOINTS = ("self-model", "beliefs", "history", "trace")

FLUSH_INTERVAL_S = 0.5
"""Seconds between the background thread's flushes of waiting entries. Each flush is at
least one Kafka record batch, and on `up`'s durable embedded broker every record batch is
one S3 object that the S3 store keeps in its in-memory listing index; at 0.1 s a
trickle of reads (the soak's 10/s) made one object per read. An auditor sees a read in
the access log within this interval; a crash loses at most this interval's entries."""

MAX_BATCH = 500
"""Most entries in one Kafka record (about 250 bytes each: ~125 KB, well under the
brokers' default 1 MB record limit)."""


class AccessLogError(BeliefstoreError):
    """The access log could not be read (broker unreachable, topic missing)."""


@dataclass(frozen=True)
class AccessRecord:
    """One answered read of a subject.

    Attributes:
        access_id: a UUID of the record.
        at: when the API answered, epoch milliseconds.
        agent: the reading agent (``anonymous`` with authentication off).
        key_id: the API key used, or ``None``.
        subject_id: whose data was read.
        endpoint: ``self-model``, ``beliefs``, ``history`` or ``trace``.
        contexts: the contexts the answer contained.
        attribute: the attribute of a trace or history, else ``None``.
        as_of: the ``as_of`` instant of a past view (ISO 8601), else ``None``.
        count: beliefs (self-model, beliefs), events (trace) or changes (history) returned.
        partition: where the record sits in the access topic (when read back).
        offset: the offset of the Kafka record holding it (when read back; the entries of
            one batch share it).
    """

    access_id: str
    at: int
    agent: str
    key_id: str | None
    subject_id: str
    endpoint: str
    contexts: tuple[str, ...]
    attribute: str | None = None
    as_of: str | None = None
    count: int | None = None
    partition: int | None = None
    offset: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The entry as JSON (without the Kafka coordinates)."""
        return {"access_id": self.access_id, "at": self.at,
                "agent": self.agent, "key_id": self.key_id, "subject_id": self.subject_id,
                "endpoint": self.endpoint, "contexts": list(self.contexts),
                "attribute": self.attribute, "as_of": self.as_of, "count": self.count}

    @classmethod
    def from_json(cls, data: Any, partition: int | None = None,
                  offset: int | None = None) -> AccessRecord:
        """Parse one entry (a version-1 record's value is one too).

        Raises:
            ValueError: not an access entry.
        """
        if not isinstance(data, dict) or not isinstance(data.get("subject_id"), str) \
                or not isinstance(data.get("agent"), str) or not isinstance(data.get("at"), int):
            raise ValueError("not an access record")
        contexts = data.get("contexts") or []
        if not isinstance(contexts, list) or not all(isinstance(c, str) for c in contexts):
            raise ValueError("contexts is not a list of strings")
        return cls(
            access_id=str(data.get("access_id", "")), at=data["at"], agent=data["agent"],
            key_id=data.get("key_id"), subject_id=data["subject_id"],
            endpoint=str(data.get("endpoint", "")), contexts=tuple(contexts),
            attribute=data.get("attribute"), as_of=data.get("as_of"), count=data.get("count"),
            partition=partition, offset=offset,
        )


def parse_message(value: bytes | None, partition: int | None = None,
                  offset: int | None = None) -> tuple[list[AccessRecord], int]:
    """The entries of one Kafka record of the access topic, either version.

    Args:
        value: the record's value: a version-2 batch ``{"v": 2, "entries": [...]}`` or a
            version-1 single entry ``{"v": 1, ...}``.
        partition, offset: the record's coordinates, copied into every entry.

    Returns:
        the entries, and how many parts were not access entries (a record that is not
        JSON, or of neither shape, counts 1; a malformed entry of a batch counts 1).
    """
    try:
        data = orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        return [], 1
    if isinstance(data, dict) and data.get("v") == 2:
        entries = data.get("entries")
        if not isinstance(entries, list):
            return [], 1
        out, bad = [], 0
        for entry in entries:
            try:
                out.append(AccessRecord.from_json(entry, partition, offset))
            except ValueError:
                bad += 1
        return out, bad
    try:
        return [AccessRecord.from_json(data, partition, offset)], 0
    except ValueError:
        return [], 1


def encode_batch(records: Iterable[AccessRecord]) -> bytes:
    """The version-2 Kafka record value of ``records`` (UTF-8 JSON)."""
    return orjson.dumps({"v": RECORD_VERSION, "entries": [r.to_json() for r in records]})


# What a read appends: (at ms, agent, key_id, subject_id, endpoint, contexts, attribute,
# as_of, count); made into an AccessRecord by the background thread.
_Pending = tuple[int, str, "str | None", str, str, Iterable[str], "str | None", "str | None",
                 "int | None"]


class AccessLogger:
    """Produces access entries in batches from a background thread.

    :meth:`record` only appends the entry to an in-memory deque (bounded by
    ``max_pending``); the thread creates the topic if needed and, every
    ``flush_interval_s`` (sooner when ``max_batch`` entries wait), produces the waiting
    entries as one Kafka record per partition (at most ``max_batch`` entries each) with
    ``acks="all"``, logging failures. :meth:`close` sends what is waiting and waits for
    the acknowledgements (at most ``flush_timeout_s``).

    Attributes:
        produced: entries acknowledged by the broker.
        failed: entries the broker did not acknowledge (twice: a failed batch is sent
            once more, by a fresh producer).
        retried: entries sent a second time.
        dropped: entries dropped because too many were waiting (or after close).
        batches: Kafka records acknowledged.
    """

    def __init__(self, settings: Settings, *, max_pending: int = 10_000,
                 flush_timeout_s: float = 10.0, flush_interval_s: float = FLUSH_INTERVAL_S,
                 max_batch: int = MAX_BATCH):
        self.settings = settings
        self.topic = settings.access_topic
        self.flush_timeout_s = flush_timeout_s
        self.flush_interval_s = flush_interval_s
        self.max_batch = max_batch
        self.max_pending = max_pending
        self._pending: deque[_Pending] = deque()
        self._retry: deque[list[AccessRecord]] = deque()
        self._wake = threading.Event()
        self._broken = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._closing = False
        self._partitions: list[int] = []
        self._partition_of: dict[str, int] = {}
        self.produced = 0
        self.failed = 0
        self.retried = 0
        self.dropped = 0
        self.batches = 0

    def record(self, agent: str, key_id: str | None, subject_id: str, endpoint: str,
               contexts: Iterable[str], *, attribute: str | None = None,
               as_of: str | None = None, count: int | None = None) -> None:
        """Queue one access entry; never blocks (one ``deque.append``).

        ``contexts`` is kept as given until the background thread encodes it: pass a
        collection the caller no longer changes.
        """
        if self._closing or self._closed:
            log.error("access log closed: dropping the record of %s reading %r", agent, subject_id)
            self.dropped += 1
            return
        if self._thread is None:
            self._start()
        if len(self._pending) >= self.max_pending:
            self.dropped += 1
            log.error("access log full (%d waiting; is Kafka at %s reachable?): dropped the "
                      "record of %s reading %r", self.max_pending,
                      self.settings.kafka_bootstrap_servers, agent, subject_id)
            return
        self._pending.append((int(time.time() * 1000), agent, key_id, subject_id, endpoint,
                              contexts, attribute, as_of, count))
        if len(self._pending) >= self.max_batch:
            self._wake.set()

    def pending(self) -> int:
        """Entries waiting for the background thread."""
        return len(self._pending)

    def _start(self) -> None:
        with self._lock:
            if self._thread is None and not self._closing:
                self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
                self._thread.start()

    def _producer(self) -> KafkaProducer | None:
        s = self.settings
        if not s.kafka_bootstrap_servers:
            log.error("access log: no Kafka configured; access records are not kept")
            return None
        try:
            from beliefstore.events.topics import ensure_topics

            ensure_topics(s.kafka_bootstrap_servers, {self.topic: s.partitions},
                          replication_factor=s.replication_factor, timeout_s=10.0,
                          client_config=s.kafka_client_config())
        except KafkaError as exc:  # the topic may exist, or be auto-created; try anyway
            log.warning("access log: could not create topic %s: %s", self.topic, exc)
        producer = KafkaProducer(
            bootstrap_servers=s.kafka_bootstrap_servers, client_id="beliefstore-access-log",
            acks="all", enable_idempotence=True, linger_ms=5,
            # pipelined idempotent requests got OutOfOrderSequenceNumber from Tansu, and
            # the epoch bump after it is fatal there (see events/producer.py)
            max_in_flight_requests_per_connection=1, **s.kafka_client_config())
        try:
            partitions = sorted(producer.partitions_for(self.topic) or ())
        except KafkaError:
            producer.close(timeout=0)
            raise
        if partitions != self._partitions:
            self._partitions = partitions
            self._partition_of.clear()
        return producer

    def _take(self) -> list[_Pending]:
        """Everything waiting now (deque pops are atomic: reads keep appending meanwhile)."""
        out = []
        pop = self._pending.popleft
        for _ in range(len(self._pending)):
            out.append(pop())
        return out

    def _run(self) -> None:
        producer: KafkaProducer | None = None
        backoff = 1.0
        while True:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            closing = self._closing
            if not self._pending and not self._retry:
                if closing:
                    break
                continue
            if self._broken and producer is not None:
                # A failed send may leave the idempotent producer in a fatal state (a
                # restarted broker refused InitProducerId once) where every later send
                # fails too: start afresh with a new producer id.
                self._broken = False
                _abandon(producer)
                producer = None
            while producer is None and not self._closed:
                try:
                    producer = self._producer()
                    if producer is None:
                        self._closed = True
                except KafkaError as exc:
                    if self._closing:
                        log.error("access log: cannot reach Kafka (%s) while shutting down", exc)
                        self._closed = True
                        break
                    log.error("access log: cannot reach Kafka (%s); retrying in %.0f s", exc, backoff)
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)
            if producer is None:
                lost = len(self._take()) + sum(len(b) for b in self._retry)
                self._retry.clear()
                self.dropped += lost
                if closing or self._closed:
                    break
                continue
            backoff = 1.0
            while self._retry:
                self._send(producer, self._retry.popleft(), retry=True)
            self._send_all(producer, self._take())
            if closing:
                break
        if producer is not None:
            try:
                producer.flush(timeout=self.flush_timeout_s)
            except KafkaError as exc:
                log.error("access log: flush failed: %s", exc)
            if self._retry:
                # failed in the final flush: once more, by a fresh producer
                _abandon(producer)
                try:
                    producer = self._producer()
                except KafkaError:
                    producer = None
                if producer is None:
                    self.failed += sum(len(b) for b in self._retry)
                    self._retry.clear()
                else:
                    while self._retry:
                        self._send(producer, self._retry.popleft(), retry=True)
                    try:
                        producer.flush(timeout=self.flush_timeout_s)
                    except KafkaError as exc:
                        log.error("access log: flush failed: %s", exc)
            if producer is not None:
                try:
                    producer.close(timeout=self.flush_timeout_s)
                except KafkaError:
                    _abandon(producer)

    def _send_all(self, producer: KafkaProducer, items: list[_Pending]) -> None:
        """Group ``items`` by partition and send them, ``max_batch`` per Kafka record."""
        by_partition: dict[int, list[AccessRecord]] = {}
        partition_of = self._partition_of
        if len(partition_of) > 100_000:
            partition_of.clear()
        for at, agent, key_id, subject_id, endpoint, contexts, attribute, as_of, count in items:
            partition = partition_of.get(subject_id)
            if partition is None:
                partition = partition_of[subject_id] = partition_of_key(
                    self.topic, subject_id.encode("utf-8"), self._partitions)
            by_partition.setdefault(partition, []).append(AccessRecord(
                str(uuid.uuid4()), at, agent, key_id, subject_id, endpoint,
                tuple(sorted(set(contexts))), attribute, as_of, count))
        for partition, records in by_partition.items():
            for start in range(0, len(records), self.max_batch):
                self._send(producer, records[start:start + self.max_batch], partition)

    def _send(self, producer: KafkaProducer, batch: list[AccessRecord],
              partition: int | None = None, retry: bool = False) -> None:
        if partition is None:
            partition = self._partition_of.get(batch[0].subject_id)
            if partition is None or partition not in self._partitions:
                partition = partition_of_key(self.topic, batch[0].subject_id.encode("utf-8"),
                                             self._partitions)
        try:
            future = producer.send(self.topic, value=encode_batch(batch), partition=partition)
        except KafkaError as exc:
            self._failed(batch, exc, retry)
            return
        future.add_callback(lambda _metadata: self._ok(len(batch)))
        future.add_errback(lambda exc: self._failed(batch, exc, retry))

    def _ok(self, entries: int) -> None:
        self.produced += entries
        self.batches += 1

    def _failed(self, batch: list[AccessRecord], exc: BaseException, retried: bool) -> None:
        self._broken = True
        if not retried:
            # once more, by the fresh producer the next flush builds (the batch may then
            # be stored twice if the first attempt was stored after all)
            self._retry.append(batch)
            self.retried += len(batch)
            self._wake.set()
            log.warning("access log: sending a batch of %d record(s) once more (%s)",
                        len(batch), exc)
            return
        self.failed += len(batch)
        log.error("access log: %d record(s) not acknowledged: %s", len(batch), exc)

    def close(self) -> None:
        """Send every waiting entry and wait for the acknowledgements; idempotent."""
        self._closing = True
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is None:
            self._closed = True
            return
        self._wake.set()
        thread.join(self.flush_timeout_s * 2 + 5)
        self._closed = True


def _abandon(producer: KafkaProducer) -> None:
    """Close ``producer`` at once, dropping what it could not send (kafka-python's close()
    raises while unacknowledged records remain)."""
    try:
        producer.close(timeout=0)
    except KafkaError:
        sender = getattr(producer, "_sender", None)
        if sender is not None:
            sender.force_close()
        producer._closed = True


def read_access_log(settings: Settings, subject_id: str, timeout_s: float = 15.0,
                    ) -> tuple[list[AccessRecord], int]:
    """Every access record about ``subject_id``, in log order, from the start of its
    partition of the access topic up to the high watermark (batches of version 2 and
    single records of version 1 alike, see :func:`parse_message`).

    Returns:
        the records, and how many messages (or entries of a batch) of that partition
        were not access records.

    Raises:
        AccessLogError: the broker is unreachable, the topic does not exist, or the
            read did not finish within ``timeout_s``.
    """
    s = settings
    if not s.kafka_bootstrap_servers:
        raise AccessLogError("KAFKA_BOOTSTRAP_SERVERS is not set and no `beliefstore up` runs "
                             "here: set it, or run `beliefstore up` first")
    try:
        consumer = KafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap_servers, client_id="beliefstore-access-audit",
            group_id=None, enable_auto_commit=False, auto_offset_reset="earliest",
            allow_auto_create_topics=False, fetch_max_wait_ms=100, **s.kafka_client_config())
    except KafkaError as exc:
        raise AccessLogError(f"cannot reach Kafka at {s.kafka_bootstrap_servers}: {exc}") from exc
    try:
        deadline = time.monotonic() + timeout_s
        # A freshly created topic may take a moment to show in the metadata.
        topic_deadline = time.monotonic() + min(timeout_s, 1.0)
        partitions: list[int] = []
        while not partitions:
            partitions = sorted(consumer.partitions_for_topic(s.access_topic) or ())
            if partitions:
                break
            if time.monotonic() > topic_deadline:
                raise AccessLogError(
                    f"topic {s.access_topic!r} does not exist: no read has been recorded yet, or "
                    "BELIEFSTORE_ACCESS_TOPIC names another topic")
            time.sleep(0.1)
        partition = partition_of_key(s.access_topic, subject_id.encode("utf-8"), partitions)
        tp = TopicPartition(s.access_topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, 0)
        records: list[AccessRecord] = []
        skipped = 0
        # The log end comes from the high watermark of a fetch (KafkaConsumer.highwater):
        # the embedded Tansu broker answers ListOffsets "latest" (end_offsets) wrongly.
        end: int | None = None
        while end is None or consumer.position(tp) < end:
            if time.monotonic() > deadline:
                raise AccessLogError(f"reading {s.access_topic}[{partition}] did not finish "
                                     f"within {timeout_s:g} s")
            polled = consumer.poll(timeout_ms=200)
            for batch in polled.values():
                for message in batch:
                    entries, bad = parse_message(message.value, message.partition,
                                                 message.offset)
                    skipped += bad
                    records.extend(r for r in entries if r.subject_id == subject_id)
            if end is None:
                end = consumer.highwater(tp)
                if end is None and polled:
                    # Records before the log end was known: read them again once it is.
                    records, skipped = [], 0
                    consumer.seek(tp, 0)
        return records, skipped
    except KafkaError as exc:
        raise AccessLogError(f"cannot read {s.access_topic}: {exc}") from exc
    finally:
        consumer.close(autocommit=False)


__all__ = ["AccessLogError", "AccessLogger", "AccessRecord", "ENDPOINTS", "encode_batch",
           "parse_message", "read_access_log"]
