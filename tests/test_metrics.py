"""Prometheus ``/metrics`` (API latency by route and status; projector events, batch
duration, lag per partition, dead letters), the standalone projector's ``--metrics-port``,
and OpenTelemetry tracing when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set; real services."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import httpx
import pytest
from kafka import KafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from beliefstore.embedded import free_port
from beliefstore.runtime.serve import ApiServer
from tests import agentworld
from tests.agentworld import SUBJECT, World, bearer
from tests.conftest import wait_caught_up
from tests.test_cli import BELIEFSTORE, cli_env

world = agentworld.world


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """``(sample name, labels) → value`` of a Prometheus text exposition."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def scrape(url: str) -> dict:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return samples(response.text)


SELF_MODEL = "/v1/subjects/{subject_id}/self-model"


def test_api_metrics_by_route_and_status(world: World):
    before = scrape(world.url + "/metrics")  # no key needed
    count = "beliefstore_api_request_duration_seconds_count"
    for _ in range(3):
        assert world.get("triage_agent", f"/v1/subjects/{SUBJECT}/self-model").status_code == 200
    assert world.get("triage_agent", "/v1/subjects/nobody/self-model").status_code == 404
    assert world.get("support_bot", f"/v1/subjects/{SUBJECT}/beliefs/billing/plan/trace"
                     ).status_code == 403
    assert httpx.get(world.url + "/no/such/path", timeout=10).status_code == 404
    after = scrape(world.url + "/metrics")
    ok = dict(method="GET", route=SELF_MODEL, status="200")
    assert value(after, count, **ok) - value(before, count, **ok) == 3
    assert value(after, count, method="GET", route=SELF_MODEL, status="404") - value(
        before, count, method="GET", route=SELF_MODEL, status="404") == 1
    trace = dict(method="GET", route="/v1/subjects/{subject_id}/beliefs/{context}/{attribute}/trace",
                 status="403")
    assert value(after, count, **trace) - value(before, count, **trace) == 1
    unmatched = dict(method="GET", route="unmatched", status="404")
    assert value(after, count, **unmatched) - value(before, count, **unmatched) == 1
    assert value(after, "beliefstore_api_request_duration_seconds_sum", **ok) > value(
        before, "beliefstore_api_request_duration_seconds_sum", **ok)
    # Histogram buckets are cumulative and end at +Inf = count.
    assert value(after, "beliefstore_api_request_duration_seconds_bucket", le="+Inf", **ok) == \
        value(after, count, **ok)
    # Cache lookups (recorded where a read cache exists) are exposed with their result.
    from beliefstore.api.metrics import record_cache

    record_cache("test-cache", True)
    record_cache("test-cache", False)
    cached = scrape(world.url + "/metrics")
    lookups = "beliefstore_api_cache_lookups_total"
    assert value(cached, lookups, cache="test-cache", result="hit") - value(
        after, lookups, cache="test-cache", result="hit") == 1
    assert value(cached, lookups, cache="test-cache", result="miss") - value(
        after, lookups, cache="test-cache", result="miss") == 1
    # The self-model cache of the read path: a second read of the same subject is a hit.
    for _ in range(2):
        assert world.get("triage_agent", f"/v1/subjects/{SUBJECT}/self-model").status_code == 200
    served = scrape(world.url + "/metrics")
    assert value(served, lookups, cache="self_model", result="hit") - value(
        cached, lookups, cache="self_model", result="hit") >= 1
    # The subject id never becomes a label.
    assert not any(SUBJECT in str(labels) for _, labels in after)


