"""The live worker reads the next batch ahead while PostgreSQL applies the current one
(``ProjectorWorker.process_batch``): what it read ahead counts as lag until applied, is
applied exactly once, and what it reads about a subject the batch erases is decoded only
after the erasure commits. Real broker and database."""

from __future__ import annotations

from dataclasses import replace

import sqlalchemy as sa
from kafka import KafkaProducer

from beliefstore.events.model import SubjectErased
from beliefstore.events.producer import BeliefProducer
from beliefstore.events.serde import AvroSerde
from beliefstore.projector.tables import observations, projection_offsets
from beliefstore.projector.worker import ProjectorWorker


def applied_offsets(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.coalesce(
            sa.func.sum(projection_offsets.c.next_offset), 0))).scalar_one())


def test_a_batch_read_ahead_counts_as_lag_until_it_is_applied_once(settings, catalog):
    """Ten events about one subject, batches of four: after the first batch its
    partition's lag is the six not applied, whatever the consumer has polled ahead; the
    run then applies each event once."""
    engine = catalog.engine(catalog.active().schema)
    small = replace(settings, batch_size=4)
    with BeliefProducer.from_settings(small) as producer:
        sent = [producer.observe("reader", "support", f"topic-{i}", "refund", 0.8,
                                 source="triage_agent") for i in range(10)]
    with ProjectorWorker(small, engine) as worker:
        applied = 0
        while not applied:
            applied = worker.process_batch()
        assert applied == 4
        assert applied_offsets(engine) == 4
        assert worker.partition_lags()[sent[0].partition] == 6
        worker.run(until_caught_up=True)
        assert worker.lag() == 0
    with engine.connect() as conn:
        stored = [str(r[0]) for r in conn.execute(sa.select(observations.c.event_id))]
    assert sorted(stored) == sorted(r.event_id for r in sent)
    assert applied_offsets(engine) == 10


def test_what_is_read_ahead_of_an_erasure_is_decoded_after_it_commits(settings, catalog):
    """A sealed observation logged after its subject's erasure, in the next batch: its
    data key is destroyed when the erasure's batch commits, so it is shredded (never
    stored), as when the batches run one after the other. Decoded when read ahead,
    before that commit, it would still open, and be stored, wiped."""
    engine = catalog.engine(catalog.active().schema)
    single = replace(settings, batch_size=1)
    erasure = SubjectErased(event_id="5b0c7d3a-4c1e-4a59-9a43-2a6f5b1e0c12", subject_id="dave",
                            source="privacy_officer", occurred_at=4102444800000)
    raw = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, acks="all")
    raw.send(settings.topic, key=b"dave", value=AvroSerde().encode(erasure)).get(timeout=10)
    raw.close()
    with BeliefProducer.from_settings(single) as producer:
        assert producer.serde.sealer is not None
        late = producer.observe("dave", "support", "address", "42 Elm Street", 0.9,
                                source="triage_agent")
    with ProjectorWorker(single, engine) as worker:
        stats = worker.run(until_caught_up=True)
    assert stats.shredded == 1 and stats.events == 1
    with engine.connect() as conn:
        rows = conn.execute(sa.select(sa.func.count()).select_from(observations).where(
            observations.c.event_id == late.event_id)).scalar_one()
    assert rows == 0
