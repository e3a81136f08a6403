"""Discovery (``GET /v1/schemas``, ``/v1/schemas/{fingerprint}``, ``/v1/contexts``),
staleness (``max_age_s``, ``age_s``) and ``POST /v1/retractions`` on real services."""

from __future__ import annotations

import json
import uuid
from importlib import resources

import httpx

from beliefstore.events.serde import SchemaRegistry, schema_fingerprint
from tests import agentworld
from tests.agentworld import DAY_MS, HOUR_MS, SUBJECT, World

world = agentworld.world


def test_schemas_lists_every_avsc_with_its_fingerprint(world: World):
    body = world.get("reader_bot", "/v1/schemas").json()
    shipped = {item.name: json.loads(item.read_text())
               for item in resources.files("beliefstore.schemas").iterdir()
               if item.name.endswith(".avsc")}
    assert len(body["schemas"]) == len(shipped) == 4
    by_fp = {s["fingerprint"]: s for s in body["schemas"]}
    for name, document in shipped.items():
        fp = schema_fingerprint(document).hex()
        entry = by_fp[fp]
        assert entry["schema"] == document
        assert f"{entry['name'].rsplit('.', 1)[1]}.v{entry['version']}.avsc" == name
    current = {(s["name"], s["version"]) for s in body["schemas"] if s["current"]}
    assert current == {("beliefstore.ObservationRecorded", 2),
                       ("beliefstore.ObservationRetracted", 1), ("beliefstore.SubjectErased", 1)}
    # One by fingerprint: the writer schema named in a trace resolves.
    trace = world.get("triage_agent", f"/v1/subjects/{SUBJECT}/beliefs/support/issue/trace").json()
    fp = trace["events"][0]["writer_fingerprint"]
    one = world.get("reader_bot", f"/v1/schemas/{fp}")
    assert one.status_code == 200 and one.json() == by_fp[fp]
    assert SchemaRegistry.default().lookup(bytes.fromhex(fp)).name == one.json()["name"]
    missing = world.get("reader_bot", "/v1/schemas/00112233445566ff")
    assert missing.status_code == 404
    assert "GET /v1/schemas" in missing.json()["detail"] and fp in missing.json()["detail"]
    bad = world.get("reader_bot", "/v1/schemas/xyz")
    assert bad.status_code == 422 and "16 hex digits" in bad.json()["detail"][0]["msg"]
    assert httpx.get(world.url + "/v1/schemas", timeout=10).status_code == 401


def _contexts(world: World, who: str) -> dict[str, dict]:
    response = world.get(who, "/v1/contexts")
    assert response.status_code == 200, response.text
    return {c["context"]: c for c in response.json()["contexts"]}


def test_contexts_are_those_the_key_may_read(world: World):
    admin = _contexts(world, "triage_agent")
    assert set(admin) == {"support", "billing"}  # * does not cover the restricted health
    support = admin["support"]
    assert support["attributes"] == [{"attribute": "emotional_state", "belief_count": 2},
                                     {"attribute": "issue", "belief_count": 1}]
    assert support["belief_count"] == 3 and support["restricted"] is False
    assert support["half_life_s"] == world.settings.fold_settings.half_life_s("support")
    assert set(_contexts(world, "billing_agent")) == {"support", "billing"}
    assert set(_contexts(world, "support_bot")) == {"support"}
    doctor = _contexts(world, "doctor_bot")
    assert set(doctor) == {"support", "billing", "health"}
    assert doctor["health"]["restricted"] is True and doctor["health"]["belief_count"] == 1
    refused = world.get("writer_bot", "/v1/contexts")
    assert refused.status_code == 403 and "read scope is empty" in refused.json()["detail"]