def test_projector_metrics_events_batches_lag_and_dead_letters(world: World, producer):
    url = world.url + "/metrics"
    before = scrape(url)
    receipts = [producer.observe(f"cust-m{i}", "support", "mood", "ok", 0.7, "triage_agent")
                for i in range(5)]
    raw = KafkaProducer(bootstrap_servers=world.settings.kafka_bootstrap_servers)
    poison = raw.send(world.settings.topic, key=b"cust-m0", value=b"\x00not avro").get(15)
    raw.close()
    from beliefstore.events.producer import Receipt

    wait_caught_up(world.settings, [*receipts, Receipt("x", world.settings.topic,
                                                       poison.partition, poison.offset)])
    after = scrape(url)
    events = "beliefstore_projector_events_total"
    assert value(after, events, outcome="applied") - value(before, events, outcome="applied") >= 5
    assert value(after, events, outcome="dead_letter") - value(
        before, events, outcome="dead_letter") == 1
    assert value(after, "beliefstore_projector_dead_letters_total") - value(
        before, "beliefstore_projector_dead_letters_total") == 1
    batches = "beliefstore_projector_batch_duration_seconds_count"
    assert value(after, batches) > value(before, batches)
    lags = {dict(labels)["partition"]: v for (name, labels), v in after.items()
            if name == "beliefstore_projector_lag"
            and dict(labels)["topic"] == world.settings.topic}
    assert set(lags) == {"0", "1", "2"} and all(v == 0 for v in lags.values())


def test_standalone_projector_serves_metrics_on_its_port(settings, catalog, producer, tmp_path):
    port = free_port()
    env = cli_env(settings, tmp_path)
    process = subprocess.Popen([str(BELIEFSTORE), "projector", "--metrics-port", str(port)],
                               env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        receipts = [producer.observe(f"cust-p{i}", "support", "mood", "ok", 0.7, "bot")
                    for i in range(4)]
        wait_caught_up(settings, receipts, timeout_s=60)
        deadline = time.monotonic() + 30
        while True:
            try:
                found = scrape(f"http://127.0.0.1:{port}/metrics")
                if value(found, "beliefstore_projector_events_total", outcome="applied") >= 4:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "no projector metrics on the port"
            time.sleep(0.2)
        assert value(found, "beliefstore_projector_batch_duration_seconds_count") >= 1
        assert value(found, "beliefstore_projector_lag", topic=settings.topic, partition="0") == 0
    finally:
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    with pytest.raises(httpx.TransportError):  # the metrics server stopped with it
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_projector_metrics_port_taken_is_a_clear_error(settings, catalog, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([str(BELIEFSTORE), "projector", "--metrics-port", str(port)],
                                env=cli_env(settings, tmp_path), cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"cannot serve metrics on port {port}" in " ".join(result.stderr.split())


class _Collector(BaseHTTPRequestHandler):
    received: list[tuple[str, bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        self.received.append((self.path, body))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_tracing_exports_spans_when_the_otlp_endpoint_is_set(world: World, monkeypatch):
    pytest.importorskip("opentelemetry.instrumentation.fastapi",
                        reason="the otel extra is not installed (pip install -e '.[otel]')")
    collector = HTTPServer(("127.0.0.1", 0), _Collector)
    _Collector.received = []
    thread = threading.Thread(target=collector.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{collector.server_port}")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "beliefstore-test")
    server = ApiServer(world.settings, "127.0.0.1", free_port()).start_in_thread()
    try:
        response = httpx.get(server.url + f"/v1/subjects/{SUBJECT}/self-model",
                             headers=bearer(world.keys["triage_agent"]), timeout=10)
        assert response.status_code == 200
        assert "traceparent" not in response.headers or response.headers["traceparent"]
    finally:
        server.stop()  # the lifespan flushes the spans
        collector.shutdown()
        collector.server_close()
    paths = [path for path, _ in _Collector.received]
    assert paths and set(paths) == {"/v1/traces"}
    payload = b"".join(body for _, body in _Collector.received)
    assert b"/v1/subjects/{subject_id}/self-model" in payload
    assert b"beliefstore-test" in payload


def test_no_tracing_without_the_endpoint(monkeypatch):
    from fastapi import FastAPI

    from beliefstore.api.tracing import instrument

    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    app = FastAPI()
    assert instrument(app) is False and not hasattr(app.state, "tracer_provider")


def test_tracing_without_the_packages_says_what_to_install(monkeypatch, caplog):
    import logging
    import sys

    from fastapi import FastAPI

    from beliefstore.api.tracing import instrument

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    # As if the otel extra were not installed: importing the instrumentation fails.
    monkeypatch.setitem(sys.modules, "opentelemetry.instrumentation.fastapi", None)
    app = FastAPI()
    with caplog.at_level(logging.ERROR, logger="beliefstore.api"):
        assert instrument(app) is False
    assert "pip install 'beliefstore[otel]'" in caplog.text
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" in caplog.text
    assert not hasattr(app.state, "tracer_provider")
