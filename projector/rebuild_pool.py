"""Worker processes of the bulk rebuild: reading, decoding and ``COPY`` lines on the
other cores.

A replay is bound by Python (kafka-python's record parsing, decoding every event,
validating it, building its rows). :class:`RebuildPool` runs that part in worker
processes (:class:`concurrent.futures.ProcessPoolExecutor`, ``spawn``): the replaying
process cuts each partition into ranges of offsets, a worker reads a range with its own
Kafka consumer and decodes it (:func:`read_range`, :func:`decode_chunk`), and returns one
:data:`Item` per record in log order; the replaying process loads each partition's
ranges in order and keeps the bookkeeping that needs every partition (deduplication by
``event_id``, retractions and erasures, the marks) to itself, so the result is exactly
that of the serial path. At the end the workers fold the counting observations, split
by subject (:meth:`RebuildPool.fold`).

Decoding follows :meth:`ProjectorWorker._decode_all
<beliefstore.projector.worker.ProjectorWorker._decode_all>`: the same
:class:`~beliefstore.events.serde.AvroSerde` (validation included), sealed observations
opened after one key prefetch per chunk, a message whose key is not its subject poison,
an observation of an erased subject (destroyed key) skipped; a message that
:meth:`~beliefstore.events.serde.AvroSerde.decode_plain` proves valid goes from its
plain record to its ``COPY`` line without an event object (same lines, same poison).
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import replace
from sys import intern
from typing import Any

from beliefstore.errors import PoisonEvent
from beliefstore.events.model import ObservationRecorded, ObservationRetracted
from beliefstore.events.sealing import EventShredded, FieldSealer
from beliefstore.events.serde import AvroSerde, DecodedEvent, SchemaRegistry
from beliefstore.projector import copytext
from beliefstore.projector.fold import Counting, FoldSettings, fold_counting

OBSERVED, RETRACTED, ERASED, POISON, SHREDDED = range(5)
"""Kinds of :data:`Item`."""

Item = tuple[Any, ...]
"""The result of decoding one record, by its first element:

* ``(OBSERVED, offset, line, counting)``: ``line`` its ``observations`` ``COPY`` line,
  ``counting`` a :data:`~beliefstore.projector.fold.Counting` tuple;
