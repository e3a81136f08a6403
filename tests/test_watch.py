"""GET /v1/subjects/{id}/watch (Server-Sent Events) and ``beliefstore watch``: events
pushed by the projector's NOTIFY, filtered by scope, resumed without gaps or
duplicates, heartbeats, and the 404/401/422 of bad requests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from httpx_sse import connect_sse

from beliefstore.projector.tables import belief_changes
from tests.conftest import wait_caught_up

BELIEFSTORE = Path(sys.executable).parent / "beliefstore"
T0 = 1767225600000


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Watcher:
    """Reads a watch stream in a thread; ``events`` collects (event, id, data) as they come."""

    def __init__(self, url: str, headers: dict[str, str], params: dict | None = None):
        self.events: list[tuple[str, str, dict]] = []
        self.ready = threading.Event()
        self.client = httpx.Client(timeout=httpx.Timeout(10, read=30))
        self._stop = False
        self._thread = threading.Thread(target=self._run, args=(url, headers, params or {}),
                                        daemon=True)
        self._thread.start()
        assert self.ready.wait(10), "the watch did not start"

    def _run(self, url: str, headers: dict[str, str], params: dict) -> None:
        try:
            with connect_sse(self.client, "GET", url, headers=headers, params=params) as source:
                assert source.response.status_code == 200
                for sse in source.iter_sse():
                    if sse.event == "ready":
                        self.ready.set()
                    self.events.append((sse.event, sse.id, json.loads(sse.data)
                                        if sse.data.startswith("{") else {"text": sse.data}))
                    if self._stop:
                        return
        except (httpx.TransportError, RuntimeError):
            pass  # closed by close()

    def beliefs(self) -> list[tuple[str, dict]]:
        return [(i, d) for e, i, d in list(self.events) if e == "belief"]

    def wait_for(self, count: int, timeout_s: float = 10.0) -> list[tuple[str, dict]]:
        deadline = time.monotonic() + timeout_s
        while len(self.beliefs()) < count:
            assert time.monotonic() < deadline, self.events
            time.sleep(0.01)
        return self.beliefs()

    def close(self) -> None:
        """Drop the connection (as a network failure would)."""
        self._stop = True
        self.client.close()
        self._thread.join(5)


def stored_changes(engine: sa.Engine, subject: str, contexts: set[str]) -> list[int]:
    with engine.connect() as conn:
        return [r.id for r in conn.execute(sa.select(belief_changes.c.id, belief_changes.c.context)
                                           .where(belief_changes.c.subject_id == subject)
                                           .order_by(belief_changes.c.id))
                if r.context in contexts]


@pytest.fixture
def watch_world(settings, engine, producer, projector, key_store, make_key, api_url):
    """A subject known in support; keys for support only, and for everything."""
    first = producer.observe("user-w", "support", "mood", "calm", 0.6, source="triage_agent",
                             occurred_at=T0)
    wait_caught_up(settings, [first])
    return {"support": make_key("support_bot", read="support", write="support"),
            "all": make_key("all_bot", read="*", write="*")}


def test_watch_pushes_each_change_filtered_by_scope(watch_world, settings, producer, api_url,
                                                    engine):
    url = f"{api_url}/v1/subjects/user-w/watch"
    support = Watcher(url, bearer(watch_world["support"]))
    everything = Watcher(url, bearer(watch_world["all"]))
    try:
        receipts = [
            producer.observe("user-w", "support", "mood", "angry", 0.9, source="sentiment_agent",
                             occurred_at=T0 + 1000),
            producer.observe("user-w", "billing", "plan", "pro", 0.8, source="billing_agent",
                             occurred_at=T0 + 2000),
            producer.observe("user-w", "support", "issue", "refund", 0.7, source="triage_agent",
                             occurred_at=T0 + 3000),
        ]
        wait_caught_up(settings, receipts)
        got = everything.wait_for(3)
        assert {(d["context"], d["attribute"]) for _, d in got} == {
            ("support", "mood"), ("billing", "plan"), ("support", "issue")}
        seen = support.wait_for(2)
        time.sleep(0.3)  # nothing else comes: the billing change is not in its scope
        assert [(d["context"], d["attribute"]) for _, d in support.beliefs()] == [
            (d["context"], d["attribute"]) for _, d in got if d["context"] == "support"]
        mood = next(d for _, d in seen if d["attribute"] == "mood")
        assert mood["value"] == "angry" and set(mood["sources"]) == {"sentiment_agent"} \
            and "calm" in mood["alternatives"] and 0 < mood["confidence"] < 1
        by_offset = {(r.partition, r.offset) for r in receipts}
        assert all((d["kafka"]["partition"], d["kafka"]["offset"]) in by_offset for _, d in got)
        # Event ids are the stored change ids, in order.
        ids = [int(i.split(":")[1]) for i, _ in got]
        assert ids == sorted(ids) and ids == stored_changes(
            engine, "user-w", {"support", "billing"})[-3:]
    finally:
        support.close()
        everything.close()


def test_a_dropped_watch_resumes_from_last_event_id_without_gaps_or_duplicates(
        watch_world, settings, producer, api_url, engine):
    url = f"{api_url}/v1/subjects/user-w/watch"
    key = watch_world["support"]
    first = Watcher(url, bearer(key))
    values = [f"v{i}" for i in range(12)]
    receipts = [producer.observe("user-w", "support", f"a{i}", v, 0.7, source="triage_agent",
                                 occurred_at=T0 + 1000 * (i + 1)) for i, v in enumerate(values[:4])]
    wait_caught_up(settings, receipts)
    before = first.wait_for(4)
    first.close()  # the connection drops; more is learned meanwhile (and outside its scope)
    receipts = [producer.observe("user-w", "support", f"a{i}", v, 0.7, source="triage_agent",
                                 occurred_at=T0 + 1000 * (i + 1)) for i, v in enumerate(values)
                if i >= 4]
    receipts.append(producer.observe("user-w", "billing", "plan", "pro", 0.8,
                                     source="billing_agent", occurred_at=T0))
    wait_caught_up(settings, receipts)
    last_id = before[-1][0]
    second = Watcher(url, {**bearer(key), "Last-Event-ID": last_id})
    try:
        after = second.wait_for(8)
        time.sleep(0.3)
        after = second.beliefs()
    finally:
        second.close()
    ids = [int(i.split(":")[1]) for i, _ in before + after]
    assert len(ids) == len(set(ids)) == 12  # no duplicates
    assert ids == stored_changes(engine, "user-w", {"support"})[-12:]  # no gaps, in order
    # (one batch writes its changes by key, so compare the values as a set)
    assert sorted(d["value"] for _, d in before + after) == sorted(values)


def test_watch_sends_heartbeats_while_idle(watch_world, api_url):
    lines: list[str] = []
    with httpx.Client(timeout=10) as client, client.stream(
            "GET", f"{api_url}/v1/subjects/user-w/watch", params={"heartbeat_s": 0.5},
            headers=bearer(watch_world["all"])) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        started = time.monotonic()
        for line in response.iter_lines():
            lines.append(line)
            if sum(1 for x in lines if x.startswith(": ping")) >= 2:
                break
            assert time.monotonic() - started < 5, lines
    assert lines[0] == "event: ready"


def test_watch_refuses_like_a_read(watch_world, settings, producer, api_url):
    secret = producer.observe("user-hidden", "billing", "plan", "pro", 0.8,
                              source="billing_agent", occurred_at=T0)
    wait_caught_up(settings, [secret])
    support = bearer(watch_world["support"])
    for subject in ("nobody", "user-hidden"):  # unknown, or known only outside its scope
        watch = httpx.get(f"{api_url}/v1/subjects/{subject}/watch", headers=support)
        read = httpx.get(f"{api_url}/v1/subjects/{subject}/self-model", headers=support)
        assert watch.status_code == read.status_code == 404
        assert watch.json()["detail"] == read.json()["detail"]
    assert httpx.get(f"{api_url}/v1/subjects/user-w/watch").status_code == 401
    bad = httpx.get(f"{api_url}/v1/subjects/user-w/watch",
                    headers={**support, "Last-Event-ID": "yesterday"})
    assert bad.status_code == 422 and "Last-Event-ID" in json.dumps(bad.json())


def test_a_revoked_key_ends_its_watch(watch_world, key_store, api_url):
    from beliefstore.access.keys import split_token

    watcher = Watcher(f"{api_url}/v1/subjects/user-w/watch", bearer(watch_world["support"]))
    try:
        key_store.revoke(split_token(watch_world["support"])[0])
        deadline = time.monotonic() + 2
        while not any(e == "error" for e, _, _ in watcher.events):
            assert time.monotonic() < deadline, watcher.events
            time.sleep(0.01)
        assert "revoked" in [d for e, _, d in watcher.events if e == "error"][0]["text"]
    finally:
        watcher.close()


def test_watch_command_prints_changes(watch_world, settings, producer, api_url, tmp_path,
                                      engine):
    env = {**os.environ, "BELIEFSTORE_API_URL": api_url,
           "BELIEFSTORE_API_KEY": watch_world["support"], "BELIEFSTORE_HOME": str(tmp_path)}
    start = f"self_model:{stored_changes(engine, 'user-w', {'support'})[-1]}"
    proc = subprocess.Popen([str(BELIEFSTORE), "watch", "user-w", "--json", "--count", "2",
                             "--last-event-id", start],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        receipts = [producer.observe("user-w", "support", attribute, "relieved", 0.9,
                                     source="sentiment_agent", occurred_at=T0 + 5000)
                    for attribute in ("mood", "tone")]
        wait_caught_up(settings, receipts)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 2 and all(x["value"] == "relieved" for x in lines)
    assert lines[0]["id"].startswith("self_model:")

    unknown = subprocess.run([str(BELIEFSTORE), "watch", "nobody"], env=env, capture_output=True,
                             text=True, timeout=30)
    assert unknown.returncode == 1 and "404" in unknown.stderr and "nobody" in unknown.stderr
