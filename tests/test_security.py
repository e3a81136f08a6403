"""Access control against real services: API keys (401), per-context scopes and restricted
contexts (403), source binding, rate limits (429), the body size limit (413), the access
log, the `keys`/`contexts`/`access-log` commands, and `up`'s first admin key."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import httpx
import pytest
import sqlalchemy as sa

from beliefstore.access.accesslog import parse_message
from beliefstore.access.keys import KeyStore, split_token
from beliefstore.access.scopes import parse_scope
from beliefstore.embedded import free_port
from beliefstore.events.eventlog import partition_of_key
from beliefstore.events.serde import AvroSerde
from beliefstore.runtime.serve import ApiServer
from beliefstore.settings import Settings, SettingsError
from tests.conftest import read_topic, wait_caught_up
from tests.test_cli import BELIEFSTORE, cli_env, flat, run

T0 = 1767225600000
SUBJECT = "user-sec"
HEALTH_ONLY = "user-health-only"
READS = {
    "self-model": "/v1/subjects/{s}/self-model",
    "beliefs": "/v1/subjects/{s}/beliefs",
}


def trace_path(context: str, attribute: str, what: str = "trace", subject: str = SUBJECT) -> str:
    return f"/v1/subjects/{subject}/beliefs/{context}/{attribute}/{what}"


ATTRIBUTE = {"support": "emotional_state", "billing": "plan", "health": "condition"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class World:
    """A subject with beliefs in support, billing and the restricted health context, an API
    serving them, and keys of every shape."""

    url: str
    keys: dict[str, str]
    store: KeyStore
    server: ApiServer

    def get(self, who: str | None, path: str, **params) -> httpx.Response:
        headers = bearer(self.keys[who]) if who else {}
        return httpx.get(self.url + path, headers=headers, params=params, timeout=30)

    def post(self, who: str | None, **overrides) -> httpx.Response:
        body = {"subject_id": SUBJECT, "context": "support", "attribute": "issue",
                "value": "refund", "confidence": 0.8, "source": who, **overrides}
        headers = bearer(self.keys[who]) if who else {}
        return httpx.post(self.url + "/v1/observations", headers=headers, json=body, timeout=30)


@pytest.fixture
def world(settings, engine, producer, projector, key_store, make_key, api_key) -> Iterator[World]:
    receipts = [
        producer.observe(SUBJECT, "support", "emotional_state", "frustrated", 0.9,
                         "triage_agent", occurred_at=T0),
        producer.observe(SUBJECT, "billing", "plan", "pro", 0.8, "billing_agent", occurred_at=T0),
        producer.observe(SUBJECT, "health", "condition", "diabetes", 0.7, "nurse_bot",
                         occurred_at=T0),
        producer.observe(HEALTH_ONLY, "health", "condition", "asthma", 0.7, "nurse_bot",
                         occurred_at=T0),
    ]
    key_store.restrict("health", reason="special category data (GDPR art. 9)")
    keys = {
        "admin": api_key,  # agent triage_agent, reads/writes *, admin
        "support_bot": make_key("support_bot", read="support", write="support"),
        "star_bot": make_key("star_bot", read="*", write="*"),
        "nurse_bot": make_key("nurse_bot", read="support,health", write="health"),
        "doctor_bot": make_key("doctor_bot", read="*,health", write="*"),
        "writer_bot": make_key("writer_bot", read="", write="support"),
        "revoked_bot": make_key("revoked_bot", read="*", write="*"),
    }
    key_store.revoke(split_token(keys["revoked_bot"])[0])
    wait_caught_up(settings, receipts)
    server = ApiServer(settings, "127.0.0.1", free_port()).start_in_thread()
    try:
        yield World(server.url, keys, key_store, server)
    finally:
        server.stop()


def assert_401(response: httpx.Response, *words: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"].startswith("Bearer"), response.headers
    detail = response.json()["detail"]
    for word in words:
        assert word in detail, (word, detail)


def assert_403(response: httpx.Response, *words: str) -> None:
    assert response.status_code == 403, response.text
    detail = response.json()["detail"]
    assert "beliefstore keys create" in detail or "own key" in detail, detail  # names the fix
    for word in words:
        assert word in detail, (word, detail)


# -- 401: missing, malformed, unknown, wrong secret, revoked ---------------------------------


def test_every_protected_endpoint_needs_a_valid_key(world):
    paths = [READS["self-model"].format(s=SUBJECT), READS["beliefs"].format(s=SUBJECT),
             trace_path("support", "emotional_state"),
             trace_path("support", "emotional_state", "history"), "/v1/whoami",
             "/v1/admin/keys"]
    key_id, secret = split_token(world.keys["star_bot"])
    wrong_secret = f"bsk_{key_id}_{'0' * 48}"
    unknown_id = f"bsk_{'0' * 16}_{secret}"
    for path in paths:
        missing = httpx.get(world.url + path, timeout=10)
        assert_401(missing, "missing API key", "Authorization: Bearer", "beliefstore keys create")
        assert missing.headers["www-authenticate"] == 'Bearer realm="beliefstore"'
        basic = httpx.get(world.url + path, headers={"Authorization": "Basic dXNlcjpwYXNz"},
                          timeout=10)
        assert_401(basic, "Bearer <API key>")
        malformed = httpx.get(world.url + path, headers=bearer("not-a-key"), timeout=10)
        assert_401(malformed, "malformed API key", "beliefstore keys create")
        assert 'error="invalid_token"' in malformed.headers["www-authenticate"]
        for token in (wrong_secret, unknown_id):
            assert_401(httpx.get(world.url + path, headers=bearer(token), timeout=10),
                       "invalid API key")
        assert_401(world.get("revoked_bot", path), "revoked", "beliefstore keys create")
    assert_401(world.post(None), "missing API key")
    assert_401(world.post("revoked_bot"), "revoked")
    # The open endpoints stay open.
    for path in ("/healthz", "/readyz", "/docs", "/openapi.json"):
        assert httpx.get(world.url + path, timeout=30).status_code == 200, path


# -- reads: scopes and restricted contexts ---------------------------------------------------

# who -> contexts it sees in the self-model / beliefs of SUBJECT
VISIBLE = {
    "admin": {"support", "billing"},  # * does not cover the restricted health context
    "support_bot": {"support"},
    "star_bot": {"support", "billing"},
    "nurse_bot": {"support", "health"},
    "doctor_bot": {"support", "billing", "health"},
}


def test_self_model_and_beliefs_silently_omit_contexts_the_key_may_not_read(world):
    for who, contexts in VISIBLE.items():
        model = world.get(who, READS["self-model"].format(s=SUBJECT))
        assert model.status_code == 200, (who, model.text)
        assert set(model.json()["contexts"]) == contexts, who
        assert model.json()["belief_count"] == len(contexts), who
        beliefs = world.get(who, READS["beliefs"].format(s=SUBJECT))
        assert beliefs.status_code == 200, (who, beliefs.text)
        assert {b["context"] for b in beliefs.json()["beliefs"]} == contexts, who
        # asking for a context it may not read: silently nothing
        for context in {"support", "billing", "health"} - contexts:
            filtered = world.get(who, READS["beliefs"].format(s=SUBJECT), context=context)
            assert filtered.status_code == 200 and filtered.json()["beliefs"] == [], (who, context)
        # as_of views apply the same scope
        past = world.get(who, READS["self-model"].format(s=SUBJECT), as_of="2100-01-01T00:00Z")
        assert set(past.json()["contexts"]) == contexts, who
    # A subject known only in a context the key may not read looks unknown (404), so the
    # answer does not reveal that the subject has data elsewhere.
    for who in ("support_bot", "star_bot", "admin"):
        for template in READS.values():
            response = world.get(who, template.format(s=HEALTH_ONLY))
            assert response.status_code == 404, (who, response.text)
    for who in ("nurse_bot", "doctor_bot"):
        model = world.get(who, READS["self-model"].format(s=HEALTH_ONLY))
        assert model.status_code == 200 and set(model.json()["contexts"]) == {"health"}
    # A key with no read scope at all is told so.
    for template in READS.values():
        assert_403(world.get("writer_bot", template.format(s=SUBJECT)), "read scope is empty")


def test_trace_and_history_of_a_context_the_key_may_not_read_is_403(world):
    for what in ("trace", "history"):
        for who, contexts in VISIBLE.items():
            for context in ("support", "billing", "health"):
                response = world.get(who, trace_path(context, ATTRIBUTE[context], what))
                if context in contexts:
                    assert response.status_code == 200, (what, who, context, response.text)
                    assert response.json()["context"] == context
                elif context == "health" and who in ("admin", "star_bot"):
                    assert_403(response, "'health' is restricted", "* does not cover it",
                               f"--read {context}")
                else:
                    assert_403(response, f"may not read context {context!r}",
                               f"--read {context}")
        assert_403(world.get("writer_bot", trace_path("support", "emotional_state", what)),
                   "read scope is empty")
        # 403 comes before 404: a context the key may not read tells nothing about the subject.
        assert world.get("support_bot", trace_path("billing", "plan", what,
                                                   subject="nobody")).status_code == 403


def _within_a_second(check) -> float:
    """Poll ``check()`` until true, at most 1 s (the API's caches hear changes through
    NOTIFY); return the seconds it took, or fail."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < 1.0, "not applied within 1 s"
        time.sleep(0.01)
    return time.monotonic() - started


