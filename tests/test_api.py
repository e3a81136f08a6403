"""The HTTP API against real services: ingest (201 and every 422), reads, filters, 404s,
traces with Kafka coordinates, OpenAPI and health endpoints.

Authentication is on (the default): every call sends ``auth``, an all-contexts admin key
of agent ``triage_agent`` (see conftest). Keys, scopes and limits: test_security.py."""

from __future__ import annotations

import json
import uuid
from dataclasses import replace

import httpx
import pytest

from beliefstore.embedded import free_port
from beliefstore.events.model import ObservationRecorded
from beliefstore.events.producer import BeliefProducer, Receipt
from beliefstore.events.serde import AvroSerde
from beliefstore.projector.fold import logit
from beliefstore.runtime.serve import ApiServer, ProjectorThread
from beliefstore.timefmt import from_millis
from tests.conftest import read_topic, wait_caught_up

T0 = 1767225600000  # 2026-01-01T00:00:00Z


def observation(**overrides) -> dict:
    body = {
        "subject_id": "user-api",
        "context": "support",
        "attribute": "emotional_state",
        "value": "frustrated",
        "confidence": 0.88,
        "source": "triage_agent",
        "evidence": "msg-1842",
        "metadata": {"model": "gpt-x", "session_id": "s-77"},
        "occurred_at": T0,
    }
    body.update(overrides)
    return body


def _dt(text: str):
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# -- POST /v1/observations ---------------------------------------------------------------


def test_post_observation_is_produced_and_projected(settings, engine, api_url, projector, auth):
    event_id = str(uuid.uuid4())
    response = httpx.post(f"{api_url}/v1/observations",
                          json=observation(event_id=event_id), timeout=30, headers=auth)
    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == {"event_id", "topic", "partition", "offset"}
    assert body["event_id"] == event_id
    assert body["topic"] == settings.topic
    assert 0 <= body["partition"] < settings.partitions
    assert body["offset"] >= 0

    # Really on the topic, at the returned coordinates, decodable with the shipped schemas.
    messages = read_topic(settings.kafka_bootstrap_servers, settings.topic)
    assert [(m.partition, m.offset) for m in messages] == [(body["partition"], body["offset"])]
    assert messages[0].key == b"user-api"
    event = AvroSerde.for_settings(settings).decode(messages[0].value).event
    assert isinstance(event, ObservationRecorded)
    assert (event.event_id, event.subject_id, event.context, event.attribute, event.value,
            event.confidence, event.source, event.evidence, event.occurred_at) == (
        event_id, "user-api", "support", "emotional_state", "frustrated", 0.88, "triage_agent",
        "msg-1842", T0)
    assert dict(event.metadata) == {"model": "gpt-x", "session_id": "s-77"}

    # And it ends up in the self-model once projected.
    wait_caught_up(settings, [Receipt(**body)])
    model = httpx.get(f"{api_url}/v1/subjects/user-api/self-model", headers=auth).json()
    assert model["belief_count"] == 1
    [belief] = model["contexts"]["support"]
    assert belief["attribute"] == "emotional_state"
    assert belief["value"] == "frustrated"
    assert belief["confidence"] == pytest.approx(0.88, abs=1e-6)
    assert belief["support"] == [event_id]
    assert belief["sources"] == ["triage_agent"]


def test_post_observation_with_iso_time_and_defaults(settings, engine, api_url, make_key):
    sales = {"Authorization": f"Bearer {make_key('sales_bot', write='billing')}"}
    response = httpx.post(f"{api_url}/v1/observations", timeout=30, headers=sales, json={
        "subject_id": "user-iso", "context": "billing", "attribute": "plan", "value": "pro",
        "confidence": 1, "source": "sales_bot", "occurred_at": "2026-01-01T01:00:00+01:00",
    })
    assert response.status_code == 201, response.text
    body = response.json()
    uuid.UUID(body["event_id"])  # a generated UUID
    [message] = read_topic(settings.kafka_bootstrap_servers, settings.topic)
    event = AvroSerde.for_settings(settings).decode(message.value).event
    assert event.event_id == body["event_id"]
    assert event.occurred_at == T0  # 01:00+01:00 is midnight UTC
    assert event.confidence == 1.0 and event.evidence is None and dict(event.metadata) == {}


