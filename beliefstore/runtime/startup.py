"""Bringing up what a command needs: embedded services where none is configured,
migrations and topics.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import replace
from typing import TYPE_CHECKING

from beliefstore.events.topics import ensure_topics
from beliefstore.projector.catalog import ProjectionCatalog
from beliefstore.settings import Settings

if TYPE_CHECKING:
    from beliefstore.embedded import EmbeddedService

log = logging.getLogger("beliefstore")


def start_missing_services(
    settings: Settings, stack: contextlib.ExitStack, *, durable: bool = True, fast: bool = False,
    started: list[EmbeddedService] | None = None,
) -> Settings:
    """Start the embedded broker and/or PostgreSQL for whatever ``settings`` leaves unset.

    Their data lives under ``settings.home`` (``kafka/`` and ``postgres/``) when
    ``durable``, so the event log and the read model survive a restart; otherwise the
    broker keeps its log in memory. Each started service is stopped when ``stack``
    closes. Each started service is also appended to ``started`` (for a
    :class:`~beliefstore.runtime.supervisor.Supervisor`). On the durable embedded
    broker, topics are created with one partition unless BELIEFSTORE_PARTITIONS is set,
    and the projector's fetch may wait 100 ms (see bench/README.md, ingest_http).

    Returns:
        ``settings`` with ``kafka_bootstrap_servers`` and ``database_url`` filled in.

    Raises:
        beliefstore.embedded.ServiceStartError: a service did not come up (the message
            names its log file).
    """
    from beliefstore.embedded import EmbeddedKafka, EmbeddedPostgres

    if not settings.kafka_bootstrap_servers:
        kafka = EmbeddedKafka(settings.home / "kafka" if durable else None)
        stack.enter_context(kafka)
        if started is not None:
            started.append(kafka)
        log.info("started the embedded Kafka broker (Tansu) at %s", kafka.bootstrap_servers)
        settings = replace(settings, kafka_bootstrap_servers=kafka.bootstrap_servers)
        if durable and "BELIEFSTORE_PARTITIONS" not in os.environ:
            # One partition on this storage: a group of concurrent produce calls becomes
            # one record batch (one S3 object) instead of one per partition, and a fetch
            # lists one partition. Measured with bench/ingest_http.py (20 agents, 60 s):
            # 125 vs 79 accepted req/s, freshness p99 1.4 vs 4.3 s. Topics that already
            # exist keep their partitions.
            settings = replace(settings, partitions=1)
        if durable and settings.fetch_max_wait_ms is None:
            # Tansu's s3:// fetch lists the partition's objects before it answers, and
            # answers nothing if that takes longer than the fetch's max wait. Over
            # localbucket's own listing (a walk of the bucket) 100 ms was too short for a
            # log of ~1,000+ batches, so this was 500 ms; the S3 store's listing index
            # answers in well under a millisecond, and 100 ms halves the lone event's
            # wait: bench/ingest_http.py (20 agents, 60 s, quiet machine) freshness p50
            # 0.20 s / p99 0.47 s with 100 ms vs 0.40 s / 1.10 s with 500 ms.
            settings = replace(settings, fetch_max_wait_ms=100)
    if not settings.database_url:
        home = settings.home if durable else settings.home / "tmp"
        pg = EmbeddedPostgres(home / "postgres", fast=fast)
        stack.enter_context(pg)
        if started is not None:
            started.append(pg)
        log.info("started the embedded PostgreSQL at 127.0.0.1:%d (data %s)", pg.port, pg.data_dir)
        settings = replace(settings, database_url=pg.url)
    return settings


def prepare(settings: Settings) -> ProjectionCatalog:
    """Apply migrations, register the default projection and create the topics (events,
    dead letters, access log); return the projection catalog.

    Raises:
        kafka.errors.KafkaError, sqlalchemy.exc.SQLAlchemyError: a service is unreachable.
    """
    assert settings.database_url and settings.kafka_bootstrap_servers
    catalog = ProjectionCatalog.from_settings(settings)
    catalog.ensure()
    ensure_topics(
        settings.kafka_bootstrap_servers,
        # the access log's topic too, so the API processes find it with these partitions
        {settings.topic: settings.partitions, settings.dlq_topic: settings.partitions,
         settings.access_topic: settings.partitions},
        replication_factor=settings.replication_factor,
        client_config=settings.kafka_client_config(),
    )
    return catalog
