"""The projector's bulk paths on the real services: the COPY batch apply and the bulk
rebuild of a fresh projection give the pure fold's result, equal each other row by row,
and keep exactly-once when a transaction fails half-way."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from beliefstore.errors import FencedError
from beliefstore.events.model import (
    Event,
    ObservationRecorded,
    ObservationRetracted,
    SubjectErased,
)
from beliefstore.events.producer import BeliefProducer
from beliefstore.events.serde import AvroSerde
from beliefstore.events.workload import generate
from beliefstore.projector import bulk
from beliefstore.projector.fold import FoldSettings, fold
from beliefstore.projector.replay import BeliefRow, compare, read_beliefs, replay
from beliefstore.projector.store import (
    LoggedEvent,
    LogPosition,
    PartitionProgress,
    ProjectionRecorder,
)
from beliefstore.projector.tables import (
    belief_changes,
    belief_sources,
    erasures,
    observations,
    projection_offsets,
    retractions,
)
from beliefstore.projector.worker import ProjectorWorker
from tests.conftest import case_events, load_cases

TOPIC = "bulk.test"
TABLES = ("observations", "retractions", "erasures", "belief_sources", "beliefs",
          "belief_changes", "projection_offsets")


def logged(events: list[Event], partitions: int = 3) -> list[LoggedEvent]:
    """Events with made-up log positions: a subject's events in one partition, in order."""
    offsets = [0] * partitions
    out = []
    for e in events:
        p = sum(e.subject_id.encode()) % partitions
        out.append(LoggedEvent(e, LogPosition(TOPIC, p, offsets[p],
                                              1_700_000_000_000 + offsets[p], "00" * 8)))
        offsets[p] += 1
    return out


def progress_of(items: list[LoggedEvent]) -> dict[int, PartitionProgress]:
    out: dict[int, PartitionProgress] = {}
    for item in items:
        out[item.position.partition] = PartitionProgress(item.position.offset + 1)
    return out


def truncate(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text(f"TRUNCATE {', '.join(TABLES)}"))


def apply_in_batches(recorder: ProjectionRecorder, items: list[LoggedEvent],
                     rng: random.Random, largest: int) -> None:
    i = 0
    while i < len(items):
        n = rng.randint(1, largest)
        batch = items[i:i + n]
        recorder.apply(TOPIC, batch, progress_of(batch))
        i += n


def rows_of(engine: sa.Engine) -> dict[str, list[tuple]]:
    """The rows both paths must agree on, table by table, sorted."""
    o, r, e, bs = observations, retractions, erasures, belief_sources
    with engine.connect() as conn:
        return {
            "observations": sorted(tuple(x) for x in conn.execute(sa.select(
                o.c.event_id, o.c.subject_id, o.c.context, o.c.attribute, o.c.value,
                o.c.confidence, o.c.source, o.c.occurred_at, o.c.evidence, o.c.metadata,
                o.c.retracted_by.is_(None), o.c.erased_by.is_(None), o.c.kafka_partition,
                o.c.kafka_offset, o.c.recorded_at))),
            "retractions": sorted(tuple(x) for x in conn.execute(sa.select(
                r.c.event_id, r.c.retracted_event_id, r.c.source, r.c.kafka_offset))),
            "erasures": sorted(tuple(x) for x in conn.execute(sa.select(
                e.c.event_id, e.c.subject_id, e.c.occurred_at, e.c.kafka_offset))),
            "belief_sources": sorted(tuple(x) for x in conn.execute(sa.select(bs))),
            "offsets": sorted(tuple(x) for x in conn.execute(sa.select(
                projection_offsets.c.partition, projection_offsets.c.next_offset))),
        }


def expected_of(events: list[Event], fold_settings: FoldSettings) -> dict:
    return {b.key: BeliefRow.of(b) for b in fold(events, fold_settings)}


@pytest.fixture
def two(catalog):
    """Two empty projections of this test: (incremental, bulk) engines."""
    a, b = catalog.create("incremental"), catalog.create("bulk")
    return catalog.engine(a.schema), catalog.engine(b.schema)