BAD_OBSERVATIONS = [
    ("confidence_above_one", observation(confidence=1.5), ["confidence"]),
    ("confidence_below_zero", observation(confidence=-0.1), ["confidence"]),
    ("empty_subject_id", observation(subject_id=""), ["subject_id"]),
    ("blank_subject_id", observation(subject_id="   "), ["subject_id"]),
    ("empty_source", observation(source=""), ["source"]),
    ("unknown_field", {**observation(), "colour": "blue"}, ["colour"]),
    ("value_number", observation(value=42), ["value"]),
    ("value_null", observation(value=None), ["value"]),
    ("value_too_long", observation(value="x" * 4097), ["value"]),
    ("evidence_too_long", observation(evidence="e" * 16385), ["evidence"]),
    ("context_with_space", observation(context="customer support"), ["context"]),
    ("event_id_not_uuid", observation(event_id="not-a-uuid"), ["event_id"]),
    ("metadata_value_not_string", observation(metadata={"model": 3}), ["metadata", "model"]),
    ("occurred_at_without_timezone", observation(occurred_at="2026-01-01T00:00:00"),
     ["occurred_at"]),
    ("missing_confidence", {k: v for k, v in observation().items() if k != "confidence"},
     ["confidence"]),
]


def _locs(response: httpx.Response) -> list[list]:
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail, detail
    for item in detail:
        assert item["msg"], item
    return [item["loc"] for item in detail]


def _names(loc: list, field_path: list[str]) -> bool:
    """Whether ``loc`` names the field: ``["body", "value"]``, or ``["body", "metadata.model"]``
    for our validation, or pydantic's ``["body", "metadata", "model"]``."""
    return loc[0] == "body" and (loc[1:] == field_path or loc[1:] == [".".join(field_path)])


def test_bad_observations_are_refused_with_the_field_and_nothing_is_produced(settings, api_url,
                                                                            auth):
    with httpx.Client(base_url=api_url, timeout=30, headers=auth) as http:
        for name, body, field_path in BAD_OBSERVATIONS:
            response = http.post("/v1/observations", json=body)
            assert response.status_code == 422, (name, response.text)
            locs = _locs(response)
            assert any(_names(loc, field_path) for loc in locs), (name, locs)

        # NaN is not JSON, but Python's json accepts it: send the raw text.
        raw = json.dumps(observation()).replace('"confidence": 0.88', '"confidence": NaN')
        assert "NaN" in raw
        response = http.post("/v1/observations", content=raw,
                             headers={"content-type": "application/json", **auth})
        assert response.status_code == 422, response.text
        assert any(_names(loc, ["confidence"]) for loc in _locs(response)), response.text

    # After all the refused posts, nothing at all was produced.
    assert read_topic(settings.kafka_bootstrap_servers, settings.topic) == []

    # Control: a valid post on the same topic is found by the same read.
    ok = httpx.post(f"{api_url}/v1/observations", json=observation(subject_id="control"),
                    timeout=30, headers=auth)
    assert ok.status_code == 201, ok.text
    messages = read_topic(settings.kafka_bootstrap_servers, settings.topic)
    serde = AvroSerde.for_settings(settings)
    assert [serde.decode(m.value).event.subject_id for m in messages] == ["control"]


# -- reads: 404s and filters -------------------------------------------------------------


