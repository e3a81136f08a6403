"""Faults on the real embedded services while events flow: the broker is SIGKILLed and
restarted mid-stream, then PostgreSQL is SIGKILLed and restarted mid-batch, while a
producer keeps producing (retrying what was not acknowledged, as a client does) and the
projector thread keeps projecting (reconnecting by itself). The final read model equals
the pure fold of every acknowledged event: nothing lost, nothing applied twice.

The broker (durable, on its own data directory) and PostgreSQL are this test's own, not
the session's.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import replace

import psutil
import pytest
import sqlalchemy as sa

from beliefstore.embedded import EmbeddedKafka, EmbeddedPostgres, free_port
from beliefstore.errors import ProduceError
from beliefstore.events.producer import BeliefProducer, Receipt
from beliefstore.events.topics import ensure_topics
from beliefstore.events.workload import generate
from beliefstore.projector.catalog import ProjectionCatalog
from beliefstore.projector.replay import read_log
from beliefstore.projector.tables import projection_offsets
from beliefstore.projector.worker import ProjectorWorker
from beliefstore.runtime.serve import ProjectorThread, wait_projected
from tests.conftest import kafka_client_threads
from tests.test_crash import assert_read_model_equals_fold


def broker_process(kafka: EmbeddedKafka) -> psutil.Process:
    """The Tansu process listening on ``kafka``'s port."""
    for proc in psutil.Process().children(recursive=True):
        if "tansu" in proc.name() and f":{kafka.port}" in " ".join(proc.cmdline()):
            return proc
    raise AssertionError(f"no broker process on port {kafka.port}")


class Producing(threading.Thread):
    """Produces ``events`` in small batches; a batch that is not acknowledged is sent again
    (same event ids) until it is. ``acknowledged`` holds the events the broker acked."""

    def __init__(self, producer: BeliefProducer, events, batch: int = 20):
        super().__init__(daemon=True)
        self.producer, self.events, self.batch = producer, events, batch
        self.acknowledged: list = []
        self.receipts: list[Receipt] = []
        self.failures = 0
        self.last_failure: ProduceError | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for i in range(0, len(self.events), self.batch):
                chunk = self.events[i:i + self.batch]
                deadline = time.monotonic() + 120
                while True:
                    try:
                        self.receipts += self.producer.send_many(chunk)
                        self.acknowledged += chunk
                        break
                    except ProduceError as exc:
                        self.failures += 1
                        self.last_failure = exc
                        assert time.monotonic() < deadline, f"never acknowledged again: {exc}"
                        time.sleep(0.3)
                time.sleep(0.01)
        except BaseException as exc:
            self.error = exc


def applied(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.coalesce(
            sa.func.sum(projection_offsets.c.next_offset), 0))).scalar_one()


def wait_for(check, timeout: float, what) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not {what() if callable(what) else what} within " \
            f"{timeout} s"
        time.sleep(0.05)


@pytest.mark.timeout(300)
def test_broker_and_postgres_killed_and_restarted_mid_stream(settings, tmp_path):
    kafka = EmbeddedKafka(tmp_path / "kafka").start()
    # durable (fsync, synchronous commit), as `up` runs it: a commit survives the SIGKILL
    pg = EmbeddedPostgres(tmp_path / "pg").start()
    kafka.pin_port()
    pg.pin_port()
    catalog = projector = None
    try:
        local = replace(settings, kafka_bootstrap_servers=kafka.bootstrap_servers,
                        database_url=pg.url, produce_timeout_s=3.0, batch_size=25)
        ensure_topics(kafka.bootstrap_servers, {local.topic: 3, local.dlq_topic: 1})
        catalog = ProjectionCatalog.from_settings(local)
        catalog.ensure()
        engine = catalog.engine(catalog.active().schema)
        projector = ProjectorThread(local, retry_s=0.2, max_retry_s=1.0)
        projector.start()
        events = generate(2000, seed=17, subjects=120)
        with BeliefProducer.from_settings(local) as producer:
            producing = Producing(producer, events)
            producing.start()

            # the broker dies mid-stream
            wait_for(lambda: len(producing.acknowledged) >= 400, 60, "400 acknowledged")
            broker = broker_process(kafka)
            broker.send_signal(signal.SIGKILL)
            broker.wait(10)
            acked_at_kill = len(producing.acknowledged)
            time.sleep(1.5)
            assert kafka.running is False
            kafka.start()  # same port, same log
            wait_for(lambda: len(producing.acknowledged) > acked_at_kill + 200, 90,
                     lambda: f"producing again after the broker restart ({producing.failures} "
                     f"failed sends, the last: {producing.last_failure})")

            # PostgreSQL dies while the projector applies batches of 25
            before = applied(engine)
            wait_for(lambda: applied(engine) > before, 60, "projecting")
            assert pg.pid is not None
            os.kill(pg.pid, signal.SIGKILL)
            time.sleep(1.0)
            assert pg.running is False
            pg.start()

            producing.join(240)
            assert not producing.is_alive() and producing.error is None, (
                producing.error, len(producing.acknowledged), producing.failures,
                producing.last_failure)
        assert producing.failures > 0, "the broker outage was not felt by the producer"
        assert len(producing.acknowledged) == len(events)
        wait_projected(catalog, local.topic, producing.receipts, timeout_s=120)
        assert projector.reconnects > 0, "the PostgreSQL outage was not felt by the projector"
        assert projector.error is None, projector.error
        # The reference is the fold of the log as the broker kept it: a chunk that failed
        # after part of it was written is sent again whole, so the log may hold an event
        # before the others of its chunk; the fold dedupes by event id in log order, and
        # the acknowledgement order can differ from it.
        logged, poison = read_log(local)
        acked = {e.event_id for e in producing.acknowledged}
        assert poison == 0 and {e.event_id for e in logged} <= acked
        lost = acked - {e.event_id for e in logged}
        erased = {e.subject_id for e in producing.acknowledged if e.type == "erased"}
        assert all(e.subject_id in erased and e.type == "observed"
                   for e in producing.acknowledged if e.event_id in lost), (
            lost, [r for r in producing.receipts if r.event_id in lost])  # shredded only;
        # the receipts say whether the broker acknowledged the lost ones as duplicates
        # (offset -1: Tansu 0.6.0 records a producer's sequence before it writes the batch)
        assert_read_model_equals_fold(engine, logged, local.fold_settings)
    finally:
        if projector is not None:
            projector.stop()
        if catalog is not None:
            catalog.dispose()
        pg.stop()
        kafka.stop()


def test_a_worker_that_cannot_claim_closes_its_kafka_clients(settings, engine):
    """PostgreSQL unreachable at the start: the claim fails after the consumer and the
    dead-letter producer are made; both are closed before the error propagates (each
    retry of the projector thread would otherwise leak two network threads)."""
    before = kafka_client_threads()
    unreachable = sa.create_engine(
        f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/postgres",
        connect_args={"connect_timeout": 2})
    worker = ProjectorWorker(settings, unreachable)
    try:
        with pytest.raises(sa.exc.OperationalError):
            worker.start()
        assert kafka_client_threads() - before == set()
        assert worker._consumer is None and worker._dlq is None
    finally:
        unreachable.dispose()