def test_lifting_a_restriction_applies_within_a_second(world):
    path = trace_path("health", "condition")
    model_path = READS["self-model"].format(s=SUBJECT)
    assert world.get("star_bot", path).status_code == 403
    assert "health" not in world.get("star_bot", model_path).json()["contexts"]  # now cached
    assert world.store.unrestrict("health")
    _within_a_second(lambda: world.get("star_bot", path).status_code == 200)
    model = world.get("star_bot", model_path).json()
    assert set(model["contexts"]) == {"support", "billing", "health"}
    assert world.store.restrict("health")
    _within_a_second(lambda: world.get("star_bot", path).status_code == 403)
    assert "health" not in world.get("star_bot", model_path).json()["contexts"]


# -- writes: scope, restricted contexts and the source binding -------------------------------


def test_post_observation_scope_and_source_binding(world, settings):
    ok = [
        ("support_bot", {}),
        ("star_bot", {"context": "billing"}),
        ("nurse_bot", {"context": "health"}),
        ("doctor_bot", {"context": "billing"}),
        ("writer_bot", {}),
        ("admin", {"source": "triage_agent"}),
    ]
    produced = []
    for who, overrides in ok:
        body = {"source": who, **overrides}
        response = world.post(who, **body)
        assert response.status_code == 201, (who, response.text)
        produced.append(response.json()["event_id"])

    # Another agent's source: 403, whatever the scopes (admin included).
    for who in ("support_bot", "star_bot", "admin"):
        response = world.post(who, source="billing_agent")
        assert_403(response, "source 'billing_agent' is not this key's agent")
        assert "'billing_agent' needs its own key" in response.json()["detail"]
    # Contexts outside the write scope, and a restricted context under *.
    assert_403(world.post("support_bot", context="billing"),
               "may not write context 'billing'", "not in its write scope (support)",
               "--write billing")
    assert_403(world.post("nurse_bot", context="support"), "may not write context 'support'")
    assert_403(world.post("star_bot", context="health"), "'health' is restricted",
               "--write health")
    # doctor_bot reads health explicitly, but writes only *: not health.
    assert_403(world.post("doctor_bot", context="health"), "'health' is restricted")
    # Validation still comes first: a malformed observation is a 422 naming the field.
    bad = world.post("support_bot", confidence=2)
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "confidence"]

    # Exactly the allowed observations reached the topic, each with the key's agent as source.
    serde = AvroSerde.for_settings(settings) if hasattr(AvroSerde, "for_settings") else AvroSerde()
    events = [serde.decode(m.value).event
              for m in read_topic(settings.kafka_bootstrap_servers, settings.topic)]
    posted = {e.event_id: e.source for e in events if e.event_id in produced}
    assert posted == dict(zip(produced, [who if who != "admin" else "triage_agent"
                                         for who, _ in ok], strict=True))
    assert len(events) == 4 + len(ok)  # the fixture's four observations and these


