"""The testcontainers path: with a reachable Docker engine, the pipeline (SDK → Kafka →
projector → PostgreSQL → API) runs on testcontainers' Kafka and PostgreSQL; without one
this test is skipped with a reason that says so (on the development machine there is no
Docker engine, so it is skipped there)."""

from __future__ import annotations

import uuid

import httpx

from beliefstore.access.keys import KeyStore
from beliefstore.embedded import free_port
from beliefstore.events.producer import BeliefProducer
from beliefstore.events.topics import ensure_topics
from beliefstore.projector.catalog import ProjectionCatalog
from beliefstore.runtime.serve import ApiServer, ProjectorThread, wait_projected
from beliefstore.settings import Settings
from tests import containers


def test_pipeline_on_testcontainers(tmp_path):
    containers.require_docker()
    with containers.kafka() as bootstrap, containers.postgres() as url:
        suffix = uuid.uuid4().hex[:8]
        settings = Settings(kafka_bootstrap_servers=bootstrap, database_url=url,
                            topic=f"tc.{suffix}", dlq_topic=f"tc.{suffix}.dlq",
                            access_topic=f"tc.{suffix}.access", partitions=2,
                            db_schema=f"tc_{suffix}", home=tmp_path / ".beliefstore",
                            poll_timeout_ms=100)
        catalog = ProjectionCatalog.from_settings(settings)
        catalog.ensure()
        ensure_topics(bootstrap, {settings.topic: 2, settings.dlq_topic: 1})
        keys = KeyStore.of_catalog(catalog)
        keys.ensure()
        token = keys.create("triage_agent", "*", "*").token
        projector = ProjectorThread(settings, catalog)
        projector.start()
        api = ApiServer(settings, "127.0.0.1", free_port(), catalog=catalog).start_in_thread()
        try:
            with BeliefProducer.from_settings(settings) as producer:
                receipt = producer.observe("u-tc", "support", "mood", "calm", 0.8, "triage_agent")
            wait_projected(catalog, settings.topic, [receipt], 60)
            body = httpx.get(f"{api.url}/v1/subjects/u-tc/self-model",
                             headers={"Authorization": f"Bearer {token}"}, timeout=10).json()
            assert body["contexts"]["support"][0]["value"] == "calm"
        finally:
            api.stop()
            projector.stop()
            catalog.dispose()
