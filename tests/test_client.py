"""``beliefstore.client``: every method of the sync and async clients against the real API,
typed errors with the API's messages, retries honouring ``Retry-After``, idempotent
retried POSTs, the batch fallback and ``watch`` on a server without the stream."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import replace

import httpx
import pytest

from beliefstore.client import (
    AsyncBeliefClient,
    AuthenticationError,
    BeliefClient,
    ConnectionFailed,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    RateLimited,
    RetryPolicy,
)
from beliefstore.client.core import NO_RETRY, SSEParser, retry_after_s
from beliefstore.embedded import free_port
from beliefstore.events.producer import Receipt as SdkReceipt
from beliefstore.runtime.serve import ApiServer
from tests import agentworld
from tests.agentworld import SUBJECT, World

world = agentworld.world


def sdk(receipt) -> SdkReceipt:
    return SdkReceipt(receipt.event_id, receipt.topic, receipt.partition, receipt.offset)


def test_sync_client_reads_match_the_http_api(world: World):
    with BeliefClient(world.url, world.keys["triage_agent"]) as client:
        assert client.agent == "triage_agent"
        model = client.self_model(SUBJECT)
        raw = world.get("triage_agent", f"/v1/subjects/{SUBJECT}/self-model").json()
        assert model.belief_count == raw["belief_count"] == 3
        assert model.get("support", "emotional_state").value == "frustrated"
        assert all(b.age_s is not None for b in model.beliefs())
        fresh = client.self_model(SUBJECT, max_age_s=3600)
        assert [b.attribute for b in fresh.beliefs()] == ["emotional_state"]
        beliefs = client.beliefs(SUBJECT, context="support", min_confidence=0.5,
                                 max_age_s=30 * 86400)
        assert {b.attribute for b in beliefs.beliefs} == {"emotional_state", "issue"}
        trace = client.trace(SUBJECT, "billing", "plan")
        assert trace.belief is not None and trace.belief.value == "pro"
        assert [e.event_id for e in trace.events] == [world.receipts["billing/plan"].event_id]
        history = client.history(SUBJECT, "billing", "plan")
        assert [(c.value, c.source) for c in history.changes] == [("pro", "billing_agent")]
        contexts = {c.context: c for c in client.contexts()}
        assert set(contexts) == {"support", "billing"}
        assert contexts["support"].belief_count == 3
        schemas = client.schemas()
        assert len(schemas) == 4
        one = client.schema(schemas[0].fingerprint)
        assert one.schema_ == schemas[0].schema_


def test_sync_client_writes_retracts_and_retried_posts_count_once(world: World):
    with BeliefClient(world.url, world.keys["support_bot"]) as client:
        event_id = str(uuid.uuid4())
        first = client.observe("cust-new", "support", "language", "de", 0.7, evidence="msg-1",
                               event_id=event_id)
        # The same event id sent again (a retry after a lost answer): logged twice, counted once.
        again = client.observe("cust-new", "support", "language", "de", 0.7, evidence="msg-1",
                               event_id=event_id)
        assert first.event_id == again.event_id == event_id and again.offset > first.offset
        world.wait_for([sdk(again)])
        belief = client.beliefs("cust-new").beliefs[0]
        assert belief.support == [event_id] and belief.sources == ["support_bot"]
        trace = client.trace("cust-new", "support", "language")
        assert [e.event_id for e in trace.events] == [event_id]  # the fold dedupes by event id
        retraction = client.retract("cust-new", event_id, "wrong person")
        world.wait_for([sdk(retraction)])
        assert client.beliefs("cust-new").beliefs == []
        statuses = {e.event_id: e.status for e in client.trace("cust-new", "support", "language").events}
        assert statuses == {event_id: "retracted", retraction.event_id: "retraction"}


def test_typed_errors_carry_the_api_message(world: World):
    with BeliefClient(world.url, world.keys["support_bot"]) as client:
        with pytest.raises(InvalidRequest) as invalid:
            client.observe(SUBJECT, "support", "mood", "ok", 1.5)
        assert invalid.value.status == 422 and "confidence" in invalid.value.message
        assert invalid.value.detail[0]["loc"] == ["body", "confidence"]
        with pytest.raises(PermissionDenied) as denied:
            client.observe(SUBJECT, "billing", "plan", "free", 0.5)
        http = world.post("support_bot", "/v1/observations", {
            "subject_id": SUBJECT, "context": "billing", "attribute": "plan", "value": "free",
            "confidence": 0.5, "source": "support_bot"})
        assert http.status_code == 403 and denied.value.message == http.json()["detail"]
        # Reads: the same 403 and the same omission as over HTTP.
        with pytest.raises(PermissionDenied) as trace_denied:
            client.trace(SUBJECT, "billing", "plan")
        http_trace = world.get("support_bot", f"/v1/subjects/{SUBJECT}/beliefs/billing/plan/trace")
        assert trace_denied.value.message == http_trace.json()["detail"]
        assert set(client.self_model(SUBJECT).contexts) == set(
            world.get("support_bot", f"/v1/subjects/{SUBJECT}/self-model").json()["contexts"]) \
            == {"support"}
        with pytest.raises(NotFound) as missing:
            client.self_model("nobody-here")
        assert "nobody-here" in missing.value.message
    with BeliefClient(world.url, "bsk_nope") as bad, pytest.raises(AuthenticationError) as auth:
        bad.whoami()
    assert "malformed API key" in auth.value.message


def test_observe_many_uses_the_batch_endpoint(world: World):
    """``observe_many`` posts one ``POST /v1/observations:batch``: one result per item, in
    order, each with its own status (the one-by-one fallback for servers without the
    batch endpoint is tested against a stand-in in test_client_contracts.py)."""
    with BeliefClient(world.url, world.keys["support_bot"]) as client:
        results = client.observe_many([
            {"subject_id": "cust-batch", "context": "support", "attribute": "tier",
             "value": "gold", "confidence": 0.9},
            {"subject_id": "cust-batch", "context": "support", "attribute": "tier",
             "value": "gold", "confidence": 7},  # invalid
            {"subject_id": "cust-batch", "context": "billing", "attribute": "plan",
             "value": "pro", "confidence": 0.6},  # not in the write scope
        ])
        assert [r.status for r in results] == [201, 422, 403]
        assert results[0].ok and results[0].receipt is not None
        assert results[1].detail[0]["loc"][-1] == "confidence"
        assert "may not write context 'billing'" in results[2].detail
        assert client._batch is not False  # the server has the batch endpoint
        assert client.observe_many([]) == []
        world.wait_for([sdk(results[0].receipt)])
        assert client.beliefs("cust-batch").beliefs[0].value == "gold"


@pytest.mark.timeout(90)
def test_watch_streams_belief_changes_sync_and_async(world: World, catalog):
    """The clients follow GET /v1/subjects/{id}/watch (the live SSE stream): resumed from
    the projection's first change, a subject's changes arrive in order with their values."""
    subject = f"cust-watch-{uuid.uuid4().hex[:8]}"
    with BeliefClient(world.url, world.keys["support_bot"]) as client:
        first = client.observe(subject, "support", "mood", "calm", 0.8)
        world.wait_for([sdk(first)])
        second = client.observe(subject, "support", "mood", "tense", 0.9)
        world.wait_for([sdk(second)])
        start = f"{catalog.active().name}:0"
        values: list[str] = []
        for event in client.watch(subject, last_event_id=start, read_timeout_s=30):
            if isinstance(event.data, dict) and event.data.get("attribute") == "mood":
                values.append(event.data["value"])
            if values[-1:] == ["tense"]:
                break
        assert values == ["calm", "tense"]

    async def run() -> list[str]:
        seen: list[str] = []
        async with AsyncBeliefClient(world.url, world.keys["support_bot"]) as aclient:
            async for event in aclient.watch(subject, last_event_id=start, read_timeout_s=30):
                if isinstance(event.data, dict) and event.data.get("attribute") == "mood":
                    seen.append(event.data["value"])
                if seen[-1:] == ["tense"]:
                    break
        return seen

    assert asyncio.run(run()) == ["calm", "tense"]


def test_sse_parser_follows_the_event_stream_format():
    parser = SSEParser()
    lines = [": keep-alive", "id: 7", "event: belief", 'data: {"attribute": "mood",',
             'data: "value": "calm"}', "", "data: plain text", ""]
    events = [e for e in (parser.feed(line) for line in lines) if e is not None]
    assert events[0].id == "7" and events[0].event == "belief"
    assert events[0].data == {"attribute": "mood", "value": "calm"}
    assert events[1].data == "plain text" and events[1].id == "7"  # the last id carries over
    assert parser.last_event_id == "7"


def test_async_client_does_what_the_sync_one_does(world: World):
    async def run() -> None:
        async with AsyncBeliefClient(world.url, world.keys["billing_agent"]) as client:
            assert await client.agent() == "billing_agent"
            receipt = await client.observe(SUBJECT, "billing", "plan", "enterprise", 0.95)
            world.wait_for([sdk(receipt)])
            plan = (await client.beliefs(SUBJECT, context="billing")).beliefs[0]
            assert plan.value == "enterprise" and plan.sources == ["billing_agent"]
            model = await client.self_model(SUBJECT, max_age_s=3600)
            assert {(b.context, b.attribute) for b in model.beliefs()} == {
                ("support", "emotional_state"), ("billing", "plan")}
            assert (await client.trace(SUBJECT, "billing", "plan")).belief.value == "enterprise"
            assert len((await client.history(SUBJECT, "billing", "plan")).changes) == 2
            assert {c.context for c in await client.contexts()} == {"support", "billing"}
            assert len(await client.schemas()) == 4
            results = await client.observe_many([
                {"subject_id": SUBJECT, "context": "billing", "attribute": "seats",
                 "value": "10", "confidence": 0.8}])
            assert [r.status for r in results] == [201]
            retraction = await client.retract(SUBJECT, receipt.event_id)
            world.wait_for([sdk(retraction)])
            assert (await client.beliefs(SUBJECT, context="billing")).beliefs[0].value == "pro"
            with pytest.raises(PermissionDenied):
                await client.trace(SUBJECT, "health", "condition")

    asyncio.run(run())


def test_retries_honour_retry_after(world: World):
    limited = ApiServer(replace(world.settings, rate_limit=1, rate_burst=1), "127.0.0.1",
                        free_port()).start_in_thread()
    try:
        key = world.keys["reader_bot"]
        with BeliefClient(limited.url, key, retry=NO_RETRY) as once:
            once.whoami()
            with pytest.raises(RateLimited) as limited_error:
                once.whoami()
        assert limited_error.value.retry_after_s == 1.0
        assert "BELIEFSTORE_RATE_LIMIT" in limited_error.value.message
        with BeliefClient(limited.url, key, retry=RetryPolicy(attempts=3, backoff_s=0.01)) as client:
            start = time.monotonic()
            for _ in range(2):
                assert client.whoami()["agent"] == "reader_bot"
            # The second call got a 429 with Retry-After: 1 and waited it out (not 0.01 s).
            assert time.monotonic() - start >= 0.9
    finally:
        limited.stop()


def test_connection_errors_are_retried_then_typed():
    port = free_port()
    policy = RetryPolicy(attempts=3, backoff_s=0.01)
    with BeliefClient(f"http://127.0.0.1:{port}", "k", retry=policy) as client:
        with pytest.raises(ConnectionFailed) as failed:
            client.whoami()
    assert "BELIEFSTORE_API_URL" in str(failed.value)
    assert policy.wait_s(1, 5.0) == 5.0 and policy.wait_s(1, 1e9) == policy.max_wait_s
    assert 0.0075 <= policy.wait_s(1, None) <= 0.0125


def test_retry_after_reads_seconds_and_http_dates():
    import httpx

    def response(value: str) -> httpx.Response:
        return httpx.Response(429, headers={"Retry-After": value})

    from datetime import UTC, datetime

    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert retry_after_s(response("3")) == 3.0
    assert retry_after_s(response("Thu, 01 Jan 2026 12:00:05 GMT"), now) == 5.0
    assert retry_after_s(response("soon")) is None
