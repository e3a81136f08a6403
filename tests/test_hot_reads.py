"""The lean lane of the handoff reads (``api.routes.reads.HotReads``): it answers the reads
of now without FastAPI's dependency resolution, and still enforces everything the FastAPI
route does — the same body, 401/403/404/422, scopes and restricted contexts, ``max_age_s``,
metrics — while everything else goes on to the FastAPI route. Real broker, database and
uvicorn server."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from prometheus_client import REGISTRY

from beliefstore.api.deps import get_caller
from beliefstore.embedded import free_port
from beliefstore.runtime.serve import ApiServer
from tests.conftest import wait_caught_up

T0 = 1767225600000
SUBJECT = "user-hot"
SELF_MODEL = f"/v1/subjects/{SUBJECT}/self-model"
BELIEFS = f"/v1/subjects/{SUBJECT}/beliefs"


@pytest.fixture
def server(settings, engine, producer, projector, key_store) -> Iterator[ApiServer]:
    key_store.restrict("health")
    receipts = [
        producer.observe(SUBJECT, "support", "emotional_state", "calm", 0.9,
                         source="triage_agent", occurred_at=T0),
        producer.observe(SUBJECT, "billing", "plan", "pro", 0.8, source="billing_agent",
                         occurred_at=T0),
        producer.observe(SUBJECT, "health", "condition", "asthma", 0.7, source="nurse_agent",
                         occurred_at=T0),
    ]
    wait_caught_up(settings, receipts)
    api = ApiServer(settings, "127.0.0.1", free_port()).start_in_thread()
    yield api
    api.stop()


def _app(server: ApiServer):
    return server.app


def _no_age(body: dict) -> dict:
    """The body without the time-dependent ``age_s``."""
    def strip(b: dict) -> dict:
        return {k: v for k, v in b.items() if k != "age_s"}
    if "contexts" in body:
        return {**body, "contexts": {c: [strip(b) for b in bs]
                                     for c, bs in body["contexts"].items()}}
    return {**body, "beliefs": [strip(b) for b in body["beliefs"]]}


def test_the_lane_answers_without_fastapi_dependencies(server, make_key):
    """With FastAPI's caller dependency made to fail, reads the lane takes still answer;
    those it leaves to the route (as_of) hit the failing dependency."""
    token = make_key("billing_bot", read="*")
    headers = {"Authorization": f"Bearer {token}"}

    async def refuse() -> None:
        from fastapi import HTTPException
        raise HTTPException(418, "the FastAPI route was used")

    _app(server).dependency_overrides[get_caller] = refuse
    try:
        with httpx.Client(base_url=server.url, headers=headers, timeout=10) as client:
            assert client.get(SELF_MODEL).status_code == 200
            assert client.get(BELIEFS, params={"context": "billing"}).status_code == 200
            assert client.get(SELF_MODEL, params={"max_age_s": "1e12"}).status_code == 418
            assert client.get(SELF_MODEL, params={"as_of": "2030-01-01T00:00Z"}).status_code \
                == 418
            assert client.get(SELF_MODEL, params={"unknown": "1"}).status_code == 418
    finally:
        _app(server).dependency_overrides.clear()


def test_the_lane_and_the_route_give_the_same_answers(server, make_key):
    token = make_key("support_bot", read=["support", "billing"])
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=10) as client:
        for path, params in ((SELF_MODEL, {}), (SELF_MODEL, {"max_age_s": "100"}),
                             (BELIEFS, {}), (BELIEFS, {"context": "billing"}),
                             (BELIEFS, {"min_confidence": "0.85"}),
                             (BELIEFS, {"context": "health"})):
            lane = client.get(path, params=params)
            # an ignored extra parameter sends the same read through the FastAPI route
            route = client.get(path, params={**params, "x-route": "1"})
            assert lane.status_code == route.status_code == 200, (path, params, lane.text)
            assert lane.headers["content-type"] == route.headers["content-type"]
            assert _no_age(lane.json()) == _no_age(route.json()), (path, params)
        body = client.get(SELF_MODEL).json()
        # scopes: the key reads support and billing only; health is restricted anyway
        assert set(body["contexts"]) == {"support", "billing"} and body["belief_count"] == 2
        assert all(b["age_s"] > 0 for bs in body["contexts"].values() for b in bs)
        # max_age_s: the beliefs were observed at T0 (2026-01-01), older than 100 s
        old = client.get(SELF_MODEL, params={"max_age_s": "100"}).json()
        assert old["belief_count"] == 0 and old["contexts"] == {}
        assert [b["value"] for b in client.get(BELIEFS, params={
            "min_confidence": "0.85"}).json()["beliefs"]] == ["calm"]
        assert client.get(BELIEFS, params={"context": "health"}).json()["beliefs"] == []


def test_the_lane_enforces_auth_scopes_and_validation(server, make_key):
    star = make_key("star_bot", read="*")
    doctor = make_key("doctor_bot", read=["health"])
    nothing = make_key("mute_bot", read=[])

    def get(path: str, token: str | None = None, **params: str) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.get(f"{server.url}{path}", headers=headers, params=params, timeout=10)

    # 401: no key, a malformed header, an unknown key, a wrong secret
    assert get(SELF_MODEL).status_code == 401
    assert httpx.get(f"{server.url}{SELF_MODEL}", headers={"Authorization": "Basic x"},
                     timeout=10).status_code == 401
    bad = get(SELF_MODEL, "bsk_0000000000000000_" + "0" * 64)
    assert bad.status_code == 401 and "invalid_token" in bad.headers["www-authenticate"]
    assert get(SELF_MODEL, star[:-1] + ("0" if star[-1] != "0" else "1")).status_code == 401
    # restricted contexts: * does not cover health; a key naming it reads it
    assert "health" not in get(SELF_MODEL, star).json()["contexts"]
    assert set(get(SELF_MODEL, doctor).json()["contexts"]) == {"health"}
    # 403: a key that reads nothing
    refused = get(SELF_MODEL, nothing)
    assert refused.status_code == 403 and "may not read any context" in refused.text
    # 404: unknown subject, and a subject whose beliefs the key may not see
    missing = get("/v1/subjects/nobody/self-model", star)
    assert missing.status_code == 404 and "nobody" in missing.json()["detail"]
    assert get("/v1/subjects/nobody/beliefs", star).status_code == 404
    # 422 naming the parameter, from the FastAPI route the lane leaves them to
    for path, params, name in (
            ("/v1/subjects/a%00b/self-model", {}, "subject_id"),
            ("/v1/subjects/" + "x" * 300 + "/self-model", {}, "subject_id"),
            (SELF_MODEL, {"max_age_s": "-1"}, "max_age_s"),
            (SELF_MODEL, {"max_age_s": "soon"}, "max_age_s"),
            (BELIEFS, {"min_confidence": "1.5"}, "min_confidence"),
            (BELIEFS, {"context": "bad context"}, "context")):
        r = get(path, star, **params)
        assert r.status_code == 422, (path, params, r.text)
        assert name in [e["loc"][-1] for e in r.json()["detail"]], r.text


def test_the_lane_counts_in_the_metrics(server, make_key):
    """Lane answers are timed under the route's template, like the route's. (The 503 with
    Retry-After of a read while the database is gone goes through the lane too:
    tests/test_live_reads.py's faulty-proxy test reads with a bearer key.)"""
    token = make_key("billing_bot", read="*")
    headers = {"Authorization": f"Bearer {token}"}
    labels = {"method": "GET", "route": "/v1/subjects/{subject_id}/self-model",
              "status": "200"}
    before = REGISTRY.get_sample_value("beliefstore_api_request_duration_seconds_count",
                                       labels) or 0
    for _ in range(3):
        assert httpx.get(f"{server.url}{SELF_MODEL}", headers=headers).status_code == 200
    after = REGISTRY.get_sample_value("beliefstore_api_request_duration_seconds_count", labels)
    assert after == before + 3
    missing = {**labels, "status": "404"}
    before = REGISTRY.get_sample_value("beliefstore_api_request_duration_seconds_count",
                                       missing) or 0
    assert httpx.get(f"{server.url}/v1/subjects/nobody/self-model",
                     headers=headers).status_code == 404
    assert REGISTRY.get_sample_value("beliefstore_api_request_duration_seconds_count",
                                     missing) == before + 1


def test_concurrent_misses_share_queries_and_each_gets_its_own_subject(
        settings, engine, producer, projector, catalog):
    """Many reads of subjects not cached, at once: fewer queries than subjects, and every
    reader gets exactly its subject's beliefs (none, for unknown subjects)."""
    import asyncio

    from beliefstore.api.live import MAX_LOADERS, LiveReads

    receipts = [producer.observe(f"user-{i}", "support", "issue", f"issue-{i}", 0.8,
                                 source="triage_agent", occurred_at=T0) for i in range(6)]
    wait_caught_up(settings, receipts)
    schema = catalog.active().schema
    subjects = [f"user-{i}" for i in range(40)] * 2  # each subject read twice at once

    async def main() -> tuple[list, dict]:
        live = LiveReads(settings.database_url or "", catalog.base_schema)
        await live.start()
        try:
            models = await asyncio.gather(*(live.self_model(schema, s) for s in subjects))
            return models, dict(live.stats)
        finally:
            await live.stop()

    models, stats = asyncio.run(main())
    assert stats["misses"] == len(subjects)
    assert 1 <= stats["loads"] <= MAX_LOADERS + 2, stats
    for subject, model in zip(subjects, models, strict=True):
        assert model.subject_id == subject
        number = int(subject.split("-")[1])
        values = [body for *_, body in model.items]
        if number < 6:
            assert len(values) == 1 and f'"issue-{number}"'.encode() in values[0]
        else:
            assert values == []