@pytest.mark.parametrize("case", load_cases(), ids=lambda c: c["name"])
def test_merge_vectors_through_the_copy_apply_and_the_bulk_rebuild(case, two):
    fold_settings = FoldSettings(half_lives=case["settings"].get("half_lives", {}),
                                 trust=case["settings"].get("trust", {}))
    items = logged(case_events(case))
    incremental, fresh = (ProjectionRecorder(e, "p", fold_settings) for e in two)
    apply_in_batches(incremental, items, random.Random(case["name"]), largest=3)
    with fresh.fresh_load(TOPIC) as load:
        load.add(items)
        load.finish(progress_of(items))
    want = {(b["subject_id"], b["context"], b["attribute"]): b for b in case["expected"]}
    for engine in two:
        got = read_beliefs(engine)
        assert set(got) == set(want), case["name"]
        for key, b in want.items():
            assert got[key].value == b["value"], (case["name"], key)
            assert got[key].confidence == pytest.approx(b["confidence"], abs=1e-4)
            assert got[key].alternatives == pytest.approx(b.get("alternatives", {}), abs=1e-4)
            if "support" in b:
                assert list(got[key].support) == sorted(b["support"])
    assert rows_of(two[0]) == rows_of(two[1])


@given(seed=st.integers(0, 10_000), count=st.integers(1, 400), subjects=st.integers(1, 30),
       profile=st.sampled_from(["hot-key", "realistic"]), largest=st.integers(1, 120))
