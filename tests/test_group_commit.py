"""The producer's group commit (``events.producer.GroupCommit``) under concurrent callers:
every caller gets its own event's result, one group is flushed at a time by default and
at most two with ``max_inflight=2`` (the next group's work overlaps the previous one's
wait for the broker), where a group holding an erasure is flushed alone. The flush here
is a plain function that records what it was given (the grouping logic alone; the
end-to-end path runs on the real broker in test_api.py, test_hot_ingest.py and
test_erasure.py)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Sequence

from beliefstore.events.model import Event, ObservationRecorded, SubjectErased
from beliefstore.events.producer import GroupCommit, Receipt


def observed(subject: str) -> ObservationRecorded:
    return ObservationRecorded(str(uuid.uuid4()), subject, "agent", 0, "support", "mood",
                               "calm", 0.5)


def erased(subject: str) -> SubjectErased:
    return SubjectErased(str(uuid.uuid4()), subject, "agent", 0)


class Recorder:
    """A flush that takes ``delay_s`` and records the groups and their overlap."""

    def __init__(self, delay_s: float):
        self.delay_s = delay_s
        self.lock = threading.Lock()
        self.active: list[list[Event]] = []
        self.groups: list[list[Event]] = []
        self.max_active = 0
        self.erasure_overlapped = False
        self.offset = 0

    def __call__(self, events: Sequence[Event]) -> list[Receipt]:
        group = list(events)
        with self.lock:
            self.active.append(group)
            self.groups.append(group)
            self.max_active = max(self.max_active, len(self.active))
            if len(self.active) > 1 and any(isinstance(e, SubjectErased)
                                            for g in self.active for e in g):
                self.erasure_overlapped = True
        time.sleep(self.delay_s)
        with self.lock:
            self.active.remove(group)
            receipts = []
            for e in group:
                receipts.append(Receipt(e.event_id, "t", 0, self.offset))
                self.offset += 1
        return receipts


def run(commit: GroupCommit, events: list[Event]) -> dict[str, Receipt]:
    results: dict[str, Receipt] = {}

    def call(e: Event) -> None:
        results[e.event_id] = commit.submit(e)

    threads = [threading.Thread(target=call, args=(e,)) for e in events]
    for t in threads:
        t.start()
        time.sleep(0.001)
    for t in threads:
        t.join(30)
    return results


def test_each_caller_gets_its_own_receipt_and_two_groups_overlap():
    flush = Recorder(0.02)
    events: list[Event] = [observed(f"s{i}") for i in range(120)]
    results = run(GroupCommit(flush, max_inflight=2), events)
    assert set(results) == {e.event_id for e in events}
    assert all(results[e.event_id].event_id == e.event_id for e in events)
    assert len({r.offset for r in results.values()}) == len(events)
    assert flush.max_active == 2  # never more than two, and the second did start
    assert len(flush.groups) < len(events)  # callers were grouped
    assert sorted(e.event_id for g in flush.groups for e in g) == sorted(results)


def test_a_group_with_an_erasure_is_flushed_alone():
    flush = Recorder(0.01)
    events: list[Event] = []
    for i in range(150):
        events.append(erased(f"s{i % 7}") if i % 10 == 5 else observed(f"s{i % 7}"))
    results = run(GroupCommit(flush, max_inflight=2), events)
    assert set(results) == {e.event_id for e in events}
    assert not flush.erasure_overlapped
    assert flush.max_active == 2


def test_one_group_at_a_time_by_default():
    flush = Recorder(0.01)
    events: list[Event] = [observed(f"s{i}") for i in range(40)]
    results = run(GroupCommit(flush), events)
    assert set(results) == {e.event_id for e in events}
    assert flush.max_active == 1 and len(flush.groups) < len(events)


def test_the_leaders_own_event_is_always_in_its_group():
    """More callers than ``max_group``: every one still gets its receipt."""
    flush = Recorder(0.01)
    events: list[Event] = [observed(f"s{i}") for i in range(60)]
    results = run(GroupCommit(flush, max_group=4), events)
    assert set(results) == {e.event_id for e in events}
    assert max(len(g) for g in flush.groups) <= 4


class Pipeline:
    """A ``prepare`` (``prepare_s``) returning a wait (``wait_s``), recording how many
    groups were being prepared, and prepared or waiting, at once, and what an erasure's
    flush overlapped."""

    def __init__(self, prepare_s: float, wait_s: float):
        self.prepare_s, self.wait_s = prepare_s, wait_s
        self.lock = threading.Lock()
        self.preparing = self.waiting = 0
        self.max_preparing = self.max_busy = 0
        self.prepared: list[list[Event]] = []
        self.flushed: list[list[Event]] = []
        self.erasure_overlapped = False
        self.offset = 0

    def _receipts(self, group: list[Event]) -> list[Receipt]:
        with self.lock:
            receipts = [Receipt(e.event_id, "t", 0, self.offset + i) for i, e in enumerate(group)]
            self.offset += len(group)
        return receipts

    def prepare(self, events: Sequence[Event]):  # noqa: ANN201
        group = list(events)
        assert not any(isinstance(e, SubjectErased) for e in group)
        with self.lock:
            self.preparing += 1
            self.max_preparing = max(self.max_preparing, self.preparing)
            self.max_busy = max(self.max_busy, self.preparing + self.waiting)
            self.prepared.append(group)
        time.sleep(self.prepare_s)
        receipts = self._receipts(group)
        with self.lock:
            self.preparing -= 1
            self.waiting += 1

        def wait() -> list[Receipt]:
            time.sleep(self.wait_s)
            with self.lock:
                self.waiting -= 1
            return receipts

        return wait

    def flush(self, events: Sequence[Event]) -> list[Receipt]:
        group = list(events)
        with self.lock:
            if self.preparing or self.waiting:
                self.erasure_overlapped = True
            self.flushed.append(group)
        time.sleep(self.wait_s)
        return self._receipts(group)


def test_with_prepare_the_next_group_is_prepared_while_the_previous_waits():
    """Two-step groups: one group prepared at a time, the next one prepared while the
    previous waits for its acknowledgement; every caller gets its own receipt."""
    pipe = Pipeline(0.005, 0.03)
    events: list[Event] = [observed(f"s{i}") for i in range(120)]
    results = run(GroupCommit(pipe.flush, prepare=pipe.prepare), events)
    assert set(results) == {e.event_id for e in events}
    assert all(results[e.event_id].event_id == e.event_id for e in events)
    assert len({r.offset for r in results.values()}) == len(events)
    assert pipe.max_preparing == 1
    assert pipe.max_busy >= 2  # a group was prepared while another waited
    assert not pipe.flushed and len(pipe.prepared) < len(events)


def test_with_prepare_an_erasure_is_flushed_whole_once_nothing_else_is_in_flight():
    """A group holding an erasure is flushed with ``flush`` (erase, then destroy the keys)
    only once no group is being prepared or waiting for its acknowledgement, and no group
    starts meanwhile."""
    pipe = Pipeline(0.003, 0.02)
    events: list[Event] = []
    for i in range(150):
        events.append(erased(f"s{i % 7}") if i % 10 == 5 else observed(f"s{i % 7}"))
    results = run(GroupCommit(pipe.flush, prepare=pipe.prepare), events)
    assert set(results) == {e.event_id for e in events}
    assert pipe.flushed and all(any(isinstance(e, SubjectErased) for e in g)
                                for g in pipe.flushed)
    assert not pipe.erasure_overlapped


def test_waiting_callers_are_woken_only_for_their_own_turn(monkeypatch):
    """Each waiting caller sleeps on its own condition: a finished group wakes its own
    callers and the first caller still queued, not every waiting caller (with one
    condition for all, 19 callers queued behind a group were all woken when it ended,
    and again when the next one did)."""
    from beliefstore.events import producer

    wakeups = 0
    original = producer._Slot.__init__

    class Counting(threading.Condition):
        def wait(self, timeout: float | None = None) -> bool:
            nonlocal wakeups
            woken = super().wait(timeout)
            wakeups += 1  # the lock is held again here
            return woken

    def counting_slot(self: producer._Slot, event: Event, lock: threading.Lock) -> None:
        original(self, event, lock)
        self.wake = Counting(lock)

    monkeypatch.setattr(producer._Slot, "__init__", counting_slot)
    queued = threading.Event()
    flush = Recorder(0.05)  # a group waits for the broker a while
    commit = GroupCommit(lambda events: (queued.wait(10), flush(events))[1])
    events: list[Event] = [observed(f"s{i}") for i in range(20)]
    results: dict[str, Receipt] = {}

    def call(e: Event) -> None:
        results[e.event_id] = commit.submit(e)

    threads = [threading.Thread(target=call, args=(e,)) for e in events]
    threads[0].start()
    time.sleep(0.05)  # the first caller leads a group of one and waits in its flush
    for t in threads[1:]:
        t.start()
    deadline = time.monotonic() + 10
    while len(commit._queue) < 19 and time.monotonic() < deadline:
        time.sleep(0.005)
    queued.set()
    for t in threads:
        t.join(30)
    assert set(results) == {e.event_id for e in events}
    assert [len(g) for g in flush.groups] == [1, 19]
    # the first queued caller woken to lead, the 18 others once with their result
    assert wakeups == 19
