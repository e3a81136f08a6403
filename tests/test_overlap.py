"""The overlapped run of the projector (``ProjectorWorker.overlap``): batch N+1 is polled
and decoded while batch N's transaction runs on a second thread. Real broker and
database; each batch :meth:`ProjectionRecorder.apply` commits is recorded (partition →
first and next offset) by a subclass that calls the real ``apply``, so a batch applied
twice, skipped, or committed after a failed one shows in the ranges."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest
import sqlalchemy as sa

from beliefstore.errors import FencedError
from beliefstore.events.workload import generate
from beliefstore.projector.store import LoggedEvent, PartitionProgress, ProjectionRecorder
from beliefstore.projector.tables import observations, projection_offsets
from beliefstore.projector.worker import ProjectorWorker
from tests.test_crash import assert_read_model_equals_fold

APPLY_THREAD = "beliefstore-projector-apply"


class RecordingRecorder(ProjectionRecorder):
    """The real recorder; each committed batch's offset range per partition is kept."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.committed: list[dict[int, tuple[int, int]]] = []
        self.calls = 0

    def apply(self, topic: str, batch: Sequence[LoggedEvent],
              progress: dict[int, PartitionProgress], fence: dict[int, int] | None = None
              ) -> int:
        self.calls += 1
        firsts: dict[int, int] = {}
        for item in batch:
            p = item.position
            firsts[p.partition] = min(p.offset, firsts.get(p.partition, p.offset))
        recomputed = super().apply(topic, batch, progress, fence)
        self.committed.append({part: (firsts.get(part, -1), pr.next_offset)
                               for part, pr in progress.items()})
        return recomputed


def recording_worker(settings, engine, group: str | None = None) -> ProjectorWorker:
    worker = ProjectorWorker(settings, engine, group=group)
    old = worker.recorder
    worker.recorder = RecordingRecorder(old.engine, old.projection, old.fold_settings,
                                        old.keyring, temp_buffers_kib=old.temp_buffers_kib)
    worker.recorder.asynchronous_commit = old.asynchronous_commit
    worker.overlap = True
    return worker


def stored_offsets(engine) -> dict[int, int]:
    with engine.connect() as conn:
        return {r.partition: r.next_offset for r in conn.execute(
            sa.select(projection_offsets.c.partition, projection_offsets.c.next_offset))}


def log_ends(receipts) -> dict[int, int]:
    """Partition → the offset after its last produced event."""
    ends: dict[int, int] = {}
    for r in receipts:
        ends[r.partition] = max(ends.get(r.partition, 0), r.offset + 1)
    return ends


def assert_ranges_tile(committed: list[dict[int, tuple[int, int]]],
                       ends: dict[int, int]) -> None:
    """Per partition, the committed batches' ranges follow each other from 0 to its end:
    none applied twice (a range starting below the previous end), none skipped (a gap)."""
    reached: dict[int, int] = {}
    for ranges in committed:
        for part, (first, next_offset) in ranges.items():
            start = reached.get(part, 0)
            # ``first`` is -1 when every message of the partition was poison or shredded
            assert first in (-1, start), f"partition {part}: batch starts at {first}, not {start}"
            assert next_offset > start
            reached[part] = next_offset
    assert reached == ends


def test_overlapped_run_applies_every_batch_once_in_order(settings, engine, producer):
    events = generate(3_000, seed=21, subjects=300, profile="realistic")
    ends = log_ends(producer.send_many(events))
    worker = recording_worker(settings, engine)
    with worker:
        stats = worker.run(until_caught_up=True)
    assert not any(t.name.startswith(APPLY_THREAD) for t in threading.enumerate())
    assert stats.batches == len(worker.recorder.committed) >= len(events) // settings.batch_size
    assert stats.events + stats.poison == len(events)
    assert_ranges_tile(worker.recorder.committed, ends)
    assert stored_offsets(engine) == ends
    assert_read_model_equals_fold(engine, events, settings.fold_settings)