def test_whoami_and_admin_keys(world):
    me = world.get("doctor_bot", "/v1/whoami").json()
    assert me["agent"] == "doctor_bot" and me["read"] == ["*", "health"]
    assert me["restricted_contexts"] == ["health"] and me["admin"] is False and me["auth"]
    assert_403(world.get("doctor_bot", "/v1/admin/keys"), "not an admin key", "--admin")
    keys = world.get("admin", "/v1/admin/keys")
    assert keys.status_code == 200, keys.text
    listed = {k["agent"]: k for k in keys.json()}
    assert set(listed) == {"triage_agent", *[w for w in world.keys if w != "admin"]}
    assert listed["revoked_bot"]["revoked_at"] is not None
    assert "secret" not in keys.text and "hash" not in keys.text


# -- limits --------------------------------------------------------------------------------


def test_rate_limit_per_key_answers_429_with_retry_after(settings, engine, make_key):
    limited = replace(settings, rate_limit=0.5, rate_burst=2)
    server = ApiServer(limited, "127.0.0.1", free_port()).start_in_thread()
    try:
        first, second = make_key("first_bot", read="*"), make_key("second_bot", read="*")
        with httpx.Client(base_url=server.url, timeout=30) as http:
            statuses = [http.get("/v1/whoami", headers=bearer(first)).status_code
                        for _ in range(3)]
            assert statuses == [200, 200, 429], statuses
            refused = http.get("/v1/subjects/anyone/self-model", headers=bearer(first))
            assert refused.status_code == 429
            retry_after = refused.headers["retry-after"]
            assert retry_after in ("1", "2"), retry_after  # ~1 token at 0.5/s
            detail = refused.json()["detail"]
            assert "rate limit of 0.5 requests/s (bursts of 2)" in detail, detail
            assert "first_bot" in detail and "BELIEFSTORE_RATE_LIMIT" in detail, detail
            assert f"retry after {retry_after} s" in detail, detail
            # Per key: another key still has its burst; the open endpoints are not limited.
            assert http.get("/v1/whoami", headers=bearer(second)).status_code == 200
            assert all(http.get("/healthz").status_code == 200 for _ in range(5))
            # Failed authentications are limited per client address (no scrypt for free).
            bad = [http.get("/v1/whoami", headers=bearer(f"bsk_{'0' * 16}_{'1' * 48}"))
                   for _ in range(3)]
            assert [r.status_code for r in bad] == [401, 401, 429], [r.text for r in bad]
            assert "too many failed authentications" in bad[-1].json()["detail"]
            assert bad[-1].headers["retry-after"]
    finally:
        server.stop()


