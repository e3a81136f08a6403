"""The lean lane of ingest (``api.routes.ingest.HotIngest``): it answers ``POST
/v1/observations`` without FastAPI's dependency resolution and body model, and still
answers exactly as the FastAPI route — the same 201 receipt once the broker acknowledged
the event, 401/403 bodies and headers, 503 + Retry-After with the broker down, metrics —
while every request it does not take (invalid fields, so the route's 422 names them; an
ISO 8601 ``occurred_at``; no bearer key) goes on to the route. Real broker, database and
uvicorn server."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest
from fastapi import HTTPException
from prometheus_client import REGISTRY

from beliefstore.api.deps import get_caller
from beliefstore.embedded import free_port
from beliefstore.events.serde import AvroSerde
from beliefstore.runtime.serve import ApiServer
from tests.conftest import read_topic

T0 = 1767225600000  # 2026-01-01T00:00:00Z
T0_ISO = datetime.fromtimestamp(T0 / 1000, UTC).isoformat()


def observation(**overrides) -> dict:
    body = {"subject_id": "user-lane", "context": "support", "attribute": "emotional_state",
            "value": "frustrated", "confidence": 0.88, "source": "triage_agent",
            "evidence": "msg-1842", "metadata": {"model": "gpt-x"}, "occurred_at": T0}
    body.update(overrides)
    return body


def via_route(body: dict) -> dict:
    """The same observation, sent so that the lane leaves it to the FastAPI route (an ISO
    8601 ``occurred_at`` of the same instant)."""
    return {**body, "occurred_at": T0_ISO}


def warm(url: str, auth: dict[str, str]) -> None:
    """Wait until the API checks keys (its async pool answers within its 0.5 s query
    timeout; on a loaded machine the first queries may not, and answer 503)."""
    deadline = time.monotonic() + 30
    while httpx.get(f"{url}/v1/subjects/nobody/self-model", headers=auth,
                    timeout=10).status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.2)


@pytest.fixture
def server(settings, engine, key_store, auth) -> Iterator[ApiServer]:
    key_store.restrict("health")
    api = ApiServer(settings, "127.0.0.1", free_port()).start_in_thread()
    warm(api.url, auth)
    yield api
    api.stop()


async def _refuse() -> None:
    raise HTTPException(418, "the FastAPI route was used")


def test_the_lane_answers_without_fastapi_and_leaves_the_rest_to_the_route(server, auth):
    """With FastAPI's caller dependency made to fail, the posts the lane takes still get
    their 201; those it leaves to the route (ISO time, invalid fields, unusual types, a
    body that is not declared JSON) hit the failing dependency."""
    server.app.dependency_overrides[get_caller] = _refuse
    try:
        with httpx.Client(base_url=server.url, headers=auth, timeout=30) as client:
            ok = client.post("/v1/observations", json=observation())
            assert ok.status_code == 201, ok.text
            no_time = {k: v for k, v in observation().items() if k != "occurred_at"}
            assert client.post("/v1/observations", json=no_time).status_code == 201
            assert client.post("/v1/observations", json=observation(confidence=1)
                               ).status_code == 201
            for body in (via_route(observation()), observation(confidence=1.5),
                         observation(confidence="0.8"), observation(confidence=True),
                         observation(context="bad context"), observation(extra=1),
                         observation(metadata={"k": 1}), observation(event_id="nope"),
                         observation(occurred_at=-1), [observation()]):
                assert client.post("/v1/observations", json=body).status_code == 418, body
            text = client.post("/v1/observations", content=json.dumps(observation()),
                               headers={"content-type": "text/plain"})
            assert text.status_code == 418
    finally:
        server.app.dependency_overrides.clear()


def test_the_lane_and_the_route_give_the_same_201(settings, server, auth):
    """One event id posted through the lane, then through the route: the same receipt
    (event id, topic, partition; the next offset), the same headers and JSON layout; the
    record at the receipt's coordinates is the event (acknowledged before the answer)."""
    event_id = str(uuid.uuid4())
    with httpx.Client(base_url=server.url, headers=auth, timeout=30) as client:
        lane = client.post("/v1/observations", json=observation(event_id=event_id))
        route = client.post("/v1/observations", json=via_route(observation(event_id=event_id)))
    assert lane.status_code == route.status_code == 201, (lane.text, route.text)
    assert lane.headers["content-type"] == route.headers["content-type"]
    a, b = lane.json(), route.json()
    assert list(a) == list(b) == ["event_id", "topic", "partition", "offset"]
    assert (a["event_id"], a["topic"], a["partition"]) == (event_id, settings.topic,
                                                            b["partition"])
    assert b["offset"] == a["offset"] + 1
    assert lane.content == json.dumps(a, separators=(",", ":")).encode()
    assert route.content == json.dumps(b, separators=(",", ":")).encode()
    serde = AvroSerde.for_settings(settings)
    records = {(m.partition, m.offset): serde.decode(m.value).event
               for m in read_topic(settings.kafka_bootstrap_servers, settings.topic)}
    stored = records[(a["partition"], a["offset"])]
    assert stored == records[(b["partition"], b["offset"])]
    assert (stored.event_id, stored.occurred_at, stored.value, stored.evidence,
            stored.metadata, stored.confidence) == (event_id, T0, "frustrated", "msg-1842",
                                                    {"model": "gpt-x"}, 0.88)