* ``(RETRACTED, offset, line, event_id, subject_id, retracted_event_id, source)``;
* ``(ERASED, offset, line, event_id, subject_id, occurred_at)``;
* ``(POISON, index, kind, reason)``: the chunk's ``index``-th record is poison;
* ``(SHREDDED, offset)``: a sealed observation whose subject was erased.
"""

Record = tuple[int, int | None, bytes | None, bytes | None]
"""What :func:`decode_chunk` needs of a Kafka record: ``(offset, timestamp ms, key, value)``."""

MIN_EVENTS = 50_000
"""Below this many messages to replay, the rebuild stays in one process (starting the
workers costs about a second)."""

_serde: AvroSerde | None = None

INTERN_VALUE = 32
"""Observed values up to this many characters are interned by the workers (values repeat
a lot: a handful per attribute)."""


ORPHAN_CHECK_S = 1.0
"""How often a worker process checks that the replaying process is still its parent,
seconds; once it is not (SIGKILL, a crash), the worker exits."""


def _exit_when_orphaned(parent: int) -> None:
    while True:
        time.sleep(ORPHAN_CHECK_S)
        if os.getppid() != parent:
            os._exit(1)  # the replaying process is gone: nothing to decode for


def _init(settings: Any, registry: SchemaRegistry, keyring_schema: str | None,
          parent: int) -> None:
    global _serde
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True,
                     name="beliefstore-orphan-check").start()
    if keyring_schema is None:
        _serde = AvroSerde(registry)
    else:
        from beliefstore.access.datakeys import Keyring

        keyring = Keyring.from_settings(replace(settings, db_schema=keyring_schema))
        _serde = AvroSerde(registry, FieldSealer(keyring))


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off for the block (restored after it, also on an
    error). The rebuild's hot loops allocate millions of tuples and strings that hold no
    cycles; with the collector on, its passes over them cost about a quarter of a
    worker's decoding time (measured: 16.9 → 12.9 µs a record). Whatever cycles the
    block leaves are collected once the collector is back on."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def decode_chunk(topic: str, partition: int, records: Sequence[Record]) -> list[Item]:
    """:func:`_decode_chunk` with the garbage collector paused (:func:`gc_paused`)."""
    with gc_paused():
        return _decode_chunk(topic, partition, records)


def _decode_chunk(topic: str, partition: int, records: Sequence[Record]) -> list[Item]:
    """Decode records of one partition (in log order) into :data:`Item` s, in a worker.

    A record that :meth:`AvroSerde.decode_plain
    <beliefstore.events.serde.AvroSerde.decode_plain>` proves valid (the common case)
    goes from its plain Avro record to its ``COPY`` line without an event object; any
    other through :meth:`AvroSerde.decode <beliefstore.events.serde.AvroSerde.decode>`
    as the projector decodes it, so the items (poison kinds and reasons included) are
    the same either way.

    Never raises for a bad message (it becomes a ``POISON`` item); raises
    ``SealedEventError``/database errors as the projector's decoding does.
    """
    serde = _serde
    assert serde is not None, "decode_chunk runs in a RebuildPool worker"
    plain = serde.decode_plain
    first: list[tuple[type, Any, dict[str, Any]] | DecodedEvent | PoisonEvent] = []
    key_ids: set[str] = set()
    for _, _, _, value in records:
        quick = plain(value)  # type: ignore[arg-type]
        if quick is not None:
            first.append(quick)
            continue
        try:
            decoded = serde.decode(value, open_sealed=False)  # type: ignore[arg-type]
        except PoisonEvent as exc:
            first.append(exc)
            continue
        sealed = decoded.record.get("sealed")
        if isinstance(sealed, dict):
            key_ids.add(str(sealed["key_id"]))
        first.append(decoded)
    if key_ids and serde.sealer is not None:
        serde.sealer.keyring.prefetch(key_ids)
    out: list[Item] = []
    append = out.append
    hexes: dict[bytes, str] = {}
    observation, retraction, erasure = (copytext.observation, copytext.retraction,
                                        copytext.erasure)
    for index, ((offset, timestamp, key, _), parsed) in enumerate(zip(records, first,
                                                                       strict=True)):
        if type(parsed) is tuple:  # decode_plain's (class, writer, record)
            cls, writer, r = parsed
        else:
            try:
                if isinstance(parsed, PoisonEvent):
                    raise parsed
                assert isinstance(parsed, DecodedEvent)
                decoded = parsed
                if decoded.record.get("sealed") is not None and isinstance(
                        decoded.event, ObservationRecorded):
                    decoded = serde.open_decoded(decoded)
            except PoisonEvent as exc:
                append((POISON, index, exc.kind, exc.reason))
                continue
            except EventShredded:
                append((SHREDDED, offset))
                continue
            # the validated (and opened) event's fields, by the record's names
            cls, writer, r = type(decoded.event), decoded.writer, vars(decoded.event)
        subject = r["subject_id"]
        if key is not None and key != subject.encode("utf-8"):
            append((POISON, index, "invalid_event",
                    f"message key {key!r} is not the event's subject_id {subject!r}"))
            continue
        recorded_at = timestamp if timestamp is not None and timestamp >= 0 else None
        fingerprint = hexes.get(writer.fingerprint)
        if fingerprint is None:
            fingerprint = hexes[writer.fingerprint] = writer.fingerprint.hex()
        if cls is ObservationRecorded:
            # the few contexts, attributes, sources and short values as one object
            # each: pickled once per range (then by reference), kept once in the
            # replaying process
            event_id, context, attribute = r["event_id"], intern(r["context"]), \
                intern(r["attribute"])
            observed, confidence, source = r["value"], r["confidence"], intern(r["source"])
            if len(observed) <= INTERN_VALUE:
                observed = intern(observed)
            occurred_at = r["occurred_at"]
            append((OBSERVED, offset, observation(
                event_id, subject, context, attribute, observed, confidence, source,
                occurred_at, r["evidence"], r["metadata"], topic, partition, offset,
                recorded_at, fingerprint),
                (subject, context, attribute, source, event_id, occurred_at, observed,
                 confidence)))
        elif cls is ObservationRetracted:
            append((RETRACTED, offset, retraction(
                r["event_id"], subject, r["source"], r["occurred_at"],
                r["retracted_event_id"], r["reason"], topic, partition, offset,
                recorded_at, fingerprint),
                r["event_id"], subject, r["retracted_event_id"], r["source"]))
        else:
            append((ERASED, offset, erasure(
                r["event_id"], subject, r["source"], r["occurred_at"], r["reason"],
                topic, partition, offset, recorded_at, fingerprint),
                r["event_id"], subject, r["occurred_at"]))
    return out


RANGE = 20_000
"""Offsets of one partition a worker process reads and decodes per task
(:func:`read_range`)."""

READ_STALL_S = 60.0
"""Longest a worker process waits for the next records of its range, seconds."""

_consumers: dict[tuple[str, int], Any] = {}
"""The worker process's Kafka consumers, one per (topic, partition) it has read."""


