"""Reading the raw event log, straight from Kafka (no PostgreSQL): one message by its
partition and offset, the partition a subject's events land in, and every event about
one subject.

This is the auditor's view of the log, independent of any projection: a trace line
(``p1@42``) can be checked against :func:`fetch_message`, and a subject's history can
be exported from the log itself with :func:`iter_subject_events`.

The log end of a partition is taken from the high watermark of fetch responses
(:meth:`kafka.KafkaConsumer.highwater`), never from ListOffsets ``latest``
(``end_offsets``/``seek_to_end``), which the embedded Tansu broker answers wrongly.
Messages are judged as the projector judges them: a message whose key is not its
event's ``subject_id`` is poison (``invalid_event``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from kafka.partitioner.default import DefaultPartitioner

from beliefstore.errors import BeliefstoreError, PoisonEvent
from beliefstore.events.model import Event
from beliefstore.events.sealing import EventShredded
from beliefstore.events.serde import AvroSerde, DecodedEvent, SealedEventError

ProgressCallback = Callable[[int, int], None]
"""``progress(done, total)``: offsets scanned so far, and offsets to scan in all."""


class LogReadError(BeliefstoreError):
    """The event log could not be read: the broker is unreachable, or did not answer in time."""


class MessageNotFound(BeliefstoreError, LookupError):
    """No message at the requested position of the log.

    Attributes:
        topic: the topic asked for.
        partition: the partition asked for.
        offset: the offset asked for.
        log_end: the partition's log end (high watermark: the offset the next message
            will get), or ``None`` when the partition does not exist.
        partitions: how many partitions the topic has (0 when it does not exist).
    """

    def __init__(self, message: str, *, topic: str, partition: int, offset: int,
                 log_end: int | None, partitions: int):
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.log_end = log_end
        self.partitions = partitions
        super().__init__(message)


@dataclass(frozen=True)
class RawMessage:
    """One message of the event log, as stored by the broker, and what it decodes to.

    Exactly one of ``decoded`` and ``error`` is set.

    Attributes:
        topic: Kafka topic.
        partition: partition number.
        offset: offset within the partition.
        timestamp: the broker's timestamp of the message, epoch ms (``None`` if unknown).
        key: the message key (the subject id, UTF-8), or ``None``.
        value: the message bytes (Avro single-object encoding when well-formed).
        headers: the message headers, ``(name, value)`` in order.
        decoded: the decoded event and its writer schema, when the message is valid.
        error: why the message is poison (what the projector would send to the DLQ).
    """

    topic: str
    partition: int
    offset: int
    timestamp: int | None
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    decoded: DecodedEvent | None = None
    error: PoisonEvent | None = None

    @property
    def event(self) -> Event | None:
        """The decoded event, or ``None`` for a poison message."""
        return None if self.decoded is None else self.decoded.event

    @property
    def key_text(self) -> str | None:
        """The key as text (undecodable bytes escaped), or ``None``."""
        return None if self.key is None else self.key.decode("utf-8", errors="backslashreplace")


def decode_record(record: Any, serde: AvroSerde) -> RawMessage:
    """Turn a :class:`kafka.consumer.fetcher.ConsumerRecord` into a :class:`RawMessage`,
    judging it as the projector does (decode, validate, key = subject_id)."""
    decoded: DecodedEvent | None = None
    error: PoisonEvent | None = None
    try:
        decoded = serde.decode(record.value)
    except PoisonEvent as exc:
        error = exc
    except EventShredded as exc:
        error = PoisonEvent("shredded", str(exc))  # not poison: its subject was erased
    except SealedEventError as exc:
        error = PoisonEvent("sealed", str(exc))  # readable only with the keyring
    if decoded is not None and record.key is not None \
            and record.key != decoded.event.subject_id.encode("utf-8"):
        error = PoisonEvent(
            "invalid_event",
            f"message key {record.key!r} is not the event's subject_id "
            f"{decoded.event.subject_id!r}",
        )
        decoded = None
    timestamp = record.timestamp if record.timestamp is not None and record.timestamp >= 0 else None
    return RawMessage(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        timestamp=timestamp,
        key=record.key,
        value=record.value,
        headers=tuple((str(name), bytes(value or b"")) for name, value in (record.headers or ())),
        decoded=decoded,
        error=error,
    )


def _consumer(bootstrap: str, **config: Any) -> KafkaConsumer:
    try:
        return KafkaConsumer(
            bootstrap_servers=bootstrap,
            client_id="beliefstore-audit",
            group_id=None,
            enable_auto_commit=False,
            # An offset outside the log resets to the start; the high watermark of that
            # fetch then tells where the log ends.
            auto_offset_reset="earliest",
            allow_auto_create_topics=False,
            # An empty answer (at the log end) should come back quickly.
            fetch_max_wait_ms=100,
            **config,
        )
    except KafkaError as exc:
        raise LogReadError(
            f"cannot reach Kafka at {bootstrap}: {exc}; check KAFKA_BOOTSTRAP_SERVERS or run "
            "`beliefstore up`"
        ) from exc


def _partitions(consumer: KafkaConsumer, topic: str) -> list[int]:
    try:
        return sorted(consumer.partitions_for_topic(topic) or ())
    except KafkaError as exc:
        raise LogReadError(f"cannot read the metadata of topic {topic!r}: {exc}") from exc


def _poll(consumer: KafkaConsumer, timeout_ms: int, max_records: int | None = None) -> dict:
    try:
        return consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
    except KafkaError as exc:
        raise LogReadError(f"cannot fetch from Kafka: {exc}") from exc


def _no_partition(topic: str, partition: int, offset: int, partitions: list[int]) -> MessageNotFound:
    if not partitions:
        what = f"topic {topic!r} does not exist (check BELIEFSTORE_TOPIC or --topic)"
    else:
        what = (f"topic {topic!r} has no partition {partition} (it has {len(partitions)}: "
                f"{partitions[0]}..{partitions[-1]}), so no log end")
    return MessageNotFound(what, topic=topic, partition=partition, offset=offset, log_end=None,
                           partitions=len(partitions))


class _PartitionCluster:
    """Just enough of kafka-python's ClusterMetadata for :class:`DefaultPartitioner`."""

    def __init__(self, topic: str, partitions: list[int]):
        self._topic = topic
        self._partitions = set(partitions)

    def topics(self) -> set[str]:
        return {self._topic}

    def partitions_for_topic(self, topic: str) -> set[int]:
        return set(self._partitions)

    def available_partitions_for_topic(self, topic: str) -> set[int]:
        return set(self._partitions)


