"""Auditors: replay into a fresh projection (blue/green), as-of views on both time axes,
belief history, and a broker that lost its log."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from kafka import KafkaProducer

from beliefstore.embedded import EmbeddedKafka, free_port
from beliefstore.errors import LogResetError
from beliefstore.events.model import ObservationRecorded
from beliefstore.events.producer import BeliefProducer
from beliefstore.events.serde import AvroSerde, SchemaRegistry, encode_record
from beliefstore.events.workload import generate
from beliefstore.projector.catalog import CatalogError
from beliefstore.projector.fold import FoldSettings, fold
from beliefstore.projector.replay import BeliefRow, compare, read_beliefs, read_log, replay
from beliefstore.projector.store import LoggedEvent, ProjectionRecorder, load_subject_events
from beliefstore.projector.timeline import beliefs_as_of, history, visible_at
from beliefstore.projector.worker import ProjectorWorker
from beliefstore.runtime.serve import ApiServer, ProjectorThread, wait_projected
from tests.conftest import case_events, load_cases

V2 = Path(__file__).parent / "data" / "schemas_v2"


def produce_mixed_log(settings, count: int = 3000) -> list:
    """A workload (retractions, erasures, duplicates) with every 7th observation written
    under the v2 schema (new optional field), so the log mixes two schema versions."""
    events = generate(count, seed=21, subjects=120)
    v2 = SchemaRegistry.default(extra_path=str(V2))
    v2_schema = next(s for s in v2 if s.name == ObservationRecorded.schema_name
                     and s.version == 3)
    v1 = AvroSerde()
    raw = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, acks="all",
                        linger_ms=5)
    futures = []
    for i, e in enumerate(events):
        if isinstance(e, ObservationRecorded) and i % 7 == 0:
            payload = encode_record({**e.__dict__, "language": "de-CH"}, v2_schema)
        else:
            payload = v1.encode(e)
        futures.append(raw.send(settings.topic, key=e.subject_id.encode(), value=payload))
    for f in futures:
        f.get(timeout=30)
    raw.close()
    return events


def test_replay_rebuilds_the_same_read_model_and_switches(settings, catalog, monkeypatch, auth):
    monkeypatch.setenv("BELIEFSTORE_SCHEMA_PATH", str(V2))
    events = produce_mixed_log(settings)
    live = catalog.active()
    with ProjectorWorker(settings, catalog.engine(live.schema)) as worker:
        stats = worker.run(until_caught_up=True)
    assert stats.events == len(events) and stats.poison == 0

    seen: list[tuple[int, int | None]] = []
    report = replay(settings, catalog, "rebuild_one", switch=True,
                    on_progress=lambda done, total: seen.append((done, total)))
    assert report.stats.events == len(events)
    assert report.vs_live == [] and report.vs_fold == []
    assert report.switched and catalog.active().name == "rebuild_one"
    assert seen and seen[-1][0] == len(events) and seen[-1][1] == len(events)

    expected = {b.key: BeliefRow.of(b) for b in fold(events, settings.fold_settings)}
    rebuilt = read_beliefs(catalog.engine(report.projection.schema))
    assert len(rebuilt) == len(expected) > 100
    assert compare(rebuilt, expected) == []
    assert compare(rebuilt, read_beliefs(catalog.engine(live.schema))) == []

    # The API serves the rebuilt projection, and the live projector follows it.
    projector = ProjectorThread(settings)
    projector.start()
    server = ApiServer(settings, "127.0.0.1", free_port()).start_in_thread()
    try:
        with BeliefProducer.from_settings(settings) as producer:
            receipt = producer.observe("late-subject", "support", "issue", "refund", 0.9,
                                       source="triage_agent")
        wait_projected(catalog, settings.topic, [receipt])
        body = httpx.get(f"{server.url}/v1/subjects/late-subject/self-model", headers=auth).json()
        assert body["contexts"]["support"][0]["value"] == "refund"
        assert "late-subject" in {k[0] for k in read_beliefs(
            catalog.engine(report.projection.schema))}
        assert "late-subject" not in {k[0] for k in read_beliefs(catalog.engine(live.schema))}
    finally:
        server.stop()
        projector.stop()
    assert projector.error is None

    with pytest.raises(CatalogError, match="active"):
        catalog.drop("rebuild_one")
    catalog.drop(live.name)
    assert [p.name for p in catalog.list()] == ["rebuild_one"]


def test_replay_reports_differences_with_the_live_projection(settings, catalog):
    """Rebuilding with new trust settings: the rebuild equals the pure fold under those
    settings, and the differences with the live projection are listed key by key."""
    case = next(c for c in load_cases() if c["name"] == "trusted_source_outweighs")
    with BeliefProducer.from_settings(settings) as producer:
        producer.send_many(case_events(case))
    with ProjectorWorker(settings, catalog.engine(catalog.active().schema)) as worker:
        worker.run(until_caught_up=True)
    trusted = replace(settings, trust=case["settings"]["trust"])
    report = replay(trusted, catalog, "trusted", switch=False)
    assert report.vs_fold == [] and not report.switched
    assert catalog.active().name == "self_model"
    [diff] = report.vs_live
    assert diff.left is not None and diff.right is not None
    assert diff.left.value == case["expected"][0]["value"] != diff.right.value


def test_replay_fold_check_covers_what_the_rebuild_applied_while_agents_write(settings,
                                                                            catalog):
    """Under live traffic the log grows between the rebuild's end and the fold check; the
    check folds exactly the offsets the rebuild applied, so a correct rebuild switches
    (before, it was compared with a fold of later events and refused: found by the soak)."""
    events = generate(400, seed=5, subjects=40)
    with BeliefProducer.from_settings(settings) as producer:
        producer.send_many(events)
    late: list = []

    def agent_writes(done: int, total: int | None) -> None:
        # an agent writes while the rebuild runs, once, after it fixed its end offsets
        if late:
            return
        with BeliefProducer.from_settings(settings) as producer:
            for i in range(20):
                late.append(producer.observe(f"s-{i % 40}", "support", "mood", f"late-{i}",
                                             0.99, source="triage_agent"))

    report = replay(settings, catalog, "under_load", switch=True, on_progress=agent_writes)
    assert late, "the agent wrote nothing during the replay"
    assert report.vs_fold == [] and report.switched
    assert catalog.active().name == "under_load"
    # What the fold check relies on, deterministically: after more writes, the fold of
    # the log up to the rebuilt projection's stored offsets is the rebuilt read model;
    # the fold of the whole log is not.
    with BeliefProducer.from_settings(settings) as producer:
        for i in range(5):
            producer.observe(f"s-{i}", "support", "mood", f"later-{i}", 0.99,
                             source="triage_agent")
    engine = catalog.engine(report.projection.schema)
    stored = ProjectionRecorder(engine, report.projection.name,
                                settings.fold_settings).stored_offsets(settings.topic)
    upto, _ = read_log(settings, until=stored)
    everything, _ = read_log(settings)
    assert len(everything) == len(upto) + 5
    rebuilt = read_beliefs(engine)
    assert compare(rebuilt, {b.key: BeliefRow.of(b)
                             for b in fold(upto, settings.fold_settings)}) == []
    assert compare(rebuilt, {b.key: BeliefRow.of(b)
                             for b in fold(everything, settings.fold_settings)}) != []


def logged_of(catalog, subject: str) -> list[LoggedEvent]:
    with catalog.engine(catalog.active().schema).connect() as conn:
        return load_subject_events(conn, subject)


def test_as_of_equals_the_fold_of_the_filtered_events(settings, catalog, api_url, auth):
    events = generate(1500, seed=5, subjects=20)
    with BeliefProducer.from_settings(settings) as producer:
        receipts = []
        for i in range(0, len(events), 100):
            receipts += producer.send_many(events[i:i + 100])
    projector = ProjectorThread(settings)
    projector.start()
    try:
        wait_projected(catalog, settings.topic, receipts)
    finally:
        projector.stop()
    subject = "subject-000000"  # the most active subject (Zipf)
    logged = logged_of(catalog, subject)
    assert len(logged) > 50
    fs: FoldSettings = settings.fold_settings
    for axis in ("recorded", "occurred"):
        times = sorted({(i.position.recorded_at if axis == "recorded" else i.event.occurred_at)
                        for i in logged})
        for instant in (times[len(times) // 4], times[len(times) // 2], times[-1]):
            expected = fold(visible_at(logged, instant, axis), fs)
            assert beliefs_as_of(logged, instant, axis, fs) == expected
            from beliefstore.timefmt import iso

            body = httpx.get(f"{api_url}/v1/subjects/{subject}/self-model", headers=auth,
                             params={"as_of": iso(instant), "time": axis}).json()
            got = {(c, b["attribute"]): (b["value"], b["confidence"], b["support"])
                   for c, bs in body["contexts"].items() for b in bs}
            want = {(b.context, b.attribute): (b.value, pytest.approx(b.confidence, abs=1e-12),
                                                list(b.support)) for b in expected}
            assert got == want, (axis, instant)
            assert body["as_of"] and body["time"] == axis
    # as of before anything happened: nothing believed yet, but the subject is known.
    body = httpx.get(f"{api_url}/v1/subjects/{subject}/self-model", headers=auth,
                     params={"as_of": "2000-01-01T00:00Z"}).json()
    assert body["belief_count"] == 0
    # the present view equals the as-of-now view
    now = httpx.get(f"{api_url}/v1/subjects/{subject}/beliefs", headers=auth).json()["beliefs"]
    later = httpx.get(f"{api_url}/v1/subjects/{subject}/beliefs", headers=auth,
                      params={"as_of": "2100-01-01T00:00Z"}).json()["beliefs"]
    assert [(b["attribute"], b["value"]) for b in now] == [
        (b["attribute"], b["value"]) for b in later]
    bad = httpx.get(f"{api_url}/v1/subjects/{subject}/self-model", headers=auth,
                    params={"as_of": "2026-01-01T00:00"})
    assert bad.status_code == 422 and "timezone" in bad.text


def test_history_and_trace_of_vector_cases(settings, catalog, api_url, auth):
    cases = {c["name"]: c for c in load_cases()}
    with BeliefProducer.from_settings(settings) as producer:
        receipts = []
        for name in ("retraction_restores_previous", "source_changes_mind",
                     "retraction_by_other_source_ignored"):
            # Distinct subjects per case so their keys do not mix.
            receipts += [producer.send(replace(e, subject_id=f"{name}-{e.subject_id}"))
                         for e in case_events(cases[name])]
    projector = ProjectorThread(settings)
    projector.start()
    try:
        wait_projected(catalog, settings.topic, receipts)
    finally:
        projector.stop()

    def get(name: str, what: str) -> dict:
        e = case_events(cases[name])[0]
        url = (f"{api_url}/v1/subjects/{name}-{e.subject_id}/beliefs/{e.context}/"
               f"{getattr(e, 'attribute', 'emotional_state')}/{what}")
        response = httpx.get(url, headers=auth)
        assert response.status_code == 200, response.text
        return response.json()

    # Retraction: the belief goes to the retracted value, then back to the previous one.
    h = get("retraction_restores_previous", "history")["changes"]
    expected = cases["retraction_restores_previous"]["expected"][0]
    assert h[-1]["value"] == expected["value"]
    assert h[-1]["event_type"] == "retracted"
    assert len({c["value"] for c in h}) >= 2
    t = get("retraction_restores_previous", "trace")
    statuses = sorted(e["status"] for e in t["events"])
    assert "retracted" in statuses and "retraction" in statuses
    assert t["scores"] == pytest.approx({expected["value"]: t["belief"] and sum(
        e["weight"] for e in t["events"] if e["status"] == "counting")})
    for e in t["events"]:
        if e["status"] == "counting":
            assert e["weight"] == pytest.approx(e["trust"] * e["log_odds"] * e["decay"])
        assert e["writer_fingerprint"] and e["kafka"]["topic"] == settings.topic

    # Supersession: the later claim of the same source replaces the earlier one.
    t = get("source_changes_mind", "trace")
    assert sorted(e["status"] for e in t["events"]) == ["counting", "superseded"]
    h = get("source_changes_mind", "history")["changes"]
    assert h[-1]["value"] == cases["source_changes_mind"]["expected"][0]["value"]

    # A retraction by another source is shown and ignored; the history never changes by it.
    t = get("retraction_by_other_source_ignored", "trace")
    assert "retraction_ignored" in {e["status"] for e in t["events"]}
    h = get("retraction_by_other_source_ignored", "history")["changes"]
    assert all(c["event_type"] == "observed" for c in h)


def test_history_is_pure_and_stops_at_erasure(catalog):
    case = next(c for c in load_cases() if c["name"] == "erasure_forgets_subject")
    from beliefstore.projector.store import LogPosition

    logged = [LoggedEvent(e, LogPosition("t", 0, i, e.occurred_at, "00"))
              for i, e in enumerate(case_events(case))]
    key = ("user-1", "support", "emotional_state")
    # The observation before the erasure never counts, in any view.
    assert history([i for i in logged if i.event.subject_id == "user-1"], key,
                   FoldSettings()) == []


def test_projector_refuses_a_broker_that_lost_its_log(settings, catalog):
    """The broker restarts with an empty log (memory storage): the stored offsets lie
    beyond the new log's end, and the projector says so instead of skipping events."""
    with EmbeddedKafka(None) as kafka:
        s = replace(settings, kafka_bootstrap_servers=kafka.bootstrap_servers)
        with BeliefProducer.from_settings(s) as producer:
            producer.send_many(generate(50, seed=1, subjects=3))
        engine = catalog.engine(catalog.active().schema)
        with ProjectorWorker(s, engine) as worker:
            assert worker.run(until_caught_up=True).events == 50
    with EmbeddedKafka(None) as fresh:  # same topic name, empty log
        s = replace(settings, kafka_bootstrap_servers=fresh.bootstrap_servers)
        stop = threading.Event()
        with ProjectorWorker(s, engine) as worker, pytest.raises(LogResetError) as info:
            worker.run(stop, until_caught_up=True)
    message = str(info.value)
    assert "beyond" in message and "rebuild" in message and settings.topic in message
