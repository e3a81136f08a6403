"""Embedded default services: a Kafka-protocol broker and a PostgreSQL server.

The CLI and the test suite start these when ``KAFKA_BOOTSTRAP_SERVERS`` /
``DATABASE_URL`` are not set, so beliefstore runs on a laptop with nothing but its
Python dependencies installed.

* :mod:`~beliefstore.embedded.kafka` — :class:`EmbeddedKafka`, the Tansu broker
  (memory, or durable on localbucket);
* :mod:`~beliefstore.embedded.postgres` — :class:`EmbeddedPostgres`;
* :mod:`~beliefstore.embedded.base` — what both share: process spawning, the data
  directory lock, port retries, readiness and :class:`ServiceStartError`.
"""

from beliefstore.embedded.base import EmbeddedService, ServiceStartError, free_port
from beliefstore.embedded.kafka import EmbeddedKafka
from beliefstore.embedded.postgres import EmbeddedPostgres

__all__ = ["EmbeddedKafka", "EmbeddedPostgres", "EmbeddedService", "ServiceStartError", "free_port"]
