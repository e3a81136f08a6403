"""The per-process cache of self-models (``api/live.py``): each kept as one ``bytes`` object
in a ``dict`` the garbage collector never tracks, bounded (least recently used dropped
first), filtered per key's read scope on every read; and the belief JSON PostgreSQL
writes for it (``SELF_MODEL_SQL``) is the API model's. Real broker and database where the
cache is filled; the scope filtering of the cached form is also checked on its own."""

from __future__ import annotations

import asyncio
import gc

import httpx
import orjson
import pytest
import sqlalchemy as sa

from beliefstore.access.scopes import EVERYTHING, ContextScope
from beliefstore.api.live import LiveReads, SelfModel
from beliefstore.api.models import BeliefOut
from beliefstore.embedded import free_port
from beliefstore.projector.changes import CHANNEL as CHANGES_CHANNEL
from beliefstore.projector.changes import notify_payload
from beliefstore.runtime.serve import ApiServer
from beliefstore.settings import Settings, SettingsError
from tests.conftest import wait_caught_up

T0 = 1767225600000  # 2026-01-01T00:00:00Z, in ms


def _open(body: dict) -> bytes:
    """A belief's JSON as SELF_MODEL_SQL writes it: without its closing brace."""
    return orjson.dumps(body)[:-1]


def _belief(context: str, attribute: str, value: str, confidence: float) -> dict:
    return {"context": context, "attribute": attribute, "value": value,
            "confidence": confidence, "alternatives": {}, "sources": ["a"], "support": ["e"],
            "source_count": 1, "last_observed_at": "2026-01-01T00:00:00Z",
            "updated_at": "2026-01-01T00:00:00Z"}


def test_read_cache_size_setting():
    assert Settings.from_env({}, use_running=False).read_cache_size == 100_000
    assert Settings.from_env({"BELIEFSTORE_READ_CACHE_SIZE": "250"},
                             use_running=False).read_cache_size == 250
    assert Settings.from_env({"BELIEFSTORE_READ_CACHE_SIZE": "0"},
                             use_running=False).read_cache_size == 0
    for bad in ("-1", "lots", "1.5", "²"):
        with pytest.raises(SettingsError, match="BELIEFSTORE_READ_CACHE_SIZE"):
            Settings.from_env({"BELIEFSTORE_READ_CACHE_SIZE": bad}, use_running=False)


def test_the_cached_form_round_trips_and_is_filtered_per_scope():
    """A model packed to bytes and back answers exactly as before, and each reader's scope
    decides which contexts it sees, with age_s at the read's instant."""
    observed = T0 / 1000
    rows = [(b["context"], b["confidence"], observed + shift, _open(b)) for b, shift in (
        (_belief("billing", "plan", "pro", 0.8), 0.0),
        (_belief("health", "condition", "asthma", 0.7), 0.0),
        (_belief("support", "issue", "login", 0.4), 10.0),
        (_belief("support", "mood", "calm", 0.9), 0.0))]
    model = SelfModel.of_rows("user-1", rows)
    blob = model.to_bytes()
    assert isinstance(blob, bytes)
    back = SelfModel.of_bytes(blob)
    assert back == model and back.items == model.items
    now = observed + 100.0

    everything = orjson.loads(back.self_model_json(EVERYTHING, now)[0])
    assert list(everything["contexts"]) == ["billing", "health", "support"]
    assert everything["belief_count"] == 4
    assert [b["age_s"] for b in everything["contexts"]["support"]] == [90.0, 100.0]

    # '*' does not cover the restricted health context; a key naming it reads it
    star = ContextScope.of(["*"], restricted=["health"])
    body, names, count = back.self_model_json(star, now)
    assert names == ["billing", "support"] and count == 3
    assert "asthma" not in body.decode()
    doctor = ContextScope.of(["health"], restricted=["health"])
    assert back.self_model_json(doctor, now)[1:] == (["health"], 1)
    assert back.count(doctor) == 1 and back.count(ContextScope.of([], [])) == 0

    # max_age_s drops the older beliefs; the beliefs list filters by context and confidence
    assert back.self_model_json(star, now, max_age_s=95.0)[1:] == (["support"], 1)
    listed, contexts = back.beliefs_json(star, "support", 0.5, now)
    assert [b["value"] for b in orjson.loads(listed)] == ["calm"] and contexts == ["support"]
    assert back.beliefs_json(star, "health", None, now) == (b"[]", [])