def _consumer(settings: Any, topic: str, partition: int) -> Any:
    from kafka import KafkaConsumer, TopicPartition

    consumer = _consumers.get((topic, partition))
    if consumer is None:
        consumer = KafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap_servers,
            client_id=f"beliefstore-rebuild-{os.getpid()}", group_id=None,
            enable_auto_commit=False, auto_offset_reset="none",
            max_partition_fetch_bytes=4 << 20,
            fetch_max_wait_ms=settings.fetch_max_wait_ms or 20,
            **settings.kafka_client_config())
        consumer.assign([TopicPartition(topic, partition)])
        _consumers[(topic, partition)] = consumer
    return consumer


def read_range(settings: Any, topic: str, partition: int, start: int,
               stop: int | None) -> tuple[list[Item], dict[int, Record], int]:
    """Read offsets ``start`` ≤ offset < ``stop`` of one partition with this worker
    process's own consumer (``stop`` ``None``: to the log end, the high watermark its
    fetches report, confirmed by one more fetch as
    :func:`~beliefstore.projector.replay.read_log` does) and decode them
    (:func:`decode_chunk`). Returns the items, for each ``POISON`` item's index its
    :data:`Record` (for the dead-letter topic), and the next offset to read.

    Raises:
        TimeoutError: no record arrived for :data:`READ_STALL_S` seconds.
        OffsetOutOfRangeError: ``start`` is outside the log (kafka-python).
    """
    with gc_paused():  # kafka-python builds several objects per record
        return _read_range(settings, topic, partition, start, stop)


def _read_range(settings: Any, topic: str, partition: int, start: int,
                stop: int | None) -> tuple[list[Item], dict[int, Record], int]:
    from kafka import TopicPartition

    fresh = (topic, partition) not in _consumers  # no position before its first seek
    consumer = _consumer(settings, topic, partition)
    tp = TopicPartition(topic, partition)
    if fresh or consumer.position(tp) != start:
        consumer.seek(tp, start)
    records: list[Record] = []
    deadline = time.monotonic() + READ_STALL_S
    confirming = False
    while True:
        position = consumer.position(tp)
        if stop is not None and position >= stop:
            break
        if stop is None:
            end = consumer.highwater(tp)
            if end is not None and position >= end:
                if confirming:
                    break
                confirming = True  # one more fetch: a stale high watermark ends nothing
        polled = consumer.poll(timeout_ms=200, max_records=RANGE if stop is None
                               else stop - position)
        got = polled.get(tp, ())
        records.extend((r.offset, r.timestamp, r.key, r.value) for r in got
                       if stop is None or r.offset < stop)
        if got:
            deadline = time.monotonic() + READ_STALL_S
            confirming = False
        elif time.monotonic() > deadline:
            raise TimeoutError(f"{topic}[{partition}]: no record after offset "
                               f"{position} for {READ_STALL_S:.0f} s (reading up to "
                               f"{'the log end' if stop is None else stop})")
    items = _decode_chunk(topic, partition, records)
    return (items, {item[1]: records[item[1]] for item in items if item[0] == POISON},
            position if stop is None else stop)


FOLD_PARTS_PER_WORKER = 4
"""Parts of the fold per worker process (:meth:`RebuildPool.fold`): smaller parts let
PostgreSQL load the first parts' rows while the workers fold the rest."""