@hsettings(max_examples=15, deadline=None,
           suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_bulk_paths_yield_the_pure_fold(two, seed, count, subjects, profile, largest):
    """Any workload (retractions, erasures, redeliveries), cut into random batches for the
    COPY apply and loaded at once by the bulk rebuild: both equal the pure fold, and
    their tables equal each other row by row."""
    events = generate(count, seed=seed, subjects=subjects, profile=profile)
    items = logged(events)
    for engine in two:
        truncate(engine)
    incremental, fresh = (ProjectionRecorder(e, "p", FoldSettings()) for e in two)
    apply_in_batches(incremental, items, random.Random(seed), largest)
    with fresh.fresh_load(TOPIC) as load:
        for i in range(0, len(items), 97):  # added in pieces, as the worker reads them
            load.add(items[i:i + 97])
        load.finish(progress_of(items))
    expected = expected_of(events, FoldSettings())
    assert compare(read_beliefs(two[0]), expected) == []
    assert compare(read_beliefs(two[1]), expected) == []
    assert rows_of(two[0]) == rows_of(two[1])


def changes_of(engine: sa.Engine) -> list[tuple]:
    """``belief_changes`` in id order (what a watch streams), without the commit time."""
    c = belief_changes
    with engine.connect() as conn:
        return [tuple(x) for x in conn.execute(sa.select(
            c.c.id, c.c.subject_id, c.c.context, c.c.attribute, c.c.value, c.c.confidence,
            c.c.alternatives, c.c.sources, c.c.kafka_partition, c.c.kafka_offset,
        ).order_by(c.c.id))]


@given(seed=st.integers(0, 10_000), count=st.integers(1, 300), subjects=st.integers(1, 30),
       profile=st.sampled_from(["hot-key", "realistic"]), largest=st.integers(1, 60))
@hsettings(max_examples=10, deadline=None,
           suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_the_direct_path_of_small_batches_equals_the_copy_path(two, seed, count, subjects,
                                                               profile, largest):
    """The same batches applied on the direct path (pipelined INSERTs into the staging
    tables) and on the COPY path give the pure fold, the same tables row by row, and the
    same belief_changes in the same order (what watchers see)."""
    events = generate(count, seed=seed, subjects=subjects, profile=profile)
    items = logged(events)
    direct, copy = (ProjectionRecorder(e, "p", FoldSettings()) for e in two)
    direct.small_batch = 10**9  # every batch on the direct path
    copy.small_batch = 0  # every batch with an observation through COPY
    for engine in two:
        truncate(engine)
        with engine.begin() as conn:
            conn.execute(sa.text("ALTER SEQUENCE belief_changes_id_seq RESTART"))
    for recorder in (direct, copy):
        apply_in_batches(recorder, items, random.Random(seed), largest)
    expected = expected_of(events, FoldSettings())
    assert compare(read_beliefs(two[0]), expected) == []
    assert compare(read_beliefs(two[1]), expected) == []
    assert rows_of(two[0]) == rows_of(two[1])
    assert changes_of(two[0]) == changes_of(two[1])


@pytest.mark.parametrize("profile", ["hot-key", "realistic"])
def test_bulk_replay_equals_the_incremental_projection(settings, catalog, engine, profile):
    """The real pipeline: the live projector folds the log batch by batch; `replay`
    rebuilds it in bulk; the two read models agree row by row and with the pure fold."""
    events = generate(3000, seed=31, subjects=150, profile=profile)
    with BeliefProducer.from_settings(settings) as producer:
        for i in range(0, len(events), 500):
            producer.send_many(events[i:i + 500])
    live = catalog.active()
    small = replace(settings, batch_size=40, db_schema=live.schema, projection=live.name)
    with ProjectorWorker(small, engine, serde=AvroSerde.for_settings(settings)) as worker:
        stats = worker.run(until_caught_up=True)
    assert stats.events == len(events)
    report = replay(settings, catalog, "rebuilt", check_fold=True)
    assert report.stats.batches == 1  # the bulk path: one transaction
    assert report.stats.events == len(events)
    assert report.vs_live == []
    assert report.vs_fold == []
    rebuilt = catalog.engine(report.projection.schema)
    assert rows_of(rebuilt) == rows_of(engine)
    with rebuilt.connect() as conn:
        changes = conn.execute(sa.select(sa.func.count()).select_from(belief_changes)).scalar()
    assert changes == len(read_beliefs(rebuilt))  # one change row per rebuilt belief


def test_a_bulk_rebuild_needs_an_empty_projection_and_rolls_back_whole(two):
    events = generate(300, seed=4, subjects=20)
    items = logged(events)
    recorder = ProjectionRecorder(two[1], "p", FoldSettings())
    with pytest.raises(RuntimeError, match="boom"), recorder.fresh_load(TOPIC) as load:
        load.add(items[:200])
        raise RuntimeError("boom")  # a crash half-way: nothing of it is kept
    assert all(rows == [] for rows in rows_of(two[1]).values())
    with recorder.fresh_load(TOPIC) as load:
        load.add(items)
        load.finish(progress_of(items))
    assert compare(read_beliefs(two[1]), expected_of(events, FoldSettings())) == []
    with pytest.raises(ValueError, match="not empty"), recorder.fresh_load(TOPIC):
        pass


def test_a_fenced_copy_batch_leaves_nothing_and_its_successor_applies_it_once(two):
    """A batch whose COPY and statements ran but whose commit is refused (the partition
    was claimed by another worker) leaves no row behind, in the tables or the staging
    tables; the new owner applies the same events exactly once."""
    events = generate(400, seed=9, subjects=25)
    items = logged(events, partitions=1)
    old = ProjectionRecorder(two[0], "p", FoldSettings())
    first = old.claim(TOPIC, [0], "old")[0]
    old.apply(TOPIC, items[:150], progress_of(items[:150]), {0: first.epoch})
    new = ProjectionRecorder(two[0], "p", FoldSettings())
    second = new.claim(TOPIC, [0], "new")[0]
    assert second.next_offset == 150
    with pytest.raises(FencedError):
        old.apply(TOPIC, items[150:], progress_of(items[150:]), {0: first.epoch})
    assert rows_of(two[0])["offsets"] == [(0, 150)]
    new.apply(TOPIC, items[150:], progress_of(items[150:]), {0: second.epoch})
    new.apply(TOPIC, items[150:], progress_of(items[150:]), {0: second.epoch})  # redelivered
    with two[0].connect() as conn:
        stored = conn.execute(sa.select(sa.func.count()).select_from(observations)).scalar()
    assert stored == len({e.event_id for e in events if e.type == "observed"})
    assert compare(read_beliefs(two[0]), expected_of(events, FoldSettings())) == []


def test_a_fenced_small_batch_on_the_direct_path_leaves_nothing(two):
    """The direct path checks the fence after its one pipeline has run the batch's
    statements: a refused batch must still leave no row behind, and the owner applies
    it once."""
    events = generate(60, seed=4, subjects=5)
    items = logged(events, partitions=1)
    old = ProjectionRecorder(two[0], "p", FoldSettings())
    first = old.claim(TOPIC, [0], "old")[0]
    old.apply(TOPIC, items[:40], progress_of(items[:40]), {0: first.epoch})
    before = rows_of(two[0]), changes_of(two[0])
    new = ProjectionRecorder(two[0], "p", FoldSettings())
    second = new.claim(TOPIC, [0], "new")[0]
    small = items[40:50]
    assert len(small) <= old.small_batch
    with pytest.raises(FencedError):
        old.apply(TOPIC, small, progress_of(small), {0: first.epoch})
    assert (rows_of(two[0]), changes_of(two[0])) == before
    for i in range(40, len(items), 10):
        new.apply(TOPIC, items[i:i + 10], progress_of(items[i:i + 10]), {0: second.epoch})
    assert compare(read_beliefs(two[0]), expected_of(events, FoldSettings())) == []


def test_a_batch_notifies_its_subjects_or_null_when_they_do_not_fit(two, database_url):
    """The NOTIFY sent with a batch's belief_changes (one statement on both paths) names
    the schema and the subjects; when they would not fit in a NOTIFY payload it says
    null (every subject may have changed)."""
    import psycopg

    from beliefstore.db import psycopg_conninfo
    from beliefstore.events.model import ObservationRecorded
    from beliefstore.projector.changes import CHANNEL, parse_payload

    def observation(subject: str, n: int) -> Event:
        return ObservationRecorded(event_id=f"00000000-0000-4000-8000-{n:012d}",
                                   subject_id=subject, source="triage_agent",
                                   occurred_at=1_700_000_000_000, context="support",
                                   attribute="issue", value="refund", confidence=0.8)

    recorder = ProjectionRecorder(two[0], "p", FoldSettings())
    truncate(two[0])
    with psycopg.connect(psycopg_conninfo(database_url), autocommit=True) as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        few = logged([observation(f"user-{i}", i) for i in range(3)])
        recorder.apply(TOPIC, few, progress_of(few))
        many = logged([observation(f"subject-with-a-long-name-{i:05d}", 100 + i)
                       for i in range(400)])  # ~13 KB of names: over the limit
        recorder.apply(TOPIC, many, progress_of(many))
        heard = [parse_payload(n.payload) for n in listener.notifies(timeout=5, stop_after=2)]
    with two[0].connect() as conn:
        schema = conn.execute(sa.text("SELECT current_schema()")).scalar()
        top = conn.execute(sa.select(sa.func.max(belief_changes.c.id))).scalar()
    assert heard[0][0] == schema and heard[0][2] == frozenset({"user-0", "user-1", "user-2"})
    assert heard[1] == (schema, top, None)


def test_observations_keep_one_key_index_that_a_stale_refresh_walks_newest_first(two):
    """Migration 0007: besides its primary key, ``observations`` has one index by key and
    source, newest first, and a pair whose newest observations were retracted refreshes
    its ``belief_sources`` row to the newest one that still counts (the walk skips the
    retracted ones)."""
    engine, _ = two
    with engine.connect() as conn:
        names = {r[0]: r[1] for r in conn.execute(sa.text(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'observations' "
            "AND schemaname = current_schema()"))}
    assert set(names) == {"observations_pkey", "observations_key_source"}
    assert "(subject_id, context, attribute, source, occurred_at DESC, event_id DESC)" \
        in names["observations_key_source"]
    assert " WHERE " not in names["observations_key_source"]
    def seen(n: int) -> ObservationRecorded:
        return ObservationRecorded(
            event_id=f"00000000-0000-4000-8000-{n:012d}", subject_id="s-1", context="work",
            attribute="role", value=f"v{n}", confidence=0.8, source="agent-a",
            occurred_at=1_700_000_000_000 + n)

    observed = [seen(n) for n in range(1, 5)]
    withdrawn = [ObservationRetracted(
        event_id=f"00000000-0000-4000-9000-{n:012d}", subject_id="s-1", source="agent-a",
        occurred_at=1_700_000_000_100 + n, retracted_event_id=observed[n].event_id)
        for n in (3, 2)]
    recorder = ProjectionRecorder(engine, "bench", FoldSettings())
    items = logged([*observed, *withdrawn])
    recorder.apply(TOPIC, items[:4], progress_of(items[:4]))
    recorder.apply(TOPIC, items[4:], progress_of(items))
    with engine.connect() as conn:
        rows = conn.execute(sa.select(belief_sources.c.event_id, belief_sources.c.value)).all()
    assert [(str(r.event_id), r.value) for r in rows] == [(observed[1].event_id, "v2")]


@pytest.mark.parametrize("mark", ["MARK_RETRACTED", "MARK_ERASED"])
def test_a_batch_marks_by_index_probes_whatever_the_statistics_say(two, mark):
    """In a batch's transaction (``bulk.INDEX_PROBES_ONLY``) the generic plan of a mark,
    the one PostgreSQL keeps for a prepared statement, probes the read model's indexes,
    made on a small, freshly analyzed read model where a sequential scan is cheapest:
    such a plan would otherwise be kept as the tables grow (measured: all of
    ``observations`` scanned for every erasure)."""
    engine, _ = two
    observed = [ObservationRecorded(
        event_id=f"00000000-0000-4000-8000-{n:012d}", subject_id=f"s-{n}", context="work",
        attribute="role", value="engineer", confidence=0.8, source="agent-a",
        occurred_at=1_700_000_000_000 + n) for n in range(20)]
    marks: list[Event] = [ObservationRetracted(
        event_id="00000000-0000-4000-9000-000000000001", subject_id="s-1", source="agent-a",
        occurred_at=1_700_000_000_100, retracted_event_id=observed[1].event_id),
        SubjectErased(event_id="00000000-0000-4000-9000-000000000002", subject_id="s-2",
                      source="agent-a", occurred_at=1_700_000_000_100)]
    items = logged([*observed, *marks])
    ProjectionRecorder(engine, "plans", FoldSettings()).apply(TOPIC, items, progress_of(items))
    statement = getattr(bulk, mark).replace("%s", "$1")
    with engine.connect() as conn:
        raw = conn.connection.driver_connection
        assert raw is not None
        bulk.ensure_staging(raw)
        raw.execute("ANALYZE observations, retractions, erasures")
        raw.commit()
        with raw.transaction():
            raw.execute(bulk.INDEX_PROBES_ONLY)
            raw.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            raw.execute(f"PREPARE mark(uuid[]) AS {statement}")
            plan = "\n".join(r[0] for r in raw.execute(
                "EXPLAIN EXECUTE mark('{00000000-0000-4000-9000-000000000001}')"))
            raw.execute("DEALLOCATE mark")
    assert "Seq Scan" not in plan, plan
    assert "Index" in plan, plan


def test_the_embedded_server_sizes_its_buffer_pool_for_the_read_model(database_url):
    """``shared_buffers`` of the embedded PostgreSQL is a quarter of the memory between
    128 MiB and 1 GiB, and the session's server runs with it and ``max_wal_size`` 4 GB."""
    from beliefstore.embedded.postgres import shared_buffers_mib

    assert shared_buffers_mib(256 * 2**20) == 128
    assert shared_buffers_mib(2 * 2**30) == 512
    assert shared_buffers_mib(64 * 2**30) == 1024
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            buffers = conn.execute(sa.text(
                "SELECT setting::bigint * 8 / 1024 FROM pg_settings "
                "WHERE name = 'shared_buffers'")).scalar_one()
            wal = conn.execute(sa.text("SHOW max_wal_size")).scalar_one()
    finally:
        engine.dispose()
    assert buffers == shared_buffers_mib()
    assert wal == "4GB"