def partition_of_key(topic: str, key: bytes, partitions: list[int] | int) -> int:
    """The partition kafka-python's :class:`DefaultPartitioner` picks for ``key`` (murmur2,
    as the Java client) among ``partitions`` (a list of ids, or a count)."""
    ids = list(range(partitions)) if isinstance(partitions, int) else list(partitions)
    if not ids:
        raise ValueError(f"topic {topic!r} has no partitions")
    cluster = _PartitionCluster(topic, ids)
    return int(DefaultPartitioner().partition(topic, key, key, None, None, cluster))


def partition_for(bootstrap: str, topic: str, subject_id: str, timeout_s: float = 10.0,
                  client_config: dict[str, Any] | None = None) -> int:
    """The partition every event about ``subject_id`` lands in: the one kafka-python's
    default partitioner picks for the key ``subject_id.encode()`` given the topic's
    partitions (from the broker's metadata).

    Raises:
        LookupError (:class:`MessageNotFound`): the topic does not exist.
        LogReadError: the broker is unreachable.
    """
    consumer = _consumer(bootstrap, **(client_config or {}))
    try:
        partitions = _topic_partitions(consumer, topic, timeout_s)
        if not partitions:
            raise _no_partition(topic, 0, 0, partitions)
        return partition_of_key(topic, subject_id.encode("utf-8"), partitions)
    finally:
        consumer.close(autocommit=False)


