"""Crash safety: SIGKILL the projector process at random points while it consumes a few
thousand events, restart it, repeat; the read model ends equal to the pure fold of all
events (nothing lost, nothing applied twice). And SIGTERM finishes the batch, exits 0."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from beliefstore.events.producer import BeliefProducer
from beliefstore.events.workload import generate
from beliefstore.projector.fold import fold
from beliefstore.projector.tables import beliefs, observations, projection_offsets

CLI = str(Path(sys.executable).parent / "beliefstore")


def projector_env(settings, batch_size: int) -> dict[str, str]:
    return {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "DATABASE_URL": settings.database_url,
        "BELIEFSTORE_TOPIC": settings.topic,
        "BELIEFSTORE_DLQ_TOPIC": settings.dlq_topic,
        "BELIEFSTORE_DB_SCHEMA": settings.db_schema,
        "BELIEFSTORE_BATCH_SIZE": str(batch_size),
        "BELIEFSTORE_POLL_TIMEOUT_MS": "100",
        "BELIEFSTORE_HOME": str(settings.home),
    }


def applied(engine) -> int:
    """Events applied so far: the sum of the stored next offsets (PostgreSQL's ``sum`` of
    bigints is a numeric, so it comes back as a Decimal; the test's arithmetic wants int)."""
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.coalesce(
            sa.func.sum(projection_offsets.c.next_offset), 0))).scalar_one())


def assert_read_model_equals_fold(engine, events, fold_settings):
    expected = {b.key: b for b in fold(events, fold_settings)}
    with engine.connect() as conn:
        rows = list(conn.execute(sa.select(beliefs)))
        stored = conn.execute(sa.select(sa.func.count()).select_from(observations)).scalar_one()
    assert stored == len({e.event_id for e in events if e.type == "observed"})
    assert len(rows) == len(expected)
    for row in rows:
        b = expected[(row.subject_id, row.context, row.attribute)]
        assert row.value == b.value
        assert row.confidence == pytest.approx(b.confidence, abs=1e-9)
        assert row.support == list(b.support)
        assert row.alternatives == pytest.approx(b.alternatives, abs=1e-9)
        assert row.source_count == b.source_count


def test_sigkill_at_random_points_applies_each_event_once(settings, engine):
    events = generate(3000, seed=11, subjects=150)
    with BeliefProducer.from_settings(settings) as producer:
        for i in range(0, len(events), 500):
            producer.send_many(events[i:i + 500])
    total = len(events)
    env = projector_env(settings, batch_size=25)
    rng = random.Random(5)
    kills_mid_stream = 0
    for _ in range(5):
        before = applied(engine)
        # Kill once a random share of what is left is applied (at most a third of it),
        # plus a random instant within the next batch: mid-stream however fast the
        # projector is (a fixed delay let a faster projector finish first).
        target = before + rng.randint(1, max(1, (total - before) // 3))
        proc = subprocess.Popen([CLI, "projector"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while applied(engine) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.02))
        at_kill = applied(engine)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
        kills_mid_stream += at_kill < total
        if at_kill >= total:
            break
    assert kills_mid_stream >= 3, "the projector finished before it could be killed mid-stream"

    done = subprocess.run([CLI, "projector", "--until-caught-up"], env=env,
                          capture_output=True, timeout=180)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert applied(engine) == total
    assert_read_model_equals_fold(engine, events, settings.fold_settings)


def test_sigterm_finishes_the_batch_and_exits_zero(settings, engine):
    events = generate(1500, seed=3, subjects=80)
    with BeliefProducer.from_settings(settings) as producer:
        producer.send_many(events)
    env = projector_env(settings, batch_size=10)
    proc = subprocess.Popen([CLI, "projector"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while applied(engine) == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, proc.stderr.read().decode()[-2000:]
    partial = applied(engine)
    assert 0 < partial
    done = subprocess.run([CLI, "projector", "--until-caught-up"], env=env,
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert applied(engine) == len(events)
    assert_read_model_equals_fold(engine, events, settings.fold_settings)


@pytest.mark.slow
def test_sigkill_at_over_100_random_points_applies_each_event_once(settings, engine):
    """≥ 100 kill points, fast: tests/crash_harness.py forks one worker per life from a
    pre-imported parent and SIGKILLs it after 0-2 committed batches plus 0-40 ms."""
    events = generate(5000, seed=23, subjects=200)
    with BeliefProducer.from_settings(settings) as producer:
        for i in range(0, len(events), 1000):
            producer.send_many(events[i:i + 1000])
    env = projector_env(settings, batch_size=10)
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-m", "tests.crash_harness", "100", "7"], env=env,
                            cwd=root, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    assert stats["kills"] >= 100, stats  # each one before the worker had caught up
    assert stats["lives"] == stats["kills"] + 1, stats
    assert applied(engine) == len(events)
    assert_read_model_equals_fold(engine, events, settings.fold_settings)