def test_oversized_body_is_413_with_a_clear_message(world, settings):
    assert settings.max_body_bytes == 64 * 1024
    headers = bearer(world.keys["support_bot"])
    body = {"subject_id": SUBJECT, "context": "support", "attribute": "issue", "value": "refund",
            "confidence": 0.8, "source": "support_bot"}
    # The largest valid evidence fits in the limit.
    fits = httpx.post(world.url + "/v1/observations", headers=headers, timeout=30,
                      json={**body, "evidence": "e" * 16384})
    assert fits.status_code == 201, fits.text
    # Declared Content-Length over the limit.
    huge = httpx.post(world.url + "/v1/observations", headers=headers, timeout=30,
                      json={**body, "evidence": "e" * 70_000})
    assert huge.status_code == 413, huge.text
    detail = huge.json()["detail"]
    assert "the limit is 65536 bytes" in detail and "BELIEFSTORE_MAX_BODY_BYTES" in detail, detail

    # Chunked (no Content-Length): read up to the limit, then refused.
    def chunks() -> Iterator[bytes]:
        yield json.dumps(body)[:-1].encode() + b', "evidence": "'
        for _ in range(40):
            yield b"x" * 4096
        yield b'"}'

    chunked = httpx.post(world.url + "/v1/observations", timeout=30, content=chunks(),
                         headers={**headers, "content-type": "application/json"})
    assert chunked.status_code == 413, chunked.text
    assert "larger than the limit of 65536 bytes" in chunked.json()["detail"]
    # Without a key, too: the size is checked before anything else.
    assert httpx.post(world.url + "/v1/observations", content=b"x" * 70_000,
                      timeout=30).status_code == 413
    # Only the observation that fits was produced.
    posted = [m for m in read_topic(settings.kafka_bootstrap_servers, settings.topic)
              if b"support_bot" in m.value]
    assert len(posted) == 1