def _topic_partitions(consumer: KafkaConsumer, topic: str, timeout_s: float) -> list[int]:
    # A freshly created topic may take a moment to appear in the metadata.
    deadline = time.monotonic() + min(timeout_s, 0.5)
    while True:
        partitions = _partitions(consumer, topic)
        if partitions or time.monotonic() > deadline:
            return partitions
        time.sleep(0.1)


def fetch_message(
    bootstrap: str,
    topic: str,
    partition: int,
    offset: int,
    serde: AvroSerde | None = None,
    timeout_s: float = 10.0,
    client_config: dict[str, Any] | None = None,
) -> RawMessage:
    """Read the message at ``topic``/``partition``/``offset`` and decode it.

    A message that cannot be decoded is returned with ``error`` set (never raised).

    Raises:
        MessageNotFound: the partition does not exist, or ``offset`` is at or after the
            partition's log end (the message names it), or no message has that offset
            (removed by compaction, or a transaction marker).
        LogReadError: the broker is unreachable or did not answer within ``timeout_s``.
    """
    if offset < 0:
        raise MessageNotFound(f"offset {offset} is negative", topic=topic, partition=partition,
                              offset=offset, log_end=None, partitions=0)
    serde = serde or AvroSerde()
    consumer = _consumer(bootstrap, max_poll_records=1, **(client_config or {}))
    try:
        partitions = _topic_partitions(consumer, topic, timeout_s)
        if partition not in partitions:
            raise _no_partition(topic, partition, offset, partitions)
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, offset)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for records in _poll(consumer, 50, max_records=1).values():
                for record in records:
                    if record.offset == offset:
                        return decode_record(record, serde)
                    if record.offset > offset:
                        raise MessageNotFound(
                            f"partition {partition} of {topic!r} has no message at offset "
                            f"{offset} (the next one is at {record.offset}; log end "
                            f"{consumer.highwater(tp)})",
                            topic=topic, partition=partition, offset=offset,
                            log_end=consumer.highwater(tp), partitions=len(partitions))
                    # offset < requested: the broker answered from the log start after an
                    # out-of-range reset; the high watermark below decides.
            end = consumer.highwater(tp)
            if end is not None and offset >= end:
                raise MessageNotFound(
                    f"offset {offset} is at or after the log end of partition {partition} of "
                    f"{topic!r}: log end {end} ("
                    f"{'the partition is empty' if end == 0 else f'its last message is at {end - 1}'})",
                    topic=topic, partition=partition, offset=offset, log_end=end,
                    partitions=len(partitions))
            if end is not None and consumer.position(tp) is not None \
                    and consumer.position(tp) < offset:
                consumer.seek(tp, offset)
        raise LogReadError(
            f"no answer from Kafka at {bootstrap} for {topic}[{partition}]@{offset} within "
            f"{timeout_s:g} s"
        )
    finally:
        consumer.close(autocommit=False)


