"""Poison messages go to the dead-letter topic with their reason; the good events
around them are projected and the offsets advance past them."""

from __future__ import annotations

import sqlalchemy as sa
from kafka import KafkaProducer

from beliefstore.events.model import ObservationRecorded
from beliefstore.events.serde import AvroSerde, encode_record
from beliefstore.projector.tables import beliefs, projection_offsets
from beliefstore.projector.worker import DLQ_HEADERS, ProjectorWorker
from tests.conftest import read_topic


def obs(n: int, subject: str = "user-1", **kw) -> ObservationRecorded:
    fields = dict(
        event_id=f"00000000-0000-4000-8000-{n:012d}", subject_id=subject, source="triage_agent",
        occurred_at=1767225600000 + n, context="support", attribute=f"a{n}", value="v",
        confidence=0.8,
    )
    fields.update(kw)
    return ObservationRecorded(**fields)


def test_poison_of_each_kind_goes_to_the_dlq(settings, engine):
    serde = AvroSerde()
    good = serde.encode(obs(1))
    schema = serde.registry.current(ObservationRecorded.schema_name)
    poison = {
        "bad_marker": b'{"type": "observed"}',
        "unknown_schema": good[:2] + b"\x01" * 8 + good[10:],
        "truncated": good[:-4],
        "invalid_event": encode_record({**obs(99).__dict__, "confidence": float("nan")}, schema),
    }
    raw = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, acks="all")
    # Everything for one subject → one partition, so poison sits between good events.
    sequence = [good]
    for n, payload in enumerate(poison.values(), start=2):
        sequence += [payload, serde.encode(obs(n))]
    sent = [raw.send(settings.topic, key=b"user-1", value=v).get(timeout=10) for v in sequence]
    # A valid event whose key is not its subject (would break per-subject ordering).
    sent.append(raw.send(settings.topic, key=b"someone-else", value=serde.encode(obs(50)))
                .get(timeout=10))
    raw.close()

    with ProjectorWorker(settings, engine) as worker:
        stats = worker.run(until_caught_up=True)
    assert stats.events == 5 and stats.poison == 5

    dead = read_topic(settings.kafka_bootstrap_servers, settings.dlq_topic)
    assert len(dead) == 5
    by_kind = {}
    for message in dead:
        headers = {k: v.decode() for k, v in message.headers}
        assert set(DLQ_HEADERS) <= set(headers)
        assert headers["beliefstore.original.topic"] == settings.topic
        by_kind.setdefault(headers["beliefstore.error.kind"], []).append((headers, message))
    assert sorted(by_kind) == ["bad_marker", "invalid_event", "truncated", "unknown_schema"]
    for kind, payload in poison.items():
        headers, message = next(
            (h, m) for h, m in by_kind[kind] if m.value == payload
        )
        original = next(md for md, v in zip(sent, sequence, strict=False) if v == payload)
        assert int(headers["beliefstore.original.offset"]) == original.offset
        assert int(headers["beliefstore.original.partition"]) == original.partition
        assert headers["beliefstore.error.reason"]
    mismatched = [h for h, _ in by_kind["invalid_event"] if "key" in h["beliefstore.error.reason"]]
    assert len(mismatched) == 1

    with engine.connect() as conn:
        attributes = sorted(conn.execute(sa.select(beliefs.c.attribute)).scalars())
        offsets = {r.partition: r.next_offset for r in conn.execute(sa.select(projection_offsets))}
    assert attributes == ["a1", "a2", "a3", "a4", "a5"]
    for md in sent:
        assert offsets[md.partition] > md.offset


def test_restart_after_poison_does_not_reprocess(settings, engine):
    raw = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, acks="all")
    raw.send(settings.topic, key=b"u", value=b"garbage").get(timeout=10)
    raw.close()
    with ProjectorWorker(settings, engine) as worker:
        assert worker.run(until_caught_up=True).poison == 1
    with ProjectorWorker(settings, engine) as worker:
        assert worker.run(until_caught_up=True).poison == 0
    assert len(read_topic(settings.kafka_bootstrap_servers, settings.dlq_topic)) == 1


def _project_one_and_store_offset(settings, engine, producer, beyond: int):  # noqa: ANN202
    """Produce and project one observation, then store its partition's next offset as
    ``beyond`` past the observation's (as a broker that lost its log, or answered with a
    stale high watermark, would leave it); return the observation's receipt."""
    receipt = producer.observe("user-1", "support", "issue", "refund", 0.9, source="a")
    with ProjectorWorker(settings, engine) as worker:
        worker.run(until_caught_up=True)
    with engine.begin() as conn:
        conn.execute(sa.update(projection_offsets)
                     .where(projection_offsets.c.partition == receipt.partition)
                     .values(next_offset=receipt.offset + beyond))
    return receipt


def test_offsets_beyond_the_log_end_refuse_to_start(settings, engine, producer):
    """A log reset (topic recreated, broker lost its log) is named, not skipped."""
    import pytest

    from beliefstore.errors import LogResetError

    _project_one_and_store_offset(settings, engine, producer, beyond=1000)
    with ProjectorWorker(settings, engine) as worker, pytest.raises(LogResetError) as info:
        worker.run(until_caught_up=True)
    assert "beyond" in str(info.value) and settings.topic in str(info.value)


def test_a_log_end_below_the_stored_offset_for_a_moment_is_not_a_reset(settings, engine,
                                                                       producer):
    """Tansu 0.6.0 on S3 storage can answer one fetch with a high watermark below one it
    already served. Here the stored offset lies 2 beyond the log end, and the log grows
    past it 0.5 s later (well within LOG_END_CONFIRM_S): the worker waits for it and folds
    what follows instead of refusing; the test above shows a lasting gap still refuses."""
    import threading
    import time

    from beliefstore.projector.worker import LOG_END_CONFIRM_S

    first = _project_one_and_store_offset(settings, engine, producer, beyond=3)

    def grow() -> None:
        import uuid

        time.sleep(0.5)
        # offsets first+1 .. first+4 in one record batch; the worker starts at first+3
        # (one send each could leave the log end at first+3 for a moment: caught up, 0)
        producer.send_many([ObservationRecorded(
            event_id=str(uuid.uuid4()), subject_id="user-1", source="a",
            occurred_at=int(time.time() * 1000), context="support", attribute=f"later{n}",
            value="v", confidence=0.9) for n in range(4)])

    grower = threading.Thread(target=grow)
    started = time.monotonic()
    grower.start()
    try:
        with ProjectorWorker(settings, engine) as worker:
            stats = worker.run(until_caught_up=True)
    finally:
        grower.join()
    assert stats.events == 2
    assert time.monotonic() - started < LOG_END_CONFIRM_S + 5
    with engine.connect() as conn:
        stored = conn.execute(sa.select(projection_offsets.c.next_offset).where(
            projection_offsets.c.partition == first.partition)).scalar_one()
    assert stored == first.offset + 5
