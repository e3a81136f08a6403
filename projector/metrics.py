"""Prometheus metrics of the projector, recorded by the worker (one call per batch).

* ``beliefstore_projector_events_total{outcome}``: messages handled (``applied``,
  ``dead_letter``, ``shredded``); events/s is ``rate(...[1m])``;
* ``beliefstore_projector_batch_duration_seconds``: poll-to-commit time of a batch;
* ``beliefstore_projector_lag{topic,partition}``: messages between the worker's position
  and the partition's high watermark, after its last poll;
* ``beliefstore_projector_dead_letters_total``: messages sent to the dead-letter topic.

Served by the API's ``/metrics`` when the projector runs in the API's process
(``beliefstore up``), or by ``beliefstore projector --metrics-port N``.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import Counter, Gauge, Histogram

EVENTS = Counter("beliefstore_projector_events_total",
                 "Messages the projector handled, by outcome.", ["outcome"])
BATCH_SECONDS = Histogram(
    "beliefstore_projector_batch_duration_seconds",
    "Time from the poll to the commit of one batch (one PostgreSQL transaction), seconds.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
LAG = Gauge("beliefstore_projector_lag",
            "Messages not yet projected: high watermark minus position, per partition.",
            ["topic", "partition"])
DEAD_LETTERS = Counter("beliefstore_projector_dead_letters_total",
                       "Poison messages sent to the dead-letter topic.")


def record_batch(seconds: float, applied: int, dead_letter: int, shredded: int) -> None:
    """Count one committed batch of ``applied`` events, ``dead_letter`` poison messages and
    ``shredded`` (erased) observations, which took ``seconds``."""
    BATCH_SECONDS.observe(seconds)
    EVENTS.labels("applied").inc(applied)
    EVENTS.labels("dead_letter").inc(dead_letter)
    EVENTS.labels("shredded").inc(shredded)
    DEAD_LETTERS.inc(dead_letter)


def record_lag(topic: str, lags: Mapping[int, int]) -> None:
    """Set the lag gauge of each partition in ``lags`` (partition → messages)."""
    for partition, lag in lags.items():
        LAG.labels(topic, str(partition)).set(lag)


def serve(port: int, addr: str = "0.0.0.0"):
    """Serve the default registry on ``http://addr:port/metrics`` from a daemon thread;
    returns the server (call ``shutdown()`` to stop it).

    Raises:
        OSError: the port is taken.
    """
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr)
    return server


__all__ = ["BATCH_SECONDS", "DEAD_LETTERS", "EVENTS", "LAG", "record_batch", "record_lag", "serve"]