# -- the access log --------------------------------------------------------------------------


def test_reads_by_two_agents_show_in_the_access_log(world, settings, tmp_path):
    assert world.get("support_bot", READS["self-model"].format(s=SUBJECT)).status_code == 200
    assert world.get("support_bot", trace_path("support", "emotional_state")).status_code == 200
    assert world.get("doctor_bot", READS["beliefs"].format(s=SUBJECT)).status_code == 200
    assert world.get("doctor_bot", trace_path("health", "condition", "history")).status_code == 200
    # Refused and not-found reads are not records of a look at the subject.
    assert world.get("support_bot", trace_path("billing", "plan")).status_code == 403
    assert world.get("star_bot", READS["self-model"].format(s=HEALTH_ONLY)).status_code == 404
    # Another subject's reads are not listed.
    assert world.get("nurse_bot", READS["self-model"].format(s=HEALTH_ONLY)).status_code == 200
    # Not blocking on the broker: the records are produced in the background; stopping
    # the API flushes them.
    world.server.stop()
    logger = world.server.server.config.app.state.beliefstore.access
    assert logger.failed == 0 and logger.dropped == 0 and logger.produced == 5

    env = cli_env(settings, tmp_path, BELIEFSTORE_ACCESS_TOPIC=settings.access_topic)
    result = run(["access-log", "--subject", SUBJECT, "--json"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    key_of = {who: split_token(key)[0] for who, key in world.keys.items()}
    assert [(r["agent"], r["key_id"], r["endpoint"], r["contexts"], r["attribute"])
            for r in records] == [
        ("support_bot", key_of["support_bot"], "self-model", ["support"], None),
        ("support_bot", key_of["support_bot"], "trace", ["support"], "emotional_state"),
        ("doctor_bot", key_of["doctor_bot"], "beliefs", ["billing", "health", "support"], None),
        ("doctor_bot", key_of["doctor_bot"], "history", ["health"], "condition"),
    ]
    assert all(r["subject_id"] == SUBJECT and r["at"] > T0 for r in records)
    assert "4 read(s) of user-sec by 2 agent(s): doctor_bot, support_bot" in flat(result.stderr)

    table = run(["access-log", "-s", SUBJECT], env, tmp_path)
    assert table.returncode == 0, table.stderr
    out = table.stdout
    assert out.count("support_bot") == 2 and out.count("doctor_bot") == 2, out
    assert "billing, health, support" in out and "emotional_state" in out, out
    only = run(["access-log", "-s", SUBJECT, "--agent", "doctor_bot", "--json"], env, tmp_path)
    assert {json.loads(x)["agent"] for x in only.stdout.splitlines()} == {"doctor_bot"}

    nobody = run(["access-log", "-s", "nobody-read-this"], env, tmp_path)
    assert nobody.returncode == 1
    assert "0 read(s) of nobody-read-this" in flat(nobody.stderr)


def test_access_log_records_are_produced_without_waiting_for_the_read(world, settings):
    """Reads answer while records are still queued, and records arrive on the topic
    (batched, in the subject's partition) while the API keeps running."""
    for _ in range(3):
        assert world.get("star_bot", READS["self-model"].format(s=SUBJECT)).status_code == 200
    deadline = time.monotonic() + 20
    while True:
        messages = read_topic(settings.kafka_bootstrap_servers, settings.access_topic)
        entries = [(m, e) for m in messages for e in parse_message(m.value)[0]]
        if len(entries) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(entries) == 3
    # three reads within one flush interval or two: fewer Kafka records than reads
    assert 1 <= len(messages) <= 3
    assert {e.subject_id for _, e in entries} == {SUBJECT}
    assert {e.agent for _, e in entries} == {"star_bot"}
    assert {m.partition for m, _ in entries} == {
        partition_of_key(settings.access_topic, SUBJECT.encode(), settings.partitions)}


# -- the commands ----------------------------------------------------------------------------


def test_keys_create_list_revoke_round_trip(settings, engine, api_url, tmp_path, key_store):
    env = cli_env(settings, tmp_path, api_url)
    created = run(["keys", "create", "--agent", "cli_agent", "--read", "support,billing",
                   "--read", "*", "--write", "support"], env, tmp_path)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    key_id, secret = split_token(token)
    assert "only time the key is shown" in flat(created.stderr)
    assert f"API key {key_id} for agent 'cli_agent': reads *,billing,support, writes support" \
        in flat(created.stderr), created.stderr

    as_json = run(["keys", "create", "--agent", "ops", "--admin", "--json"], env, tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    ops = json.loads(as_json.stdout)
    assert ops["admin"] is True and ops["read"] == [] and ops["key"].startswith("bsk_")

    # The key works against the API, with its scopes.
    me = httpx.get(f"{api_url}/v1/whoami", headers=bearer(token), timeout=10)
    assert me.status_code == 200 and me.json()["agent"] == "cli_agent"
    assert me.json()["read"] == ["*", "billing", "support"] and me.json()["write"] == ["support"]

    listed = run(["keys", "list", "--json"], env, tmp_path)
    assert listed.returncode == 0, listed.stderr
    rows = {k["key_id"]: k for k in json.loads(listed.stdout)}
    assert rows[key_id]["agent"] == "cli_agent" and rows[key_id]["revoked_at"] is None
    assert secret not in listed.stdout
    table = run(["keys", "list"], env, tmp_path)
    assert key_id in table.stdout and "active" in table.stdout

    # No plaintext secret anywhere in the stored table.
    with key_store.engine.connect() as conn:
        stored = [dict(r._mapping) for r in conn.execute(sa.select(key_store.keys))]
    assert len(stored) == 2
    dump = repr(stored)
    for needle in (secret, token, secret.encode().hex()):
        assert needle not in dump
    for row in stored:
        assert len(row["secret_hash"]) == 32 and len(row["salt"]) == 16
        assert row["kdf"].startswith("scrypt:n=16384")
        assert secret.encode() not in bytes(row["secret_hash"])

    revoked = run(["keys", "revoke", key_id], env, tmp_path)
    assert revoked.returncode == 0, revoked.stderr
    assert f"revoked API key {key_id} of agent 'cli_agent'" in flat(revoked.stdout)
    refused = httpx.get(f"{api_url}/v1/whoami", headers=bearer(token), timeout=10)
    assert refused.status_code == 401 and "revoked" in refused.json()["detail"]
    again = run(["keys", "revoke", key_id], env, tmp_path)
    assert again.returncode == 0 and "already revoked" in flat(again.stdout)
    active = json.loads(run(["keys", "list", "--active", "--json"], env, tmp_path).stdout)
    assert [k["agent"] for k in active] == ["ops"]
    unknown = run(["keys", "revoke", "0123456789abcdef"], env, tmp_path)
    assert unknown.returncode == 1 and "no API key '0123456789abcdef'" in flat(unknown.stderr)



def test_keys_create_refuses_bad_arguments_before_touching_the_database():
    from typer.testing import CliRunner

    from beliefstore.cli import app

    runner = CliRunner()
    env = {"DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none", "COLUMNS": "200"}
    for args, message in ((["--agent", "bad agent", "--read", "*"], "agent 'bad agent'"),
                          (["--agent", "x", "--read", "no spaces"], "context 'no spaces'"),
                          (["--agent", "x"], "--read and/or --write")):
        result = runner.invoke(app, ["keys", "create", *args], env=env)
        assert result.exit_code == 2, (args, result.output)
        assert message in flat(result.output), (args, result.output)


def test_contexts_restrict_and_unrestrict_commands(settings, engine, tmp_path, key_store):
    env = cli_env(settings, tmp_path)
    result = run(["contexts", "restrict", "health", "--reason", "GDPR art. 9"], env, tmp_path)
    assert result.returncode == 0 and "now restricted" in flat(result.stdout), result.stderr
    assert key_store.restricted() == {"health"}
    listed = run(["contexts", "list"], env, tmp_path)
    assert "health" in listed.stdout and "GDPR art. 9" in listed.stdout
    created = run(["keys", "create", "--agent", "a", "--read", "*"], env, tmp_path)
    assert "* does not cover the restricted context(s) health" in flat(created.stderr)
    assert "already restricted" in run(["contexts", "restrict", "health"], env, tmp_path).stdout
    result = run(["contexts", "unrestrict", "health"], env, tmp_path)
    assert result.returncode == 0 and "no longer restricted" in flat(result.stdout)
    assert key_store.restricted() == frozenset()


def test_read_commands_send_the_api_key(settings, engine, producer, projector, api_url,
                                        tmp_path, make_key):
    receipt = producer.observe("user-cli-key", "support", "mood", "calm", 0.7, "triage_agent",
                               occurred_at=T0)
    wait_caught_up(settings, [receipt])
    no_key = run(["self-model", "user-cli-key"], cli_env(settings, tmp_path, api_url), tmp_path)
    assert no_key.returncode == 1
    message = flat(no_key.stderr)
    assert "the API refused the request (401)" in message and "BELIEFSTORE_API_KEY" in message
    billing = make_key("billing_bot", read="billing")
    env = cli_env(settings, tmp_path, api_url, BELIEFSTORE_API_KEY=billing)
    refused = run(["trace", "user-cli-key", "support", "mood"], env, tmp_path)
    assert refused.returncode == 1
    assert "(403)" in flat(refused.stderr) and "may not read context 'support'" in flat(
        refused.stderr)
    env["BELIEFSTORE_API_KEY"] = make_key("support_bot", read="support")
    for args in (["self-model", "user-cli-key"], ["trace", "user-cli-key", "support", "mood"],
                 ["history", "user-cli-key", "support", "mood"]):
        result = run(args, env, tmp_path)
        assert result.returncode == 0, (args, result.stderr)
        assert "calm" in result.stdout


def test_up_creates_an_admin_key_on_first_start(settings, engine, tmp_path, key_store):
    port = free_port()
    env = cli_env(settings, tmp_path, BELIEFSTORE_API_PORT=str(port))
    proc = subprocess.Popen([str(BELIEFSTORE), "up"], env=env, cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines: list[str] = []

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    threading.Thread(target=reader, daemon=True).start()
    try:
        deadline = time.monotonic() + 60
        while not any("Press Ctrl-C" in line for line in lines):
            assert proc.poll() is None, (lines, proc.stderr.read() if proc.stderr else "")
            assert time.monotonic() < deadline, lines
            time.sleep(0.1)
        out = "".join(lines)
        assert "first start: created API key" in out and "agent 'admin'" in out, out
        assert "shown only this once" in out, out
        [token] = [w.split("=", 1)[1] for w in out.split() if w.startswith("BELIEFSTORE_API_KEY=")]
        me = httpx.get(f"http://127.0.0.1:{port}/v1/whoami", headers=bearer(token), timeout=10)
        assert me.status_code == 200, me.text
        assert me.json()["admin"] is True and me.json()["read"] == ["*"]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    # uvicorn re-raises the Ctrl-C it handled once everything stopped: 130 = 128 + SIGINT.
    assert proc.returncode in (0, 128 + signal.SIGINT, -signal.SIGINT), proc.returncode
    # Only on the first start: a key exists now, so none is made again.
    assert key_store.count() == 1 and key_store.create_first_admin_key() is None


# -- settings --------------------------------------------------------------------------------


def test_security_settings_from_the_environment():
    s = Settings.from_env({}, use_running=False)
    assert s.auth is True and s.max_body_bytes == 65536 and s.rate_limit == 50
    assert s.access_topic == "beliefstore.access" and s.kafka_client_config() == {}
    s = Settings.from_env({
        "BELIEFSTORE_AUTH": "off", "BELIEFSTORE_RATE_LIMIT": "0", "BELIEFSTORE_API_KEY": "bsk_x",
        "KAFKA_SECURITY_PROTOCOL": "sasl_ssl", "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "KAFKA_SASL_USERNAME": "beliefstore", "KAFKA_SASL_PASSWORD": "hunter2",
        "KAFKA_SSL_CAFILE": "/etc/ca.pem",
    }, use_running=False)
    assert s.auth is False and s.rate_limit == 0
    assert s.kafka_client_config() == {
        "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "beliefstore", "sasl_plain_password": "hunter2",
        "ssl_cafile": "/etc/ca.pem"}
    assert "hunter2" not in repr(s) and "bsk_x" not in repr(s)
    for env, name in (({"BELIEFSTORE_AUTH": "maybe"}, "BELIEFSTORE_AUTH"),
                      ({"KAFKA_SECURITY_PROTOCOL": "TLS"}, "KAFKA_SECURITY_PROTOCOL"),
                      ({"KAFKA_SASL_MECHANISM": "PLAIN"}, "KAFKA_SASL_MECHANISM"),
                      ({"BELIEFSTORE_RATE_LIMIT": "-1"}, "BELIEFSTORE_RATE_LIMIT"),
                      ({"BELIEFSTORE_MAX_BODY_BYTES": "0"}, "BELIEFSTORE_MAX_BODY_BYTES")):
        with pytest.raises(SettingsError, match=name):
            Settings.from_env(env, use_running=False)


def test_auth_off_serves_everyone_as_anonymous(settings, engine, producer, projector):
    receipt = producer.observe("user-open", "support", "mood", "calm", 0.7, "triage_agent",
                               occurred_at=T0)
    wait_caught_up(settings, [receipt])
    server = ApiServer(replace(settings, auth=False), "127.0.0.1", free_port()).start_in_thread()
    try:
        me = httpx.get(f"{server.url}/v1/whoami", timeout=10).json()
        assert me["agent"] == "anonymous" and me["auth"] is False
        model = httpx.get(f"{server.url}/v1/subjects/user-open/self-model", timeout=10)
        assert model.status_code == 200 and model.json()["belief_count"] == 1
        posted = httpx.post(f"{server.url}/v1/observations", timeout=30, json={
            "subject_id": "user-open", "context": "support", "attribute": "mood",
            "value": "ok", "confidence": 0.5, "source": "any_agent"})
        assert posted.status_code == 201, posted.text
    finally:
        server.stop()


def test_scope_parsing():
    assert parse_scope("support, billing") == {"support", "billing"}
    assert parse_scope(["*", "health"]) == {"*", "health"}
    assert parse_scope(None) == frozenset() and parse_scope("") == frozenset()
    with pytest.raises(ValueError, match="context 'a b'"):
        parse_scope("a b")
    assert split_token("bsk_" + "a" * 16 + "_" + "b" * 48) == ("a" * 16, "b" * 48)
