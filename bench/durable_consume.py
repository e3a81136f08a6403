"""A bare consumer on the embedded broker's durable log: the limit for replay there.

    .venv/bin/python bench/durable_consume.py [--quick] [--events N]

1. Starts the embedded broker as ``beliefstore up`` does (Tansu, ``s3://`` on the
   project's localbucket entry point, in a fresh folder) and produces ``events`` records
   of 400 bytes to a one-partition topic, ``batch`` records per produce request
   (``acks="all"``, idempotent), so the log holds ``events / batch`` record-batch objects
   (the API's group commit writes batches of about that size under 20 agents).
2. For each listing mode of the S3 store (``BELIEFSTORE_S3_LISTING=walk``: localbucket's
   own listing, which walks the whole bucket per request; ``index``: the project's
   in-memory index, ``beliefstore/embedded/s3server.py``), restarts the broker on the
   same folder (the log survives it) and reads the topic from offset 0 with a bare
   kafka-python ``KafkaConsumer`` (manual assignment, ``fetch_max_wait_ms=500`` as
   ``up``), for at most ``max_seconds``: records/s over the read.

The index's figure is the limit of replay on durable storage; the walk's is what the
store did before it.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from beliefstore.embedded import EmbeddedKafka
from beliefstore.events.topics import ensure_topics

NAME = "durable_consume"
TITLE = "Bare consumer on the embedded broker's durable log (walk vs index listing)"
TOPIC = "bench.durable"


def params(quick: bool) -> dict[str, Any]:
    return {"events": 10_000 if quick else 100_000, "batch": 20,
            "max_seconds": 30 if quick else 120}


def _produce(bootstrap: str, events: int, batch: int) -> float:
    """Produce ``events`` records, ``batch`` per request; return records/s."""
    ensure_topics(bootstrap, {TOPIC: 1})
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True,
                             linger_ms=5_000, batch_size=1 << 20)
    started = time.perf_counter()
    try:
        for start in range(0, events, batch):
            for i in range(start, min(start + batch, events)):
                producer.send(TOPIC, key=f"subject-{i % 1000}".encode(),
                              value=i.to_bytes(8, "big") + b"x" * 392, partition=0)
            producer.flush(60)
    finally:
        producer.close()
    return events / (time.perf_counter() - started)


def _consume(bootstrap: str, events: int, max_seconds: float) -> dict[str, Any]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             fetch_max_wait_ms=500, consumer_timeout_ms=0)
    tp = TopicPartition(TOPIC, 0)
    try:
        consumer.assign([tp])
        consumer.seek(tp, 0)
        read, expected = 0, 0
        started = time.perf_counter()
        while read < events and time.perf_counter() - started < max_seconds:
            for records in consumer.poll(timeout_ms=1000, max_records=10_000).values():
                for record in records:
                    if int.from_bytes(record.value[:8], "big") != expected:
                        raise RuntimeError(f"offset {record.offset}: record out of order")
                    expected += 1
                read += len(records)
        elapsed = time.perf_counter() - started
    finally:
        consumer.close()
    return {"records_read": read, "seconds": round(elapsed, 2),
            "records_per_s": round(read / elapsed, 1), "complete": read == events}


def run(ctx: common.Context, *, events: int, batch: int, max_seconds: int) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="bench-durable-"))
    saved = os.environ.get("BELIEFSTORE_S3_LISTING")
    modes: dict[str, Any] = {}
    try:
        with EmbeddedKafka(home / "kafka") as kafka:
            produce_rate = _produce(kafka.bootstrap_servers, events, batch)
        objects = sum(1 for _ in (home / "kafka").rglob("*.batch"))
        for mode in ("walk", "index"):
            os.environ["BELIEFSTORE_S3_LISTING"] = mode
            with EmbeddedKafka(home / "kafka") as kafka:
                modes[mode] = _consume(kafka.bootstrap_servers, events, max_seconds)
            common.console.print(f"{mode}: {modes[mode]}")
    finally:
        if saved is None:
            os.environ.pop("BELIEFSTORE_S3_LISTING", None)
        else:
            os.environ["BELIEFSTORE_S3_LISTING"] = saved
        shutil.rmtree(home, ignore_errors=True)
    return {
        "produce_records_per_s": round(produce_rate, 1), "batch_objects": objects,
        "walk": modes["walk"], "index": modes["index"],
        "index_vs_walk": round(modes["index"]["records_per_s"]
                               / max(modes["walk"]["records_per_s"], 0.1), 1),
        "storage": "embedded Tansu, s3:// on the project's localbucket entry point (durable)",
        "failed": not modes["index"]["complete"],
    }


def summary(r: dict[str, Any]) -> list[str]:
    return [
        f"{r['batch_objects']:,} record-batch objects; produced at "
        f"{r['produce_records_per_s']:,.0f} records/s",
        f"bare consumer, localbucket's walk: {r['walk']['records_per_s']:,.1f} records/s "
        f"({r['walk']['records_read']:,} in {r['walk']['seconds']} s)",
        f"bare consumer, in-memory index: {r['index']['records_per_s']:,.1f} records/s "
        f"({r['index']['records_read']:,} in {r['index']['seconds']} s); "
        f"x{r['index_vs_walk']} the walk",
    ]


if __name__ == "__main__":
    sys.exit(common.standalone(sys.modules[__name__]))
