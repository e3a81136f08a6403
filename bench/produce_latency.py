"""Produce latency on the durable embedded broker, idempotent producer or not.

    .venv/bin/python bench/produce_latency.py [--quick]

For each case, a fresh :class:`~beliefstore.embedded.EmbeddedKafka` on durable storage
(Tansu 0.6.0's ``s3://`` on beliefstore's S3 store, as ``beliefstore up`` runs it) and
one topic of one partition:

1. ``prefill`` produces of ``batch`` records each (400-byte values), one after the other;
2. optionally a consumer tailing the partition from there (``fetch_max_wait_ms`` 100, as
   ``up``'s projector: every fetch makes Tansu list the partition's record batches);
3. for ``seconds`` s, one kafka-python producer (``acks="all"``, one request in flight,
   ``linger_ms`` 0, as :class:`~beliefstore.events.producer.BeliefProducer`) sends
   ``batch`` records, flushes and waits for every acknowledgement, in a loop: produces
   per second and the latency of one produce (p50/p90).

Cases: idempotent and not, each alone, tailed, and tailed past ``prefill`` batches. What
it isolates: the broker's produce path (Tansu's S3 round trips one after the other) from
HTTP, the API and PostgreSQL, which ``bench/ingest_http.py`` measures together.
Reported: each case, and the ratio of the idempotent producer's produces/s to the
non-idempotent one's in the same case.
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import common
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from beliefstore.embedded import EmbeddedKafka
from beliefstore.events.topics import ensure_topics

NAME = "produce_latency"
TITLE = "Produce latency on the durable embedded broker: idempotent producer or not"
TOPIC = "bench.latency"


def params(quick: bool) -> dict[str, Any]:
    return {"seconds": 4 if quick else 8, "prefill": 1000 if quick else 5000, "batch": 5}


def _produce(producer: KafkaProducer, batch: int) -> None:
    futures = [producer.send(TOPIC, key=b"k", value=b"x" * 400) for _ in range(batch)]
    producer.flush()
    for f in futures:
        f.get(30)


def _case(idempotent: bool, prefill: int, tail: bool, seconds: int, batch: int
          ) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as home, \
            EmbeddedKafka(Path(home) / "kafka") as kafka:
        bootstrap = kafka.bootstrap_servers
        ensure_topics(bootstrap, {TOPIC: 1})
        producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0,
                                 enable_idempotence=idempotent,
                                 max_in_flight_requests_per_connection=1)
        stop = threading.Event()
        tailer: threading.Thread | None = None
        try:
            for _ in range(prefill):
                _produce(producer, batch)

            def consume() -> None:
                consumer = KafkaConsumer(bootstrap_servers=bootstrap, fetch_max_wait_ms=100,
                                         enable_auto_commit=False)
                try:
                    tp = TopicPartition(TOPIC, 0)
                    consumer.assign([tp])
                    consumer.seek(tp, prefill * batch)
                    while not stop.is_set():
                        consumer.poll(200)
                finally:
                    consumer.close()

            if tail:
                tailer = threading.Thread(target=consume, daemon=True)
                tailer.start()
                time.sleep(1.0)
            latencies = []
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                started = time.perf_counter()
                _produce(producer, batch)
                latencies.append(time.perf_counter() - started)
        finally:
            stop.set()
            if tailer is not None:
                tailer.join(30)
            producer.close()
    return {"idempotent": idempotent, "prefill_batches": prefill, "tailed": tail,
            "produces_per_s": round(len(latencies) / seconds, 1),
            "p50_ms": round(common.percentile(latencies, 50) * 1000, 2),
            "p90_ms": round(common.percentile(latencies, 90) * 1000, 2)}


def run(ctx: common.Context, *, seconds: int, prefill: int, batch: int) -> dict[str, Any]:
    cases = []
    for pre, tail in ((0, False), (0, True), (prefill, True)):
        for idempotent in (True, False):
            cases.append(_case(idempotent, pre, tail, seconds, batch))
    ratios = {}
    for idem, off in zip(cases[::2], cases[1::2], strict=True):
        label = f"prefill {idem['prefill_batches']}, {'tailed' if idem['tailed'] else 'alone'}"
        ratios[label] = round(idem["produces_per_s"] / off["produces_per_s"], 3)
    return {"cases": cases, "idempotent_to_not": ratios,
            "storage": "embedded Tansu, s3:// on the S3 store (durable), as `beliefstore up`"}


def summary(r: dict[str, Any]) -> list[str]:
    lines = [f"{'idempotent' if c['idempotent'] else 'not idempotent'}, prefill "
             f"{c['prefill_batches']}, {'tailed' if c['tailed'] else 'alone'}: "
             f"{c['produces_per_s']:,.0f} produces/s, p50 {c['p50_ms']:.1f} ms, "
             f"p90 {c['p90_ms']:.1f} ms" for c in r["cases"]]
    lines += [f"idempotent / not ({label}): {ratio:.2f}"
              for label, ratio in r["idempotent_to_not"].items()]
    return lines


if __name__ == "__main__":
    sys.exit(common.standalone(sys.modules[__name__]))