def test_a_failed_batch_stops_the_run_and_the_prefetched_one_is_never_applied(
        settings, engine, producer):
    events = generate(3_000, seed=22, subjects=300, profile="realistic")
    ends = log_ends(producer.send_many(events))
    worker = recording_worker(settings, engine)
    usurper = ProjectionRecorder(engine, "self_model", settings.fold_settings)

    def take_over(stats) -> None:
        # after the third commit another worker claims every partition: the fourth
        # batch's fence fails while the fifth is being polled and decoded
        if stats.batches == 3:
            usurper.claim(settings.topic, range(settings.partitions), owner="usurper")

    with worker:
        with pytest.raises(FencedError):
            worker.run(until_caught_up=True, on_batch=take_over)
        assert not any(t.name.startswith(APPLY_THREAD) for t in threading.enumerate())
        assert len(worker.recorder.committed) == 3
        assert worker.recorder.calls == 4  # the fifth batch (polled) never reached apply
        stored = stored_offsets(engine)
        with engine.connect() as conn:
            beyond = conn.execute(sa.select(sa.func.count()).select_from(observations).where(
                sa.or_(*[sa.and_(observations.c.kafka_partition == p,
                                 observations.c.kafka_offset >= o)
                         for p, o in stored.items()]))).scalar_one()
        assert beyond == 0  # nothing past the third batch's offsets was committed
        # the consumer was rewound to what PostgreSQL stores as next
        consumer = worker._consumer
        assert consumer is not None
        positions = {tp.partition: consumer.position(tp) for tp in consumer.assignment()}
        assert all(positions[p] == o for p, o in stored.items()), (positions, stored)
    # a new worker resumes from the stored offsets: every event once
    resumed = recording_worker(settings, engine)
    with resumed:
        resumed.run(until_caught_up=True)
    assert_ranges_tile(worker.recorder.committed + resumed.recorder.committed, ends)
    assert_read_model_equals_fold(engine, events, settings.fold_settings)


def test_stop_commits_the_batch_in_flight_and_leaves_no_thread(settings, engine, producer):
    events = generate(2_000, seed=23, subjects=200, profile="realistic")
    producer.send_many(events)
    worker = recording_worker(settings, engine)
    stop = threading.Event()

    def stop_after_two(stats) -> None:
        if stats.batches == 2:
            stop.set()

    with worker:
        worker.run(stop, on_batch=stop_after_two)
        assert not any(t.name.startswith(APPLY_THREAD) for t in threading.enumerate())
        # the batch in flight when stop was seen was committed, none after it
        assert len(worker.recorder.committed) == 3
        stored = stored_offsets(engine)
        # (a partition no batch touched yet keeps its claim's offset, 0)
        assert stored == {p: 0 for p in stored} | {
            p: r[1] for c in worker.recorder.committed for p, r in c.items()}
        consumer = worker._consumer
        assert consumer is not None
        positions = {tp.partition: consumer.position(tp) for tp in consumer.assignment()}
        assert all(positions[p] == o for p, o in stored.items()), (positions, stored)


def test_a_rebalance_waits_for_the_batch_in_flight(settings, engine, producer):
    # Two overlapped members of one consumer group: the second joins while the first
    # is applying; every offset of every partition is committed once, by one of them.
    events = generate(4_000, seed=24, subjects=400, profile="realistic")
    ends = log_ends(producer.send_many(events))
    stop = threading.Event()
    committed: list[dict[int, tuple[int, int]]] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def member() -> None:
        while not stop.is_set():  # as run_active_projection: a fenced member rejoins
            worker = recording_worker(settings, engine, group="overlap-test")
            try:
                with worker:
                    worker.run(stop)
            except FencedError:
                continue
            except BaseException as exc:
                errors.append(exc)
                return
            finally:
                with lock:
                    committed.extend(worker.recorder.committed)

    first = threading.Thread(target=member)
    first.start()
    second = threading.Thread(target=member)
    try:
        deadline = time.monotonic() + 60
        while sum(stored_offsets(engine).values()) < len(events) // 4:
            assert time.monotonic() < deadline, "the first member applied nothing"
            time.sleep(0.05)
        second.start()
        deadline = time.monotonic() + 120
        while stored_offsets(engine) != ends:
            assert time.monotonic() < deadline, f"not caught up: {stored_offsets(engine)}"
            assert not errors, errors
            time.sleep(0.1)
    finally:
        stop.set()
        first.join(60)
        if second.is_alive() or second.ident is not None:
            second.join(60)
    assert not errors, errors
    assert not any(t.name.startswith(APPLY_THREAD) for t in threading.enumerate())
    per_partition: dict[int, list[tuple[int, int]]] = {}
    for ranges in committed:
        for part, (start, next_offset) in ranges.items():
            per_partition.setdefault(part, []).append((start, next_offset))
    for part, spans in per_partition.items():
        spans.sort()
        reached = 0
        for start, next_offset in spans:
            assert start in (-1, reached), f"partition {part}: {spans}"
            reached = next_offset
        assert reached == ends[part]
    assert_read_model_equals_fold(engine, events, settings.fold_settings)