def test_the_lane_refuses_as_the_route_does(server, make_key):
    """401 (no key is left to the route; an unknown key and a wrong secret are the lane's),
    403 for another agent's source, a context outside the write scope and a restricted
    context under ``*``: the lane's answer equals the route's, body and headers."""
    writer = make_key("support_bot", read="*", write=["support"])
    star = make_key("star_bot", read="*", write="*")
    wrong_secret = writer[:-1] + ("0" if writer[-1] != "0" else "1")
    cases = [
        (None, observation(source="support_bot"), 401),
        ("bsk_0000000000000000_" + "0" * 64, observation(source="support_bot"), 401),
        (wrong_secret, observation(source="support_bot"), 401),
        (writer, observation(source="triage_agent"), 403),
        (writer, observation(source="support_bot", context="billing"), 403),
        (star, observation(source="star_bot", context="health"), 403),
        (star, observation(source="star_bot", context="billing"), 201),
    ]
    for token, body, status in cases:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        lane = httpx.post(f"{server.url}/v1/observations", json=body, headers=headers,
                          timeout=30)
        route = httpx.post(f"{server.url}/v1/observations", json=via_route(body),
                           headers=headers, timeout=30)
        assert lane.status_code == route.status_code == status, (token, lane.text, route.text)
        if status != 201:
            assert lane.json() == route.json(), (lane.text, route.text)
            assert lane.headers.get("www-authenticate") == route.headers.get(
                "www-authenticate")
    restricted = httpx.post(f"{server.url}/v1/observations", timeout=30,
                            json=observation(source="star_bot", context="health"),
                            headers={"Authorization": f"Bearer {star}"})
    assert "restricted" in restricted.json()["detail"]


def test_invalid_posts_get_the_routes_422_naming_the_field(server, auth):
    with httpx.Client(base_url=server.url, headers=auth, timeout=30) as client:
        for field, value in (("confidence", 1.5), ("context", "bad context"),
                             ("subject_id", ""), ("event_id", "nope"), ("value", 7),
                             ("occurred_at", -1)):
            r = client.post("/v1/observations", json=observation(**{field: value}))
            assert r.status_code == 422, (field, r.text)
            assert ["body", field] in [e["loc"] for e in r.json()["detail"]], r.text


def test_the_lane_counts_in_the_metrics(server, auth):
    labels = {"method": "POST", "route": "/v1/observations", "status": "201"}
    name = "beliefstore_api_request_duration_seconds_count"
    before = REGISTRY.get_sample_value(name, labels) or 0
    for _ in range(3):
        assert httpx.post(f"{server.url}/v1/observations", json=observation(), headers=auth,
                          timeout=30).status_code == 201
    assert REGISTRY.get_sample_value(name, labels) == before + 3
    refused = {**labels, "status": "401"}
    before = REGISTRY.get_sample_value(name, refused) or 0
    assert httpx.post(f"{server.url}/v1/observations", json=observation(), timeout=30,
                      headers={"Authorization": "Bearer bsk_0000000000000000_" + "0" * 64}
                      ).status_code == 401
    assert REGISTRY.get_sample_value(name, refused) == before + 1


def test_broker_down_the_lane_and_the_route_answer_503_with_retry_after(
        auth, api_on_own_broker):
    kafka, local = api_on_own_broker.kafka, api_on_own_broker.settings
    warm(api_on_own_broker.url, auth)
    url = f"{api_on_own_broker.url}/v1/observations"
    assert httpx.post(url, json=observation(), headers=auth, timeout=30).status_code == 201
    kafka.stop()
    start = time.monotonic()
    lane = httpx.post(url, json=observation(value="tense"), headers=auth, timeout=60)
    assert time.monotonic() - start < local.produce_timeout_s + 5
    route = httpx.post(url, json=via_route(observation(value="tense")), headers=auth,
                       timeout=60)
    assert lane.status_code == route.status_code == 503, (lane.text, route.text)
    assert lane.headers["retry-after"] == route.headers["retry-after"]
    assert int(lane.headers["retry-after"]) > 0
    # the first failure is the send's; after it the producer starts afresh, so the
    # second may be the reconnection's ("cannot reach Kafka"): same ending
    assert "the broker did not acknowledge" in lane.json()["detail"], lane.text
    for r in (lane, route):
        assert r.json()["detail"].endswith(
            "; retry later (with the same event_id the retry is safe: events are "
            "deduplicated by event_id)"), r.text