class SubjectScan(Iterator[RawMessage]):
    """The iterator :func:`iter_subject_events` returns, with the scan's counters.

    Attributes:
        subject_id: the subject scanned for.
        topic: the topic.
        partition: the subject's partition (known once iteration started).
        end_offset: that partition's log end when the scan started (its high watermark).
        scanned: messages read so far.
        matched: events about the subject yielded so far.
        poison: messages keyed to the subject that are poison (skipped), in log order.
    """

    def __init__(self, bootstrap: str, topic: str, subject_id: str, serde: AvroSerde | None,
                 progress: ProgressCallback | None, timeout_s: float,
                 client_config: dict[str, Any] | None = None):
        self.bootstrap = bootstrap
        self._client_config = client_config or {}
        self.topic = topic
        self.subject_id = subject_id
        self.partition: int | None = None
        self.end_offset: int | None = None
        self.scanned = 0
        self.matched = 0
        self.poison: list[RawMessage] = []
        self._serde = serde or AvroSerde()
        self._progress = progress
        self._timeout_s = timeout_s
        self._iter = self._scan()

    def __next__(self) -> RawMessage:
        return next(self._iter)

    def __iter__(self) -> SubjectScan:
        return self

    def _scan(self) -> Iterator[RawMessage]:
        key = self.subject_id.encode("utf-8")
        consumer = _consumer(self.bootstrap, max_poll_records=500, **self._client_config)
        try:
            partitions = _topic_partitions(consumer, self.topic, self._timeout_s)
            if not partitions:
                raise _no_partition(self.topic, 0, 0, partitions)
            self.partition = partition_of_key(self.topic, key, partitions)
            tp = TopicPartition(self.topic, self.partition)
            consumer.assign([tp])
            consumer.seek(tp, 0)
            end: int | None = None
            position = 0
            idle_until = time.monotonic() + self._timeout_s
            while end is None or position < end:
                polled = _poll(consumer, 200)
                if end is None:
                    end = consumer.highwater(tp)
                    if end is None:
                        if polled:  # records without a log end: read them again once it is known
                            consumer.seek(tp, 0)
                        if time.monotonic() > idle_until:
                            raise LogReadError(
                                f"no answer from Kafka at {self.bootstrap} for "
                                f"{self.topic}[{self.partition}] within {self._timeout_s:g} s")
                        continue
                    self.end_offset = end
                    if self._progress:
                        self._progress(0, end)
                records = [r for batch in polled.values() for r in batch if r.offset < end]
                if records:
                    idle_until = time.monotonic() + self._timeout_s
                elif time.monotonic() > idle_until:
                    raise LogReadError(
                        f"Kafka at {self.bootstrap} stopped returning {self.topic}"
                        f"[{self.partition}] at offset {position} of {end}")
                for record in records:
                    position = record.offset + 1
                    self.scanned += 1
                    if record.key != key:
                        continue
                    message = decode_record(record, self._serde)
                    if message.decoded is None or message.decoded.event.subject_id != self.subject_id:
                        self.poison.append(message)
                        continue
                    self.matched += 1
                    yield message
                if records and self._progress:
                    self._progress(min(position, end), end)
                current = consumer.position(tp)
                if current is not None:
                    position = max(position, min(current, end))
            if self._progress and end is not None:
                self._progress(end, end)
        finally:
            consumer.close(autocommit=False)


def iter_subject_events(
    bootstrap: str,
    topic: str,
    subject_id: str,
    serde: AvroSerde | None = None,
    progress: ProgressCallback | None = None,
    timeout_s: float = 10.0,
    client_config: dict[str, Any] | None = None,
) -> SubjectScan:
    """Every event about ``subject_id`` on the log, in log order.

    Scans only the subject's partition (:func:`partition_for`), from offset 0 up to its
    high watermark as of the start of the scan, and yields the messages keyed by the
    subject that decode to an event of that subject. Poison messages keyed by the
    subject are skipped and kept in the returned scan's ``poison`` list. Duplicates (the
    same ``event_id`` delivered twice) are yielded as they are on the log.

    ``progress(done, total)`` is called with offsets scanned and the log end.

    Raises (while iterating):
        MessageNotFound: the topic does not exist.
        LogReadError: the broker is unreachable or stops answering for ``timeout_s``.
    """
    return SubjectScan(bootstrap, topic, subject_id, serde, progress, timeout_s, client_config)


__all__ = [
    "LogReadError",
    "MessageNotFound",
    "ProgressCallback",
    "RawMessage",
    "SubjectScan",
    "decode_record",
    "fetch_message",
    "iter_subject_events",
    "partition_for",
    "partition_of_key",
]