def test_the_cache_is_bounded_lru_untracked_and_still_answers(settings, engine, producer,
                                                              projector, catalog):
    receipts = [producer.observe(f"user-{i}", "support", "issue", f"issue-{i}", 0.8,
                                 source="triage_agent", occurred_at=T0) for i in range(5)]
    receipts.append(producer.observe("user-secret", "health", "condition", "asthma", 0.7,
                                     source="nurse_agent", occurred_at=T0))
    wait_caught_up(settings, receipts)
    schema = catalog.active().schema

    async def main() -> None:
        live = LiveReads(settings.database_url or "", catalog.base_schema, cache_size=3)
        await live.start()
        try:
            assert live.connected is not None
            await asyncio.wait_for(live.connected.wait(), 10)

            async def read(i: int) -> list[bytes]:
                model = await live.self_model(schema, f"user-{i}")
                return [body for *_, body in model.items]

            for i in (0, 1, 2):
                assert f'"issue-{i}"'.encode() in (await read(i))[0]
            assert await read(0)  # a hit: user-0 is now the most recently used
            assert live.stats["hits"] == 1
            await read(3)  # over the bound: the least recently used (user-1) goes
            kept = sorted(k.split("\0")[1] for k in live._models)
            assert kept == ["user-0", "user-2", "user-3"]
            misses = live.stats["misses"]
            assert b'"issue-1"' in (await read(1))[0]  # evicted: loaded again
            assert live.stats["misses"] == misses + 1 and len(live._models) == 3

            # what the garbage collector would have to scan: nothing
            gc.collect()
            assert not gc.is_tracked(live._models)
            assert all(type(v) is bytes for v in live._models.values())

            # a subject whose only belief the reader may not see: its observed contexts
            # are loaded once, kept (untracked too) and filtered per scope
            star = ContextScope.of(["*"], restricted=["health"])
            doctor = ContextScope.of(["health"], restricted=["health"])
            model = await live.self_model(schema, "user-secret")
            assert model.count(star) == 0
            assert await live.known(schema, model, star) is False
            assert await live.known(schema, model, doctor) is True
            assert await live.known(schema, await live.self_model(schema, "nobody"),
                                    star) is False
            assert f"{schema}\0user-secret" in live._observed
            assert not gc.is_tracked(live._observed)
            # a notification about the subject drops both of its entries
            live._on_notify(CHANGES_CHANNEL, notify_payload(schema, 1, ["user-secret"]))
            assert f"{schema}\0user-secret" not in live._observed
            assert f"{schema}\0user-secret" not in live._models
        finally:
            await live.stop()

    asyncio.run(main())


def test_the_json_postgresql_writes_is_the_api_models(settings, engine, producer, projector,
                                                      make_key):
    """Unusual strings (quotes, backslashes, control characters, non-ASCII), tiny
    confidences, alternatives and millisecond timestamps: the self-model's belief JSON,
    parsed, equals pydantic's ``BeliefOut`` of the same row, strings (timestamps) included."""
    subject = "user-odd"
    value = 'say "hi" \\ back\n\ttab \x01 é ✓ 😀 \u2028'
    receipts = [
        producer.observe(subject, "support", "quote", value, 0.9, source="triage_agent",
                         occurred_at=T0 + 123),
        producer.observe(subject, "support", "quote", "other", 0.00001, source="sales_agent",
                         occurred_at=T0 + 7),
        producer.observe(subject, "billing", "tiny", "rare", 0.00001, source="billing_agent",
                         occurred_at=T0),
    ]
    wait_caught_up(settings, receipts)
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT context, attribute, value, confidence, alternatives, sources, support, "
            "source_count, last_observed_at, updated_at FROM beliefs WHERE subject_id = :s "
            "ORDER BY context, attribute"), {"s": subject}).mappings().all()
    expected = [orjson.loads(BeliefOut(**row).model_dump_json(exclude={"age_s"})) for row in rows]
    assert len(expected) == 2 and expected[1]["value"] == value
    assert expected[1]["last_observed_at"] == "2026-01-01T00:00:00.123000Z"

    token = make_key("star_bot", read="*")
    server = ApiServer(settings, "127.0.0.1", free_port()).start_in_thread()
    try:
        got = httpx.get(f"{server.url}/v1/subjects/{subject}/self-model",
                        headers={"Authorization": f"Bearer {token}"}, timeout=10).json()
    finally:
        server.stop()
    beliefs = [{k: v for k, v in b.items() if k != "age_s"}
               for c in ("billing", "support") for b in got["contexts"][c]]
    assert beliefs == expected