def test_unknown_subject_and_attribute_are_404_with_a_helpful_message(
    settings, engine, producer, projector, api_url, auth
):
    receipt = producer.observe("user-known", "support", "emotional_state", "calm", 0.7,
                               source="triage_agent", occurred_at=T0)
    wait_caught_up(settings, [receipt])
    with httpx.Client(base_url=api_url, timeout=10, headers=auth) as http:
        for path in ("/v1/subjects/nobody-here/self-model",
                     "/v1/subjects/nobody-here/beliefs",
                     "/v1/subjects/nobody-here/beliefs/support/emotional_state/trace"):
            response = http.get(path)
            assert response.status_code == 404, (path, response.text)
            detail = response.json()["detail"]
            assert isinstance(detail, str)
            assert "'nobody-here'" in detail and "no beliefs or observations" in detail, detail
            assert "projector" in detail  # says how to fix it

        response = http.get("/v1/subjects/user-known/beliefs/support/no_such_attribute/trace")
        assert response.status_code == 404, response.text
        detail = response.json()["detail"]
        assert "'user-known'" in detail and "support/no_such_attribute" in detail, detail

        # The known key itself answers 200.
        assert http.get("/v1/subjects/user-known/beliefs/support/emotional_state/trace"
                        ).status_code == 200


def test_beliefs_filters_by_context_and_min_confidence(
    settings, engine, producer, projector, api_url, auth
):
    s = "user-filter"
    receipts = [
        producer.observe(s, "support", "emotional_state", "frustrated", 0.9, "triage_agent",
                         occurred_at=T0),
        producer.observe(s, "support", "expertise_level", "high", 0.6, "triage_agent",
                         occurred_at=T0),
        producer.observe(s, "billing", "plan_status", "cancelled", 0.95, "billing_agent",
                         occurred_at=T0),
        producer.observe(s, "billing", "payment_method", "card", 0.55, "billing_agent",
                         occurred_at=T0),
    ]
    wait_caught_up(settings, receipts)

    def get(**params):
        response = httpx.get(f"{api_url}/v1/subjects/{s}/beliefs", params=params, timeout=10,
                             headers=auth)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["subject_id"] == s
        return [(b["context"], b["attribute"]) for b in body["beliefs"]]

    assert get() == [("billing", "payment_method"), ("billing", "plan_status"),
                     ("support", "emotional_state"), ("support", "expertise_level")]
    assert get(context="support") == [("support", "emotional_state"),
                                      ("support", "expertise_level")]
    assert get(min_confidence=0.8) == [("billing", "plan_status"),
                                       ("support", "emotional_state")]
    assert get(context="billing", min_confidence=0.9) == [("billing", "plan_status")]
    assert get(context="billing", min_confidence=0.99) == []  # known subject: 200, empty
    assert get(context="purchase_motivation") == []

    for bad in ("1.5", "-0.1", "high"):
        response = httpx.get(f"{api_url}/v1/subjects/{s}/beliefs",
                             params={"min_confidence": bad}, timeout=10, headers=auth)
        assert response.status_code == 422, (bad, response.text)
        assert ["query", "min_confidence"] in _locs(response), response.text


# -- trace -------------------------------------------------------------------------------


