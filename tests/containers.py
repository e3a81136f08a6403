"""The testcontainers backend of the test fixtures (the project design's alternative to
the embedded services): Kafka (KRaft) and PostgreSQL in Docker containers, used when
``BELIEFSTORE_TEST_BACKEND=containers`` and a Docker engine is reachable. Without one,
whatever needs them is skipped with a reason saying so: never counted as passed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

BACKEND_VARIABLE = "BELIEFSTORE_TEST_BACKEND"
KAFKA_IMAGE = "confluentinc/cp-kafka:7.6.0"
POSTGRES_IMAGE = "postgres:16-alpine"


def wanted() -> bool:
    """Whether the suite was asked to run on containers."""
    return os.environ.get(BACKEND_VARIABLE, "").strip().lower() == "containers"


def docker_unreachable() -> str | None:
    """``None`` when a Docker engine answers a ping, else why not (one line)."""
    try:
        import docker

        client = docker.from_env(timeout=5)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:  # any failure means: no usable engine
        return f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def require_docker() -> None:
    """Skip (never pass) what needs containers when no Docker engine is reachable."""
    why = docker_unreachable()
    if why is not None:
        pytest.skip(f"the testcontainers backend ({BACKEND_VARIABLE}=containers) needs a "
                    f"reachable Docker engine and none answers here ({why}); the embedded "
                    f"services run without {BACKEND_VARIABLE}, or start Docker (DOCKER_HOST)")


@contextmanager
def kafka() -> Iterator[str]:
    """A Kafka broker (KRaft) in a container; yields its bootstrap servers."""
    require_docker()
    from testcontainers.community.kafka import KafkaContainer

    with KafkaContainer(KAFKA_IMAGE).with_kraft() as container:
        yield container.get_bootstrap_server()


@contextmanager
def postgres() -> Iterator[str]:
    """A PostgreSQL server in a container; yields its ``postgresql://`` URL."""
    require_docker()
    from testcontainers.community.postgres import PostgresContainer

    with PostgresContainer(POSTGRES_IMAGE, driver=None) as container:
        yield container.get_connection_url()