def default_workers() -> int:
    """Worker processes for a large rebuild: one per CPU the process may use (at least 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus)


class RebuildPool:
    """``workers`` processes that read and decode ranges of the log (:func:`read_range`)
    and fold (:func:`fold_chunk`).

    Use as a context manager; leaving it shuts the processes down (cancelling what is
    queued), also on an exception or Ctrl-C. If the replaying process dies without
    leaving it (SIGKILL), each worker exits within :data:`ORPHAN_CHECK_S` seconds.

    Args:
        settings: the replay's settings (``database_url`` and ``home``: the keyring's
            database and master key).
        serde: the replaying process's serde; each worker gets its schema registry and,
            if it opens sealed observations, a keyring on the same schema.
        workers: number of processes (≥ 1).

    Raises:
        ValueError: ``workers`` < 1.
    """

    def __init__(self, settings: Any, serde: AvroSerde, workers: int):
        if workers < 1:
            raise ValueError(f"a rebuild pool needs at least 1 worker, not {workers}")
        self.workers = workers
        self.fold_seconds = 0.0
        """Seconds from :meth:`fold` to its last part folded (for benchmarks and logs)."""
        self._settings = settings
        keyring_schema = serde.sealer.keyring.schema if serde.sealer is not None else None
        self._executor = ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init, initargs=(settings, serde.registry, keyring_schema,
                                         os.getpid()))

    def read(self, topic: str, partition: int, start: int, stop: int | None) -> Future:
        """:func:`read_range` in a worker: the worker reads the records itself (the
        replaying process then parses no record); the future's result is ``(items,
        poison records by index, next offset)``."""
        return self._executor.submit(read_range, self._settings, topic, partition, start,
                                     stop)

    def fold(self, counting: list[Counting], settings: FoldSettings,
             where: dict[str, tuple[int, int]]) -> list[Future]:
        """:func:`fold_chunk` of ``counting`` split by subject into
        :data:`FOLD_PARTS_PER_WORKER` parts per worker: one future per part, whose
        result is its :data:`Folded` (the caller may do other work, e.g. PostgreSQL's,
        while the workers fold, and load each part's rows as soon as it is folded)."""
        parts = split_by_subject(counting, where, self.workers * FOLD_PARTS_PER_WORKER)
        started = time.perf_counter()
        futures = [self._executor.submit(fold_chunk, group, settings, w)
                   for group, w in parts if group]

        def done(_: Future) -> None:
            self.fold_seconds = max(self.fold_seconds, time.perf_counter() - started)

        for future in futures:
            future.add_done_callback(done)
        return futures

    def close(self) -> None:
        """Stop the worker processes (queued chunks cancelled)."""
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> RebuildPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Folded = tuple[int, bytes, bytes, bytes, list[str]]
"""What :func:`fold_chunk` returns: ``(beliefs, belief_sources lines, beliefs lines,
belief_changes lines, subjects with a belief)``."""


def fold_chunk(counting: list[Counting], settings: FoldSettings,
               where: dict[str, tuple[int, int]]) -> Folded:
    """:func:`_fold_chunk` with the garbage collector paused (:func:`gc_paused`)."""
    with gc_paused():
        return _fold_chunk(counting, settings, where)


def _fold_chunk(counting: list[Counting], settings: FoldSettings,
                where: dict[str, tuple[int, int]]) -> Folded:
    """The end of a rebuild for some keys (every counting observation of each of them):
    :func:`~beliefstore.projector.fold.fold_counting` (``ordered=False``), then the ``COPY``
    lines of their ``belief_sources``, ``beliefs`` and ``belief_changes`` rows
    (``where``: subject → its latest ``(partition, offset)``). Pure; runs in a worker
    or in the caller."""
    folded = fold_counting(counting, settings, ordered=False)
    beliefs, changes = copytext.beliefs_and_changes(folded, where)
    return (len(folded), copytext.sources(counting), beliefs, changes,
            [b.subject_id for b in folded])


def split_by_subject(counting: list[Counting], where: dict[str, tuple[int, int]],
                     parts: int) -> list[tuple[list[Counting], dict[str, tuple[int, int]]]]:
    """``counting`` cut into ``parts`` groups by subject (so every key lies in one), each
    with the ``where`` entries of its subjects: the arguments of :func:`fold_chunk`."""
    groups: list[list[Counting]] = [[] for _ in range(parts)]
    wheres: list[dict[str, tuple[int, int]]] = [{} for _ in range(parts)]
    for c in counting:
        i = hash(c[0]) % parts
        groups[i].append(c)
        w = where.get(c[0])
        if w is not None:
            wheres[i][c[0]] = w
    return list(zip(groups, wheres, strict=True))