def test_trace_explains_every_status_with_kafka_coordinates(settings, engine, auth):
    settings = replace(settings, half_lives={"support": 7200.0}, trust={"billing_agent": 2.0})
    s, ctx, attr = "user-trace", "support", "emotional_state"
    ids = {name: str(uuid.uuid4()) for name in
           ("old", "new", "mistaken", "retraction", "billing", "foreign_retraction")}
    with BeliefProducer.from_settings(settings) as producer:
        r = {
            # triage says frustrated, then changes its mind: the first is superseded.
            "old": producer.observe(s, ctx, attr, "frustrated", 0.7, "triage_agent",
                                    occurred_at=T0, event_id=ids["old"]),
            # sentiment says calm, then retracts it itself.
            "mistaken": producer.observe(s, ctx, attr, "calm", 0.9, "sentiment_agent",
                                         occurred_at=T0 + 1000, event_id=ids["mistaken"]),
            # billing says angry; sentiment tries to retract it (not its source: ignored).
            "billing": producer.observe(s, ctx, attr, "angry", 0.8, "billing_agent",
                                        evidence="msg-9", occurred_at=T0 + 1500,
                                        event_id=ids["billing"]),
            "new": producer.observe(s, ctx, attr, "angry", 0.75, "triage_agent",
                                    occurred_at=T0 + 3_600_000, event_id=ids["new"]),
            "retraction": producer.retract(s, ids["mistaken"], "sentiment_agent",
                                           reason="wrong conversation", occurred_at=T0 + 3000,
                                           event_id=ids["retraction"]),
            "foreign_retraction": producer.retract(s, ids["billing"], "sentiment_agent",
                                                   occurred_at=T0 + 4000,
                                                   event_id=ids["foreign_retraction"]),
        }
        # A second subject, erased after one observation; a later observation still counts.
        e = "user-erased"
        erased_ids = {"before": str(uuid.uuid4()), "after": str(uuid.uuid4())}
        r["erased_before"] = producer.observe(e, ctx, attr, "sad", 0.9, "triage_agent",
                                              evidence="msg-secret", occurred_at=T0,
                                              event_id=erased_ids["before"])
        r["erasure"] = producer.erase(e, "privacy_bot", reason="GDPR request",
                                      occurred_at=T0 + 1000)
        r["erased_after"] = producer.observe(e, ctx, attr, "calm", 0.6, "sentiment_agent",
                                             occurred_at=T0 + 2000,
                                             event_id=erased_ids["after"])
    projector = ProjectorThread(settings)
    projector.start()
    server = ApiServer(settings, "127.0.0.1", free_port()).start_in_thread()
    try:
        wait_caught_up(settings, r.values())
        response = httpx.get(f"{server.url}/v1/subjects/{s}/beliefs/{ctx}/{attr}/trace",
                             headers=auth)
        assert response.status_code == 200, response.text
        t = response.json()
        erased_response = httpx.get(f"{server.url}/v1/subjects/{e}/beliefs/{ctx}/{attr}/trace",
                                    headers=auth)
        assert erased_response.status_code == 200, erased_response.text
        et = erased_response.json()
    finally:
        server.stop()
        projector.stop()
    assert projector.error is None

    assert (t["subject_id"], t["context"], t["attribute"]) == (s, ctx, attr)
    assert t["half_life_s"] == 7200.0
    assert t["trust"] == {"billing_agent": 2.0, "sentiment_agent": 1.0, "triage_agent": 1.0}
    events = {ev["event_id"]: ev for ev in t["events"]}
    assert set(events) == set(ids.values())
    # Sorted by (occurred_at, event_id).
    assert [ev["event_id"] for ev in t["events"]] == [
        ids[n] for n in ("old", "mistaken", "billing", "retraction", "foreign_retraction", "new")
    ]

    expected = {
        "old": ("observed", "superseded", f"superseded by {ids['new']} of the same source"),
        "mistaken": ("observed", "retracted", f"retracted by {ids['retraction']}"),
        "retraction": ("retracted", "retraction", f"retracts {ids['mistaken']}"),
        "billing": ("observed", "counting", None),
        "foreign_retraction": ("retracted", "retraction_ignored",
                               f"retraction of {ids['billing']} by sentiment_agent, "
                               "not its source billing_agent"),
        "new": ("observed", "counting", None),
    }
    for name, (kind, status, reason) in expected.items():
        ev = events[ids[name]]
        assert (ev["type"], ev["status"], ev["reason"]) == (kind, status, reason), (name, ev)
        assert ev["kafka"] == {"topic": settings.topic, "partition": r[name].partition,
                               "offset": r[name].offset}, name
        assert ev["recorded_at"] is not None
        assert len(ev["writer_fingerprint"]) == 16
        int(ev["writer_fingerprint"], 16)
        if status == "counting":
            assert ev["weight"] is not None and ev["decay"] is not None, name
        else:
            assert ev["weight"] is None and ev["decay"] is None, name

    # Weights: trust · logit(c) · 2^(−age/H), t_ref = the newest counting observation.
    billing, new = events[ids["billing"]], events[ids["new"]]
    assert new["decay"] == pytest.approx(1.0)
    assert new["weight"] == pytest.approx(logit(0.75))
    age_s = (3_600_000 - 1500) / 1000
    assert billing["decay"] == pytest.approx(2 ** (-age_s / 7200))
    assert billing["weight"] == pytest.approx(2.0 * logit(0.8) * billing["decay"])
    assert billing["value"] == "angry" and billing["evidence"] == "msg-9"
    assert billing["confidence"] == 0.8
    assert _dt(billing["occurred_at"]) == from_millis(T0 + 1500)
    retraction = events[ids["retraction"]]
    assert retraction["value"] is None and retraction["confidence"] is None
    assert retraction["retracted_event_id"] == ids["mistaken"]
    assert events[ids["mistaken"]]["value"] == "calm"  # retracted, not erased: still shown

    belief = t["belief"]
    assert belief["value"] == "angry"
    assert sorted(belief["support"]) == sorted([ids["billing"], ids["new"]])
    assert belief["sources"] == ["billing_agent", "triage_agent"]
    assert belief["source_count"] == 2
    assert belief["alternatives"] == {}

    # The erased subject: the observation before the erasure is erased, its value and
    # evidence withheld; the later one counts.
    ev_events = {ev["event_id"]: ev for ev in et["events"]}
    assert set(ev_events) == set(erased_ids.values())
    before, after = ev_events[erased_ids["before"]], ev_events[erased_ids["after"]]
    assert before["status"] == "erased"
    assert before["reason"] == f"subject erased by {r['erasure'].event_id}"
    assert before["value"] is None and before["evidence"] is None
    assert before["weight"] is None and before["decay"] is None
    assert before["kafka"]["partition"] == r["erased_before"].partition
    assert before["kafka"]["offset"] == r["erased_before"].offset
    assert after["status"] == "counting" and after["value"] == "calm"
    assert after["kafka"]["offset"] == r["erased_after"].offset
    assert et["belief"]["value"] == "calm" and et["belief"]["support"] == [erased_ids["after"]]
    assert et["trust"] == {"sentiment_agent": 1.0, "triage_agent": 1.0}