def test_max_age_leaves_out_stale_beliefs_and_every_belief_has_its_age(world: World):
    path = f"/v1/subjects/{SUBJECT}/self-model"
    full = world.get("triage_agent", path).json()
    ages = {(b["context"], b["attribute"]): b["age_s"]
            for beliefs in full["contexts"].values() for b in beliefs}
    assert set(ages) == {("support", "emotional_state"), ("support", "issue"), ("billing", "plan")}
    assert 60 <= ages[("support", "emotional_state")] < 60 + 120
    assert 10 * DAY_MS / 1000 <= ages[("support", "issue")] < 10 * DAY_MS / 1000 + 120
    assert 2 * HOUR_MS / 1000 <= ages[("billing", "plan")] < 2 * HOUR_MS / 1000 + 120
    hour = world.get("triage_agent", path, max_age_s=3600).json()
    assert [b["attribute"] for bs in hour["contexts"].values() for b in bs] == ["emotional_state"]
    assert hour["belief_count"] == 1
    day = world.get("triage_agent", f"/v1/subjects/{SUBJECT}/beliefs", max_age_s=86400).json()
    assert {b["attribute"] for b in day["beliefs"]} == {"emotional_state", "plan"}
    filtered = world.get("triage_agent", f"/v1/subjects/{SUBJECT}/beliefs", context="support",
                         max_age_s=86400).json()
    assert [b["attribute"] for b in filtered["beliefs"]] == ["emotional_state"]
    # A past view measures age to as_of: ten days ago the issue was about a minute old.
    from datetime import UTC, datetime

    as_of = datetime.fromtimestamp((world.now_ms - 10 * DAY_MS + 120_000) / 1000, UTC)
    past = world.get("triage_agent", path, as_of=as_of.isoformat(), time="occurred",
                     max_age_s=3600).json()
    issue = past["contexts"]["support"][0]
    assert issue["attribute"] == "issue" and 0 <= issue["age_s"] <= 180
    trace = world.get("triage_agent", f"/v1/subjects/{SUBJECT}/beliefs/billing/plan/trace").json()
    assert trace["belief"]["age_s"] >= 7200
    for bad in ("0", "-5", "soon"):
        response = world.get("triage_agent", path, max_age_s=bad)
        assert response.status_code == 422 and response.json()["detail"][0]["loc"] == [
            "query", "max_age_s"]


def test_retraction_endpoint_withdraws_only_the_keys_own_observations(world: World):
    receipt = world.receipts["support/emotional_state"]
    # billing_agent may write, but not as triage_agent.
    other = world.post("billing_agent", "/v1/retractions", {
        "subject_id": SUBJECT, "retracted_event_id": receipt.event_id, "source": "triage_agent"})
    assert other.status_code == 403
    assert "retracts only its own observations" in other.json()["detail"]
    reader = world.post("reader_bot", "/v1/retractions", {
        "subject_id": SUBJECT, "retracted_event_id": receipt.event_id})
    assert reader.status_code == 403 and "write scope is empty" in reader.json()["detail"]
    invalid = world.post("triage_agent", "/v1/retractions", {
        "subject_id": SUBJECT, "retracted_event_id": "not-a-uuid"})
    assert invalid.status_code == 422
    assert invalid.json()["detail"][0]["loc"] == ["body", "retracted_event_id"]
    unknown_field = world.post("triage_agent", "/v1/retractions", {
        "subject_id": SUBJECT, "retracted_event_id": receipt.event_id, "context": "support"})
    assert unknown_field.status_code == 422
    retraction_id = str(uuid.uuid4())
    ok = world.post("triage_agent", "/v1/retractions", {
        "subject_id": SUBJECT, "retracted_event_id": receipt.event_id, "reason": "wrong customer",
        "event_id": retraction_id})
    assert ok.status_code == 201, ok.text
    body = ok.json()
    assert body["event_id"] == retraction_id and body["topic"] == world.settings.topic
    from beliefstore.events.producer import Receipt

    world.wait_for([Receipt(**body)])
    gone = world.get("triage_agent", f"/v1/subjects/{SUBJECT}/beliefs", context="support").json()
    assert [b["attribute"] for b in gone["beliefs"]] == ["issue"]
    trace = world.get("triage_agent",
                      f"/v1/subjects/{SUBJECT}/beliefs/support/emotional_state/trace").json()
    statuses = {e["event_id"]: e["status"] for e in trace["events"]}
    assert statuses == {receipt.event_id: "retracted", retraction_id: "retraction"}
