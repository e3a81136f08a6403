"""The access log: who read what about whom, on its own Kafka topic.

Every answered read of a subject's self-model, beliefs, history or trace through the
HTTP API is recorded as one JSON message on ``BELIEFSTORE_ACCESS_TOPIC`` (default
``beliefstore.access``), keyed by the subject id, so all reads of one person land in
one partition, in order::

    {"v": 1, "access_id": "…uuid…", "at": 1767225600123, "agent": "billing_agent",
     "key_id": "3f9c…", "subject_id": "user-42", "endpoint": "self-model",
     "contexts": ["billing", "support"], "attribute": null, "as_of": null, "count": 5}

``contexts`` are the contexts whose beliefs or events the answer contained (for a trace
or a history: its context). Records are produced asynchronously by a background thread
(a read never waits for the broker's acknowledgement) and flushed when the API shuts
down. If the broker is unreachable for long, records queue in memory up to a bound and
then are dropped with an error in the API's log; the API's reads keep working.

``beliefstore access-log --subject S`` reads them back (:func:`read_access_log`).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError

from beliefstore.errors import BeliefstoreError
from beliefstore.events.eventlog import partition_of_key
from beliefstore.settings import Settings
from beliefstore.timefmt import now_millis

log = logging.getLogger("beliefstore.access")

RECORD_VERSION = 1
ENDPOINTS = ("self-model", "beliefs", "history", "trace")


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
        offset: its offset (when read back).
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
        return {"v": RECORD_VERSION, "access_id": self.access_id, "at": self.at,
                "agent": self.agent, "key_id": self.key_id, "subject_id": self.subject_id,
                "endpoint": self.endpoint, "contexts": list(self.contexts),
                "attribute": self.attribute, "as_of": self.as_of, "count": self.count}

    @classmethod
    def from_json(cls, data: Any, partition: int | None = None,
                  offset: int | None = None) -> AccessRecord:
        """Parse a message value.

        Raises:
            ValueError: not an access record.
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


_STOP = object()


class AccessLogger:
    """Produces access records from a background thread.

    :meth:`record` only puts the record on an in-memory queue (bounded by
    ``max_pending``); the thread creates the topic if needed, produces with
    ``acks="all"`` and logs failures. :meth:`close` sends what is queued and waits for
    the acknowledgements (at most ``flush_timeout_s``).

    Attributes:
        produced: records acknowledged by the broker.
        failed: records the broker did not acknowledge (twice: a failed record is sent
            once more, by a fresh producer).
        retried: records sent a second time.
        dropped: records dropped because the queue was full.
    """

    def __init__(self, settings: Settings, *, max_pending: int = 10_000,
                 flush_timeout_s: float = 10.0):
        self.settings = settings
        self.topic = settings.access_topic
        self.flush_timeout_s = flush_timeout_s
        self._broken = False
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_pending)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._closing = False
        self.produced = 0
        self.failed = 0
        self.retried = 0
        self._retrying: set[int] = set()
        self.dropped = 0

    def record(self, agent: str, key_id: str | None, subject_id: str, endpoint: str,
               contexts: Iterable[str], *, attribute: str | None = None,
               as_of: str | None = None, count: int | None = None) -> AccessRecord:
        """Queue one access record (never blocks; returns it)."""
        rec = AccessRecord(str(uuid.uuid4()), now_millis(), agent, key_id, subject_id, endpoint,
                           tuple(sorted(set(contexts))), attribute, as_of, count)
        if self._closed or self._closing:
            log.error("access log closed: dropping the record of %s reading %r", agent, subject_id)
            self.dropped += 1
            return rec
        if self._thread is None:
            self._start()
        try:
            self._queue.put_nowait(rec)
        except queue.Full:
            self.dropped += 1
            log.error("access log queue full (%d pending; is Kafka at %s reachable?): dropped the "
                      "record of %s reading %r", self._queue.maxsize,
                      self.settings.kafka_bootstrap_servers, agent, subject_id)
        return rec

    def pending(self) -> int:
        """Records queued but not yet handed to the Kafka client."""
        return self._queue.qsize()

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
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
        return KafkaProducer(
            bootstrap_servers=s.kafka_bootstrap_servers, client_id="beliefstore-access-log",
            acks="all", enable_idempotence=True, linger_ms=20,
            # pipelined idempotent requests got OutOfOrderSequenceNumber from Tansu, and
            # the epoch bump after it is fatal there (see events/producer.py)
            max_in_flight_requests_per_connection=1, **s.kafka_client_config())

    def _run(self) -> None:
        producer: KafkaProducer | None = None
        backoff = 1.0
        while True:
            item = self._queue.get()
            if item is _STOP:
                break
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
                self.dropped += 1
                continue
            self._send(producer, item)
        if producer is not None:
            try:
                producer.flush(timeout=self.flush_timeout_s)
            except KafkaError as exc:
                log.error("access log: flush failed: %s", exc)
            producer.close(timeout=self.flush_timeout_s)

    def _send(self, producer: KafkaProducer, rec: AccessRecord) -> None:
        try:
            future = producer.send(self.topic, key=rec.subject_id.encode("utf-8"),
                                   value=json.dumps(rec.to_json()).encode("utf-8"))
        except KafkaError as exc:
            self._failed(rec, exc)
            return
        future.add_callback(self._ok)
        future.add_errback(lambda exc: self._failed(rec, exc))

    def _ok(self, _metadata: Any) -> None:
        self.produced += 1

    def _failed(self, rec: AccessRecord, exc: BaseException) -> None:
        self._broken = True
        if id(rec) not in self._retrying and not self._closing:
            # once more, by the fresh producer the next send builds (the record may then
            # be stored twice if the first attempt was stored after all)
            if len(self._retrying) > 10_000:
                self._retrying.clear()
            self._retrying.add(id(rec))
            try:
                self._queue.put_nowait(rec)
                self.retried += 1
                log.warning("access log: sending the record of %s reading %r once more "
                            "(%s)", rec.agent, rec.subject_id, exc)
                return
            except queue.Full:
                pass
        self.failed += 1
        log.error("access log: record of %s reading %r not acknowledged: %s", rec.agent,
                  rec.subject_id, exc)

    def close(self) -> None:
        """Send every queued record and wait for the acknowledgements; idempotent."""
        self._closing = True
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is None:
            self._closed = True
            return
        self._queue.put(_STOP)
        thread.join(self.flush_timeout_s + 5)
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
    partition of the access topic up to the high watermark.

    Returns:
        the records, and how many messages of that partition were not access records.

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
                    try:
                        rec = AccessRecord.from_json(json.loads(message.value or b""),
                                                     message.partition, message.offset)
                    except ValueError:
                        skipped += 1
                        continue
                    if rec.subject_id == subject_id:
                        records.append(rec)
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


__all__ = ["AccessLogError", "AccessLogger", "AccessRecord", "ENDPOINTS", "read_access_log"]