# -- OpenAPI and health ------------------------------------------------------------------


def test_openapi_and_docs_are_served(api_url):
    spec = httpx.get(f"{api_url}/openapi.json", timeout=10)
    assert spec.status_code == 200
    paths = spec.json()["paths"]
    for path in ("/v1/subjects/{subject_id}/self-model",
                 "/v1/subjects/{subject_id}/beliefs",
                 "/v1/subjects/{subject_id}/beliefs/{context}/{attribute}/trace",
                 "/v1/observations", "/healthz", "/readyz"):
        assert path in paths, path
    assert "post" in paths["/v1/observations"]
    docs = httpx.get(f"{api_url}/docs", timeout=10)
    assert docs.status_code == 200
    assert docs.headers["content-type"].startswith("text/html")
    assert "swagger" in docs.text.lower()


def test_health_and_readiness(settings, engine, producer, api_url):
    health = httpx.get(f"{api_url}/healthz", timeout=10)
    assert health.status_code == 200 and health.json() == {"status": "ok"}

    # Before any projector batch, the lag is unknown.
    ready = httpx.get(f"{api_url}/readyz", timeout=30)
    assert ready.status_code == 200, ready.text
    assert ready.json()["projection_lag"] is None

    receipts = [producer.observe(f"user-ready-{i}", "support", "mood", "ok", 0.6, "bot",
                                 occurred_at=T0) for i in range(3)]
    projector = ProjectorThread(settings)
    projector.start()
    try:
        wait_caught_up(settings, receipts)
    finally:
        projector.stop()
    assert projector.error is None

    ready = httpx.get(f"{api_url}/readyz", timeout=30)
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["ready"] is True
    assert body["database"]["ok"] is True
    assert body["broker"]["ok"] is True
    assert isinstance(body["projection_lag"], int) and not isinstance(body["projection_lag"], bool)
    assert body["projection_lag"] == 0


# -- POST /v1/observations:batch ---------------------------------------------------------


