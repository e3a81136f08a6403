"""The world the agent-facing tests share (discovery, staleness, the client, MCP, the
examples): one subject with beliefs of different ages in support, billing and the
restricted health context, a projector, an API on real services, and keys of each shape.
Import ``world`` into a test module to use it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from beliefstore.access.keys import KeyStore
from beliefstore.embedded import free_port
from beliefstore.events.producer import Receipt
from beliefstore.runtime.serve import ApiServer
from beliefstore.settings import Settings
from tests.conftest import wait_caught_up

SUBJECT = "cust-agents"
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class World:
    """``url`` of the API; ``keys`` by agent name; ``now_ms`` when the events were made;
    ``receipts`` of the seeded observations by ``context/attribute``."""

    url: str
    keys: dict[str, str]
    store: KeyStore
    settings: Settings
    now_ms: int
    receipts: dict[str, Receipt]

    def get(self, who: str, path: str, **params) -> httpx.Response:
        return httpx.get(self.url + path, headers=bearer(self.keys[who]), params=params,
                         timeout=30)

    def post(self, who: str, path: str, body: dict) -> httpx.Response:
        return httpx.post(self.url + path, headers=bearer(self.keys[who]), json=body, timeout=30)

    def wait_for(self, receipts) -> None:
        wait_caught_up(self.settings, receipts)


@pytest.fixture
def world(settings, engine, producer, projector, key_store, make_key, api_key) -> Iterator[World]:
    now = int(time.time() * 1000)
    seeded = {
        # fresh: a minute old
        "support/emotional_state": producer.observe(
            SUBJECT, "support", "emotional_state", "frustrated", 0.9, "triage_agent",
            occurred_at=now - 60_000),
        # stale: ten days old
        "support/issue": producer.observe(
            SUBJECT, "support", "issue", "refund", 0.8, "triage_agent",
            occurred_at=now - 10 * DAY_MS),
        # two hours old
        "billing/plan": producer.observe(
            SUBJECT, "billing", "plan", "pro", 0.8, "billing_agent", occurred_at=now - 2 * HOUR_MS),
        "health/condition": producer.observe(
            SUBJECT, "health", "condition", "diabetes", 0.7, "nurse_bot", occurred_at=now - 60_000),
        "support/emotional_state@other": producer.observe(
            "cust-other", "support", "emotional_state", "calm", 0.6, "triage_agent",
            occurred_at=now - 60_000),
    }
    key_store.restrict("health", reason="special category data")
    keys = {
        "triage_agent": api_key,  # reads/writes *, admin
        "billing_agent": make_key("billing_agent", read="support,billing", write="billing"),
        "support_bot": make_key("support_bot", read="support", write="support"),
        "doctor_bot": make_key("doctor_bot", read="*,health", write="*"),
        "writer_bot": make_key("writer_bot", read="", write="support"),
        "reader_bot": make_key("reader_bot", read="support", write=""),
    }
    wait_caught_up(settings, seeded.values())
    server = ApiServer(settings, "127.0.0.1", free_port()).start_in_thread()
    try:
        yield World(server.url, keys, key_store, settings, now, seeded)
    finally:
        server.stop()
