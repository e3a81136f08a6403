"""Scale-out: projector workers in one consumer group, fenced by partition epochs."""

from __future__ import annotations

import signal
import subprocess
import time
from dataclasses import replace

import pytest
import sqlalchemy as sa

from beliefstore.errors import FencedError
from beliefstore.events.model import ObservationRecorded
from beliefstore.events.producer import BeliefProducer
from beliefstore.events.topics import ensure_topics
from beliefstore.events.workload import generate
from beliefstore.projector.store import LoggedEvent, LogPosition, PartitionProgress, ProjectionRecorder
from beliefstore.projector.tables import observations, projection_offsets
from tests.test_crash import CLI, applied, assert_read_model_equals_fold, projector_env


def obs(n: int) -> LoggedEvent:
    e = ObservationRecorded(event_id=f"00000000-0000-4000-8000-{n:012d}", subject_id="u",
                            source="a", occurred_at=1767225600000 + n, context="c",
                            attribute="x", value=f"v{n}", confidence=0.7)
    return LoggedEvent(e, LogPosition("t", 0, n, None, "00"))


def test_a_worker_that_lost_its_partition_cannot_commit(settings, engine):
    old = ProjectionRecorder(engine, "self_model", settings.fold_settings)
    new = ProjectionRecorder(engine, "self_model", settings.fold_settings)
    first = old.claim("t", [0, 1], owner="old")
    assert first[0].epoch == 1 and first[0].next_offset == 0
    old.apply("t", [obs(1)], {0: PartitionProgress(2)}, {p: c.epoch for p, c in first.items()})
    second = new.claim("t", [0], owner="new")  # a rebalance moved partition 0
    assert second[0].epoch == 2 and second[0].next_offset == 2
    with pytest.raises(FencedError) as info:
        old.apply("t", [obs(2)], {0: PartitionProgress(3)},
                  {p: c.epoch for p, c in first.items()})
    assert info.value.partitions == [0]
    # Partition 1 is still the old worker's.
    old.apply("t", [obs(3)], {1: PartitionProgress(1)}, {1: first[1].epoch})
    with engine.connect() as conn:
        ids = set(conn.execute(sa.select(observations.c.event_id)).scalars())
        rows = list(conn.execute(sa.select(projection_offsets)))
    owners = {r.partition: r.owner for r in rows}
    offsets = {r.partition: r.next_offset for r in rows}
    assert obs(2).event.event_id not in ids  # the fenced batch was rolled back
    assert {obs(1).event.event_id, obs(3).event.event_id} <= ids
    assert owners == {0: "new", 1: "old"} and offsets == {0: 2, 1: 1}


def test_three_workers_one_killed_one_joining_end_equal_to_the_fold(settings, catalog):
    settings = replace(settings, topic=settings.topic + ".wide", partitions=6)
    ensure_topics(settings.kafka_bootstrap_servers, {settings.topic: 6})
    events = generate(20_000, seed=8, subjects=2_000)
    with BeliefProducer.from_settings(settings) as producer:
        for i in range(0, len(events), 1000):
            producer.send_many(events[i:i + 1000])
    engine = catalog.engine(catalog.active().schema)
    env = projector_env(settings, batch_size=100)
    command = [CLI, "projector", "--group", "scaleout-test"]
    workers = [subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE) for _ in range(3)]
    try:
        deadline = time.monotonic() + 90
        while applied(engine) < len(events) // 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert applied(engine) < len(events), "finished before the kill"
        workers[0].send_signal(signal.SIGKILL)
        workers[0].wait(10)
        joiner = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE)
        workers.append(joiner)
        deadline = time.monotonic() + 180
        while applied(engine) < len(events) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert applied(engine) == len(events)

        def owners() -> list[str]:
            with engine.connect() as conn:
                return list(conn.execute(sa.select(projection_offsets.c.owner)).scalars())

        deadline = time.monotonic() + 60  # the group rebalances after the session timeout
        while not any(f":{joiner.pid}:" in o for o in owners()) and time.monotonic() < deadline:
            time.sleep(0.5)
        final = owners()
        assert len(final) == 6
        assert not any(f":{workers[0].pid}:" in o for o in final)
        assert any(f":{joiner.pid}:" in o for o in final)
        assert len(set(final)) == 3, final  # two survivors and the joiner share the six
    finally:
        for w in workers[1:]:
            w.send_signal(signal.SIGTERM)
        codes = [w.wait(30) for w in workers[1:]]
    assert codes == [0, 0, 0], [w.stderr.read().decode()[-1500:] for w in workers[1:]]
    assert_read_model_equals_fold(engine, events, settings.fold_settings)