def test_batch_stores_the_valid_items_and_names_each_invalid_field(settings, engine, api_url,
                                                                   projector, auth):
    """Some items invalid: the valid ones are produced (each 201 with its coordinates),
    each invalid one gets its own 422 naming the field, at its position."""
    good = [observation(subject_id=f"batch-{i}", event_id=str(uuid.uuid4())) for i in range(5)]
    items = [good[0], observation(confidence=1.5), good[1], good[2],
             {**observation(), "colour": "blue"}, good[3], observation(event_id="nope"),
             good[4]]
    response = httpx.post(f"{api_url}/v1/observations:batch", json={"observations": items},
                          timeout=30, headers=auth)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["accepted"], body["rejected"]) == (5, 3)
    statuses = [r["status"] for r in body["results"]]
    assert statuses == [201, 422, 201, 201, 422, 201, 422, 201]
    bad = {1: ["confidence"], 4: ["colour"], 6: ["event_id"]}
    for i, field_path in bad.items():
        locs = [e["loc"] for e in body["results"][i]["errors"]]
        assert any(loc[:3] == ["body", "observations", i] and loc[3:] == field_path
                   for loc in locs), (i, locs)
        assert all(e["msg"] for e in body["results"][i]["errors"])
    receipts = [r["receipt"] for r in body["results"] if r["status"] == 201]
    assert [r["event_id"] for r in receipts] == [g["event_id"] for g in good]

    # exactly the valid items are on the topic, at the returned coordinates
    messages = read_topic(settings.kafka_bootstrap_servers, settings.topic)
    assert sorted((m.partition, m.offset) for m in messages) == sorted(
        (r["partition"], r["offset"]) for r in receipts)
    serde = AvroSerde.for_settings(settings)
    assert sorted(serde.decode(m.value).event.event_id for m in messages) == sorted(
        g["event_id"] for g in good)

    wait_caught_up(settings, [Receipt(**r) for r in receipts])
    for g in good:
        model = httpx.get(f"{api_url}/v1/subjects/{g['subject_id']}/self-model",
                          headers=auth).json()
        assert model["belief_count"] == 1


def test_batch_over_the_limit_is_413_and_nothing_is_produced(settings, api_url, auth):
    items = [observation(subject_id=f"over-{i}") for i in range(501)]
    response = httpx.post(f"{api_url}/v1/observations:batch", json={"observations": items},
                          timeout=30, headers=auth)
    assert response.status_code == 413, response.text
    assert "500" in response.json()["detail"]
    # a body over the batch byte limit: refused before it is read
    huge = {"observations": [observation(evidence="e" * 16000) for _ in range(600)]}
    response = httpx.post(f"{api_url}/v1/observations:batch", json=huge, timeout=30,
                          headers=auth)
    assert response.status_code == 413, response.text
    assert "split the batch" in response.json()["detail"]
    assert read_topic(settings.kafka_bootstrap_servers, settings.topic) == []
    # a batch of 500 is accepted (and bigger than the single-observation body limit)
    items = [observation(subject_id=f"full-{i}", evidence="x" * 200) for i in range(500)]
    assert len(json.dumps({"observations": items})) > settings.max_body_bytes
    response = httpx.post(f"{api_url}/v1/observations:batch", json={"observations": items},
                          timeout=60, headers=auth)
    assert response.status_code == 200, response.text
    assert response.json()["accepted"] == 500
    assert len(read_topic(settings.kafka_bootstrap_servers, settings.topic)) == 500


def test_batch_item_outside_the_write_scope_is_403_alone(settings, api_url, make_key):
    sales = {"Authorization": f"Bearer {make_key('sales_bot', write='billing')}"}
    items = [observation(source="sales_bot", context="billing", subject_id="s1"),
             observation(source="sales_bot", context="support", subject_id="s2"),
             observation(source="someone_else", context="billing", subject_id="s3")]
    response = httpx.post(f"{api_url}/v1/observations:batch", json={"observations": items},
                          timeout=30, headers=sales)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["status"] for r in results] == [201, 403, 403]
    assert "write scope" in results[1]["detail"] and "source" in results[2]["detail"]
    assert len(read_topic(settings.kafka_bootstrap_servers, settings.topic)) == 1
