"""The bulk rebuild with its worker processes (``projector/rebuild_pool.py``): the same
read model as the one-process rebuild and as the pure fold, poison to the dead-letter
topic as the projector sends it, and a replay that dies half-way (Ctrl-C, a killed worker
process) leaves the live projection untouched, the new one empty, and no process behind."""

from __future__ import annotations

import multiprocessing
import os
import signal
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace

import pytest
import sqlalchemy as sa
from kafka import KafkaProducer

from beliefstore.events.model import ObservationRecorded
from beliefstore.events.producer import BeliefProducer
from beliefstore.events.serde import AvroSerde, encode_record
from beliefstore.events.validation import from_dict
from beliefstore.events.workload import generate
from beliefstore.projector.fold import fold
from beliefstore.projector.replay import BeliefRow, compare, read_beliefs, replay
from beliefstore.projector.store import LoggedEvent, LogPosition, PartitionProgress
from beliefstore.projector.tables import belief_changes, observations
from beliefstore.projector.worker import DLQ_HEADERS, ProjectorWorker
from tests.conftest import load_cases, read_topic
from tests.test_bulk import rows_of


def produce_with_poison(settings, count: int = 2500) -> list:
    """A realistic workload (retractions, erasures, duplicates; observations sealed, as
    the producer of these settings writes them) with three poison messages in it: a
    truncated body, an invalid event, and a valid event whose key is not its subject."""
    events = generate(count, seed=11, subjects=90, profile="realistic")
    with BeliefProducer.from_settings(settings) as producer:
        producer.send_many(events[:count // 2])
        serde = AvroSerde()
        first = next(e for e in events if isinstance(e, ObservationRecorded))
        good = serde.encode(first)
        schema = serde.registry.current(ObservationRecorded.schema_name)
        raw = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, acks="all")
        for key, value in (
                (first.subject_id, good[:-3]),
                (first.subject_id, encode_record({**first.__dict__, "confidence": 7.0},
                                                 schema)),
                ("someone-else", good)):
            raw.send(settings.topic, key=key.encode(), value=value).get(timeout=10)
        raw.close()
        producer.send_many(events[count // 2:])
    return events


def dead_letters(settings) -> list[str]:
    return sorted(dict((k, v.decode()) for k, v in m.headers)[DLQ_HEADERS[0]]
                  for m in read_topic(settings.kafka_bootstrap_servers, settings.dlq_topic))


def indexes(engine: sa.Engine, schema: str) -> set[tuple[str, str, str]]:
    """(table, index, definition without the schema) of every index in ``schema``."""
    with engine.connect() as conn:
        return {(t, i, d.replace(f"{schema}.", "")) for t, i, d in conn.execute(sa.text(
            "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = :s"),
            {"s": schema})}


def count_rows(engine: sa.Engine, table: sa.Table) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()


def test_the_worker_processes_give_the_rows_of_one_process_and_the_pure_fold(settings,
                                                                             catalog):
    events = produce_with_poison(settings)
    serial = replay(settings, catalog, "serial", workers=0)
    parallel = replay(settings, catalog, "parallel", workers=2)
    expected = {b.key: BeliefRow.of(b) for b in fold(events, settings.fold_settings)}
    for report in (serial, parallel):
        assert report.vs_fold == []
        assert report.stats.events == len(events)
        assert report.stats.poison == 3
    a = catalog.engine(serial.projection.schema)
    b = catalog.engine(parallel.projection.schema)
    assert len(expected) > 100
    assert compare(read_beliefs(b), expected) == []
    assert rows_of(a) == rows_of(b)
    assert count_rows(b, belief_changes) == len(expected)
    # the rebuild dropped the observations' indexes and primary key during its COPY and
    # built them again: the same as a migrated projection's
    live = catalog.active().schema
    want = indexes(catalog.engine(live), live)
    assert {("observations", "observations_pkey"), ("observations", "observations_key_source")} <= {
        (t, i) for t, i, _ in want}
    for report in (serial, parallel):
        schema = report.projection.schema
        assert indexes(catalog.engine(schema), schema) == want
    # each replay sent the poison to the dead-letter topic, as the projector does
    assert dead_letters(settings) == ["invalid_event"] * 4 + ["truncated"] * 2


@pytest.mark.parametrize("partitions", [1, 3])
def test_ranges_of_one_partition_read_by_several_workers_keep_log_order(settings, catalog,
                                                                        monkeypatch,
                                                                        partitions):
    """The worker processes read ranges of the log themselves; with ranges of 400
    offsets, one partition's ranges are read by both workers at once and loaded in log
    order (retractions after what they retract, erasures after their subject's
    observations, poison to the dead-letter topic): the rows of the one-process rebuild."""
    from beliefstore.events.topics import ensure_topics
    from beliefstore.projector import worker

    own = replace(settings, topic=f"{settings.topic}.p{partitions}",
                  dlq_topic=f"{settings.topic}.p{partitions}.dlq", partitions=partitions)
    ensure_topics(own.kafka_bootstrap_servers or "", {own.topic: partitions,
                                                      own.dlq_topic: 1})
    events = produce_with_poison(own, count=3000)
    monkeypatch.setattr(worker, "RANGE", 400)
    loaded: list[int] = []
    parallel = replay(own, catalog, "ranges", workers=2,
                      on_progress=lambda done, total: loaded.append(done))
    serial = replay(own, catalog, "one", workers=0)
    assert parallel.phases["workers"] == 2
    assert len(loaded) >= 3003 // 400  # one call per range loaded
    assert loaded == sorted(loaded) and loaded[-1] == len(events) + 3
    for report in (serial, parallel):
        assert report.vs_fold == []
        assert report.stats.events == len(events) and report.stats.poison == 3
        assert report.rebuilt_offsets == serial.rebuilt_offsets
    assert sum(serial.rebuilt_offsets.values()) == len(events) + 3
    assert rows_of(catalog.engine(serial.projection.schema)) == rows_of(
        catalog.engine(parallel.projection.schema))
    assert dead_letters(own) == ["invalid_event"] * 4 + ["truncated"] * 2


def test_the_merge_vectors_through_the_worker_processes(settings, catalog):
    """Every merge vector without settings of its own, in one log (each case's subjects
    and event ids renamed apart): the parallel rebuild gives each case's expected
    beliefs."""
    events, want = [], {}
    for i, case in enumerate(load_cases()):
        if case["settings"]:
            continue

        def rename(text: str, i: int = i) -> str:
            return f"{i:08x}{text[8:]}"

        for e in case["events"]:
            e = {**e, "subject_id": f"case{i}-{e['subject_id']}",
                 "event_id": rename(e["event_id"])}
            if "retracted_event_id" in e:
                e["retracted_event_id"] = rename(e["retracted_event_id"])
            events.append(from_dict(e))
        for b in case["expected"]:
            want[(f"case{i}-{b['subject_id']}", b["context"], b["attribute"])] = b
    with BeliefProducer.from_settings(settings) as producer:
        producer.send_many(events)
    report = replay(settings, catalog, "vectors", workers=2)
    assert report.vs_fold == []
    got = read_beliefs(catalog.engine(report.projection.schema))
    assert set(got) == set(want)
    for key, b in want.items():
        assert got[key].value == b["value"], key
        assert got[key].confidence == pytest.approx(b["confidence"], abs=1e-4)
        assert got[key].alternatives == pytest.approx(b.get("alternatives", {}), abs=1e-4)
        if "support" in b:
            assert list(got[key].support) == sorted(
                f"{int(key[0][4:key[0].index('-')]):08x}{x[8:]}" for x in b["support"])


def _live_rows(catalog) -> dict:
    return rows_of(catalog.engine(catalog.active().schema))


LIVE_EVENTS = 3000


def _projected_live(settings, catalog, seed: int):
    """:data:`LIVE_EVENTS` realistic events produced and projected live: the live
    projection and its rows."""
    events = generate(LIVE_EVENTS, seed=seed, subjects=100, profile="realistic")
    with BeliefProducer.from_settings(settings) as producer:
        producer.send_many(events)
    live = catalog.active()
    with ProjectorWorker(settings, catalog.engine(live.schema)) as worker:
        worker.run(until_caught_up=True)
    return live, _live_rows(catalog)


@pytest.mark.parametrize("how", ["ctrl-c", "killed worker process"])
def test_a_replay_that_dies_half_way_leaves_the_live_projection_untouched(settings, catalog,
                                                                          how):
    live, before = _projected_live(settings, catalog, seed=5)
    assert len(before["observations"]) > 1000

    killed = []

    def die(done: int, total: int | None) -> None:
        children = multiprocessing.active_children()
        if not children:
            return  # the worker processes start with the first chunk
        killed.append(done)
        if how == "ctrl-c":
            raise KeyboardInterrupt
        os.kill(children[0].pid, signal.SIGKILL)  # type: ignore[arg-type]

    with pytest.raises(KeyboardInterrupt if how == "ctrl-c" else BrokenProcessPool):
        replay(settings, catalog, "doomed", workers=2, on_progress=die)
    assert killed and killed[0] < LIVE_EVENTS
    assert multiprocessing.active_children() == []
    assert catalog.active().name == live.name
    assert _live_rows(catalog) == before
    doomed = catalog.get("doomed")
    assert count_rows(catalog.engine(doomed.schema), observations) == 0


def test_a_live_projection_ahead_by_a_restatement_differs_in_support_only(settings, catalog):
    """What the soak's `replay --switch` showed (one belief "different" with the same
    value, confidence and source count): the live projection had applied one more event,
    a source restating its value. The report names the field (support, with the event ids
    only one side counts) and that the live projection was one message ahead."""
    first = ObservationRecorded(
        event_id="00000000-0000-4000-8000-000000000001", subject_id="soak-100",
        source="checker", occurred_at=1_767_225_600_000, context="support",
        attribute="mood", value="calm", confidence=0.8)
    with BeliefProducer.from_settings(settings) as producer:
        producer.send_many([first])
    live = catalog.active()
    with ProjectorWorker(settings, catalog.engine(live.schema)) as worker:
        worker.run(until_caught_up=True)
        offsets = worker.recorder.stored_offsets(settings.topic)
        # one more event applied by the live projection only (written after the rebuild
        # read the log, as in the soak): the same source restates the same value
        again = replace(first, event_id="00000000-0000-4000-8000-000000000002",
                        occurred_at=first.occurred_at + 1000)
        [(partition, offset)] = [(p, o) for p, o in offsets.items() if o > 0]
        worker.recorder.apply(settings.topic, [LoggedEvent(again, LogPosition(
            settings.topic, partition, offset, None, "00" * 8))],
            {partition: PartitionProgress(offset + 1)})
    report = replay(settings, catalog, "after", workers=0)
    assert report.vs_fold == []
    [diff] = report.vs_live
    assert diff.left is not None and diff.right is not None
    assert (diff.left.value, diff.left.confidence) == (diff.right.value, diff.right.confidence)
    assert diff.fields == ("support",)
    assert diff.detail() == (f"support: rebuilt only ['{first.event_id}'], other only "
                             f"['{again.event_id}']")
    assert report.live_lead == 1 and not report.same_offsets
    same = replay(settings, catalog, "again", workers=0)  # two rebuilds: same offsets
    assert [d.fields for d in compare(read_beliefs(catalog.engine(same.projection.schema)),
                                      read_beliefs(catalog.engine(report.projection.schema)))
            ] == []


_KILLED_REPLAY = """
import pickle, sys, time
from beliefstore.projector.catalog import ProjectionCatalog
from beliefstore.projector.replay import replay

settings = pickle.loads(bytes.fromhex(sys.argv[1]))
catalog = ProjectionCatalog.from_settings(settings)

def slow(done, total):
    print("progress", done, flush=True)
    time.sleep(0.3)

replay(settings, catalog, "killed", workers=2, on_progress=slow)
print("finished", flush=True)
"""


def test_a_sigkilled_replay_leaves_the_live_projection_untouched_and_no_worker(settings,
                                                                               catalog):
    """The replaying process is SIGKILLed while its worker processes decode: its
    transaction dies with its connection (the new projection stays empty, the live one as
    it was), and the worker processes, orphaned, exit on their own."""
    import pickle
    import subprocess
    import sys
    import time

    import psutil

    live, before = _projected_live(settings, catalog, seed=8)
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_REPLAY,
                             pickle.dumps(settings).hex()],
                            stdout=subprocess.PIPE, text=True)
    try:
        children: list[psutil.Process] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            assert line.startswith("progress"), line
            children = psutil.Process(proc.pid).children()
            if children:
                break
        assert children, "the replay ran worker processes"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        gone, alive = psutil.wait_procs(children, timeout=20)
        assert alive == [], f"orphaned worker processes: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert catalog.active().name == live.name
    assert _live_rows(catalog) == before
    killed = catalog.get("killed")
    deadline = time.monotonic() + 20
    while True:  # PostgreSQL rolls the transaction back once it sees the socket close
        try:
            assert count_rows(catalog.engine(killed.schema), observations) == 0
            break
        except sa.exc.OperationalError:
            assert time.monotonic() < deadline
            time.sleep(0.2)


def test_the_joined_copy_lines_equal_the_row_by_row_ones():
    # copytext's joined builders (one encoding per table, shared columns formatted once)
    # write the bytes of each row's fields escaped one by one and joined by copytext.line,
    # escapes, NULLs and floats included.
    from beliefstore.projector import copytext
    from beliefstore.projector.fold import Belief

    odd = ["a\\b", "tab\there", "new\nline", "cr\rx", "é👤", "\\N", "plain"]
    counting = [(s, "ctx", "attr", src, "6f1c2a3b-0000-4000-8000-00000000abcd", at, v, c)
                for s, src, v, at, c in zip(odd, reversed(odd), odd[1:] + odd[:1],
                                            [0, 1, 999, 1000, 1767225600123,
                                             253402300799999, 86400000],
                                            [0.0, 1.0, 0.1, 1 / 3, 5e-324, 0.999, 0.5],
                                            strict=True)]
    beliefs = [Belief(c[0], c[1], c[2], c[6], c[7], -c[7] * 3, {"x\ty": 0.25, "\\": 0.5}
                      if i % 2 else {}, (c[4], c[4]), (c[3], "other\"agent"), i, c[5])
               for i, c in enumerate(counting)]
    where = {s: (i, 10 * i) for i, s in enumerate(odd[::2])}
    line, text, jsonb, millis = copytext.line, copytext.text, copytext.jsonb, copytext.millis
    assert copytext.sources(counting) == b"".join(
        line([text(c[0]), text(c[1]), text(c[2]), text(c[3]), c[4], millis(c[5]),
              text(c[6]), repr(c[7])]) for c in counting)
    at = {b.subject_id: where.get(b.subject_id) for b in beliefs}
    assert copytext.beliefs_and_changes(beliefs, where) == (
        b"".join(line([text(b.subject_id), text(b.context), text(b.attribute), text(b.value),
                       repr(b.confidence), repr(b.score), jsonb(b.alternatives),
                       jsonb(list(b.support)), jsonb(list(b.sources)), str(b.source_count),
                       millis(b.last_observed_at)]) for b in beliefs),
        b"".join(line([text(b.subject_id), text(b.context), text(b.attribute), text(b.value),
                       repr(b.confidence), jsonb(b.alternatives), jsonb(list(b.sources)),
                       *((copytext.NULL, copytext.NULL) if at[b.subject_id] is None
                         else map(str, at[b.subject_id]))]) for b in beliefs))
    for c, evidence, metadata, recorded_at in zip(
            counting, [None, "e\tv", "", "x"] * 2, [None, {}, {"k\n": "v\\"}, {"a": "b"}] * 2,
            [None, 0, 1767225600001, 5] * 2, strict=False):
        assert copytext.observation(c[4], c[0], c[1], c[2], c[6], c[7], c[3], c[5], evidence,
                                    metadata, "top\tic", 3, 12345, recorded_at, "abcd") == \
            copytext.line([c[4], copytext.text(c[0]), "ctx", "attr", copytext.text(c[6]),
                           repr(c[7]), copytext.text(c[3]), copytext.millis(c[5]),
                           copytext.opt(evidence),
                           copytext.NULL if metadata is None else copytext.jsonb(metadata),
                           "top\\tic", "3", "12345", copytext.opt_millis(recorded_at), "abcd"])
