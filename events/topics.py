"""Creating the event and dead-letter topics."""

from __future__ import annotations

import time

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError


def ensure_topics(
    bootstrap_servers: str,
    topics: dict[str, int],
    *,
    replication_factor: int = 1,
    timeout_s: float = 30.0,
    client_config: dict | None = None,
) -> None:
    """Create each topic (name → partition count) unless it exists.

    Topics keep their log forever (``retention.ms=-1``): the event topic is the system
    of record. Record timestamps are the broker's append time
    (``message.timestamp.type=LogAppendTime``), which the read model stores as
    ``recorded_at``; brokers that ignore the setting (the embedded Tansu) keep the
    producer's send time. Waits until every topic shows up in the cluster's metadata.

    ``client_config`` holds the security settings (``Settings.kafka_client_config()``).

    Raises:
        kafka.errors.KafkaError: the cluster refused or could not be reached in time.
    """
    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap_servers,
        client_id="beliefstore-admin",
        request_timeout_ms=int(timeout_s * 1000),
        **(client_config or {}),
    )
    try:
        existing = set(admin.list_topics())
        missing = [
            NewTopic(name, num_partitions=n, replication_factor=replication_factor,
                     topic_configs={"retention.ms": "-1",
                                    "message.timestamp.type": "LogAppendTime"})
            for name, n in topics.items()
            if name not in existing
        ]
        for topic in missing:
            try:
                admin.create_topics([topic])
            except TopicAlreadyExistsError:
                pass
        deadline = time.monotonic() + timeout_s
        while not set(topics) <= set(admin.list_topics()):
            if time.monotonic() > deadline:
                raise KafkaError(f"topics {sorted(topics)} did not appear within {timeout_s} s")
            time.sleep(0.1)
    finally:
        admin.close()
