"""Erasure by crypto-shredding: sealed personal fields, destroyed keys, replay."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from kafka import KafkaProducer

from beliefstore.access.datakeys import Keyring, load_master_key
from beliefstore.events.model import SubjectErased
from beliefstore.events.producer import BeliefProducer
from beliefstore.events.sealing import EventShredded
from beliefstore.events.serde import AvroSerde, SealedEventError
from beliefstore.projector.replay import read_beliefs, replay
from beliefstore.projector.tables import observations
from beliefstore.projector.worker import ProjectorWorker
from tests.conftest import read_topic

SECRET = "lives-at-42-elm-street"


def project(settings, catalog) -> None:
    with ProjectorWorker(settings, catalog.engine(catalog.active().schema)) as worker:
        worker.run(until_caught_up=True)


def subjects_of(catalog) -> set[str]:
    return {k[0] for k in read_beliefs(catalog.engine(catalog.active().schema))}


def test_erasure_shreds_the_log_and_replay_forgets(settings, catalog):
    with BeliefProducer.from_settings(settings) as producer:
        assert producer.serde.sealer is not None  # sealing is on by default
        for subject in ("alice", "bob"):
            producer.observe(subject, "support", "address", SECRET, 0.9, source="triage_agent",
                             evidence=f"{subject} said {SECRET}", metadata={"m": SECRET})
            producer.observe(subject, "support", "issue", "refund", 0.8, source="billing_agent")
    project(settings, catalog)
    assert subjects_of(catalog) == {"alice", "bob"}

    messages = read_topic(settings.kafka_bootstrap_servers, settings.topic)
    assert len(messages) == 4
    assert all(SECRET.encode() not in m.value for m in messages)  # sealed on the wire
    with pytest.raises(SealedEventError):
        AvroSerde().decode(messages[0].value)  # no keyring, no plaintext
    serde = AvroSerde.for_settings(settings)
    assert {serde.decode(m.value).event.value for m in messages} == {SECRET, "refund"}

    with BeliefProducer.from_settings(settings) as producer:
        producer.erase("alice", source="privacy_officer", reason="GDPR art. 17")
        after = producer.observe("alice", "support", "issue", "login", 0.7, source="triage_agent")
    project(settings, catalog)
    beliefs = read_beliefs(catalog.engine(catalog.active().schema))
    assert {k for k in beliefs if k[0] == "alice"} == {("alice", "support", "issue")}
    assert beliefs[("alice", "support", "issue")].support == (after.event_id,)
    assert {k for k in beliefs if k[0] == "bob"} == {("bob", "support", "address"),
                                                       ("bob", "support", "issue")}
    with catalog.engine(catalog.active().schema).connect() as conn:
        values = list(conn.execute(sa.select(observations.c.value, observations.c.evidence)
                                   .where(observations.c.subject_id == "alice")))
    assert all(SECRET not in str(v) for v in values)

    # The raw messages about alice before the erasure no longer decrypt, for anyone.
    fresh = AvroSerde.for_settings(settings)
    shredded = decoded = 0
    for m in read_topic(settings.kafka_bootstrap_servers, settings.topic):
        try:
            event = fresh.decode(m.value).event
            decoded += 1
            assert not (event.subject_id == "alice" and getattr(event, "value", "") == SECRET)
        except EventShredded as exc:
            assert exc.subject_id == "alice"
            shredded += 1
    assert shredded == 2 and decoded == 4  # bob ×2, the erasure, alice's later one

    report = replay(settings, catalog, "after_erasure")
    rebuilt = read_beliefs(catalog.engine(report.projection.schema))
    assert report.vs_fold == [] and report.vs_live == []
    assert {k for k in rebuilt if k[0] == "alice"} == {("alice", "support", "issue")}
    assert rebuilt[("bob", "support", "address")].value == SECRET


def test_an_erasure_produced_without_a_keyring_destroys_keys_when_projected(settings, catalog):
    with BeliefProducer.from_settings(settings) as producer:
        producer.observe("carol", "support", "address", SECRET, 0.9, source="triage_agent")
    project(settings, catalog)
    # A plain producer (no keyring) writes the erasure straight to the topic.
    erasure = SubjectErased(event_id="7d0c7d3a-4c1e-4a59-9a43-2a6f5b1e0c11", subject_id="carol",
                            source="privacy_officer", occurred_at=4102444800000)
    raw = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, acks="all")
    raw.send(settings.topic, key=b"carol", value=AvroSerde().encode(erasure)).get(timeout=10)
    raw.close()
    project(settings, catalog)
    assert "carol" not in subjects_of(catalog)
    keyring = Keyring.from_settings(settings)
    try:
        with keyring.engine.connect() as conn:
            alive = conn.execute(sa.select(sa.func.count()).select_from(keyring.table).where(
                keyring.table.c.subject_id == "carol", keyring.table.c.wrapped.is_not(None))
            ).scalar_one()
        assert alive == 0
    finally:
        keyring.dispose()


def test_master_key_errors_name_the_fix(tmp_path):
    from beliefstore.access.datakeys import KeyringError

    with pytest.raises(KeyringError, match="base64"):
        load_master_key(tmp_path, {"BELIEFSTORE_MASTER_KEY": "too-short"})
    key = load_master_key(tmp_path, {})
    assert len(key) == 32 and (tmp_path / "master.key").stat().st_mode & 0o777 == 0o600
    assert load_master_key(tmp_path, {}) == key  # generated once, then reused


def test_a_process_that_cached_a_key_never_seals_with_it_after_an_erasure(settings, catalog):
    """The API's processes each cache subjects' data keys; the projector destroys them
    in another process when it folds an erasure. An observation written after the erasure
    by a process that had cached the old key must still be readable (it was sealed with a
    destroyed key, so shredded, and its 201 silently lost, before the keyring checked its
    cached keys)."""
    with BeliefProducer.from_settings(settings) as api_process:
        api_process.observe("dave", "support", "address", SECRET, 0.9, source="triage_agent")
        with BeliefProducer.from_settings(settings) as privacy_tool:
            privacy_tool.erase("dave", source="privacy_officer")
        project(settings, catalog)
        assert "dave" not in subjects_of(catalog)
        api_process.observe("dave", "support", "address", "Rue Neuve 2", 0.9,
                            source="triage_agent")
    project(settings, catalog)
    assert "dave" in subjects_of(catalog)
    [row] = [b for k, b in read_beliefs(catalog.engine(catalog.active().schema)).items()
             if k[0] == "dave"]
    assert row.value == "Rue Neuve 2"


def test_a_group_is_sealed_with_the_keys_of_one_lookup(settings, catalog):
    """The producer fetches (or creates) a group's data keys once and seals every event of
    the group with them: sending 6 observations of 3 subjects that already have keys costs
    one keyring query, not one per event; each event is sealed with its subject's current
    key, and the projector opens them all."""
    with BeliefProducer.from_settings(settings) as producer:
        assert producer.serde.sealer is not None
        keyring = producer.serde.sealer.keyring
        subjects = ["erin", "frank", "gail"]
        producer.send_many([_obs(s, "warm") for s in subjects])  # creates their keys
        statements: list[str] = []

        def count(conn, cursor, statement, *rest) -> None:  # noqa: ANN001
            statements.append(statement)

        sa.event.listen(keyring.engine, "before_cursor_execute", count)
        try:
            receipts = producer.send_many([_obs(s, f"v{n}") for n in range(2) for s in subjects])
        finally:
            sa.event.remove(keyring.engine, "before_cursor_execute", count)
    assert len(receipts) == 6
    assert len(statements) == 1, statements
    records = read_topic(settings.kafka_bootstrap_servers, settings.topic)
    serde = AvroSerde.for_settings(settings)
    key_ids = {s: keyring.data_keys([s], 0)[s][0] for s in subjects}
    decoded = [serde.decode(r.value, open_sealed=False).record for r in records]
    assert len(decoded) == 9
    assert {(d["subject_id"], d["sealed"]["key_id"]) for d in decoded} == set(key_ids.items())
    project(settings, catalog)
    assert subjects_of(catalog) >= set(subjects)


def _obs(subject: str, value: str):
    import uuid

    from beliefstore.events.model import ObservationRecorded

    return ObservationRecorded(event_id=str(uuid.uuid4()), subject_id=subject,
                               source="triage_agent", occurred_at=1767225600000,
                               context="support", attribute="note", value=value,
                               confidence=0.8)
def test_a_group_s_events_are_sealed_with_the_keys_it_looked_up(settings, catalog):
    """The producer looks a group's data keys up once (``Keyring.data_keys``) and seals
    every event with them, instead of one keyring query per event: ``encode`` must use the
    key it is given (here another subject's, to tell them apart), and the event must open."""
    from beliefstore.events.model import ObservationRecorded
    from beliefstore.timefmt import now_millis

    serde = AvroSerde.for_settings(settings)
    assert serde.sealer is not None
    given = serde.sealer.keyring.data_keys({"frank"}, now_millis())["frank"]
    event = ObservationRecorded(event_id="5f0c4a52-4f43-4a8e-9d0b-0d6f8a3f4c11",
                                subject_id="erin", source="triage_agent",
                                occurred_at=now_millis(), context="support",
                                attribute="address", value=SECRET, confidence=0.9)
    data = serde.encode(event, {"erin": given})
    assert serde.decode(data, open_sealed=False).record["sealed"]["key_id"] == given[0]
    assert serde.decode(data).event.value == SECRET
    own = serde.decode(serde.encode(event), open_sealed=False).record["sealed"]["key_id"]
    assert own != given[0]  # without a key given, erin's own


def _live_keys(keyring: Keyring) -> list[tuple[str, str]]:
    t = keyring.table
    with keyring.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(  # type: ignore[misc]
            sa.select(t.c.subject_id, t.c.key_id).where(t.c.wrapped.is_not(None)))]


def test_concurrent_callers_in_two_processes_get_one_key_per_subject(settings, catalog):
    """Two keyrings (two API processes), eight threads each, ask for the keys of
    overlapping groups of new subjects at once: every subject ends with exactly one live
    key, and every caller was handed that key (same id, same bytes), so no event is ever
    sealed with a key that crypto-shredding would miss."""
    import random
    import threading

    from beliefstore.timefmt import now_millis

    master = load_master_key(settings.home)
    keyrings = [Keyring.from_settings(settings) for _ in range(2)]
    subjects = [f"subject-{i}" for i in range(40)]
    handed: list[dict[str, tuple[str, bytes]]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(16)

    def caller(keyring: Keyring, seed: int) -> None:
        rng = random.Random(seed)
        try:
            start.wait()
            for _ in range(6):
                handed.append(keyring.data_keys(rng.sample(subjects, 12), now_millis()))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(keyrings[i % 2], i)) for i in range(16)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        live = _live_keys(keyrings[0])
        assert len(live) == len({s for s, _ in live}), "a subject has two live keys"
        key_of = dict(live)
        check = Keyring(settings.database_url, settings.db_schema, master)
        try:
            for result in handed:
                for subject, (key_id, key) in result.items():
                    assert key_of[subject] == key_id
                    assert check.key(key_id) == key
        finally:
            check.dispose()
        assert len(handed) == 16 * 6
    finally:
        for keyring in keyrings:
            keyring.dispose()


def test_new_subjects_keys_are_committed_by_one_statement(settings, catalog):
    """A group's new subjects get their keys from one statement (one round trip), and the
    keys are committed when ``data_keys`` returns: another connection sees them at once
    (a key the database could lose would make the acknowledged events unreadable)."""
    from beliefstore.timefmt import now_millis

    keyring = Keyring.from_settings(settings)
    other = Keyring.from_settings(settings)
    try:
        keyring.data_keys(["warm-up"], now_millis())
        statements: list[str] = []

        def count(conn, cursor, statement, *rest) -> None:  # noqa: ANN001
            statements.append(statement)

        sa.event.listen(keyring.engine, "before_cursor_execute", count)
        try:
            keys = keyring.data_keys([f"new-{i}" for i in range(5)], now_millis())
            again = keyring.data_keys([f"new-{i}" for i in range(5)], now_millis())
        finally:
            sa.event.remove(keyring.engine, "before_cursor_execute", count)
        assert len(statements) == 2, statements  # one each: create, then check the cache
        assert again == keys
        seen = dict(_live_keys(other))
        for subject, (key_id, key) in keys.items():
            assert seen[subject] == key_id
            assert other.key(key_id) == key
    finally:
        keyring.dispose()
        other.dispose()


def test_a_keys_table_without_the_unique_index_gets_it(settings, catalog):
    """A ``subject_keys`` table made by an earlier version (no unique index on live keys)
    gets the index on first use; one holding two live keys of a subject is refused with
    a message that names the table and the fix."""
    from beliefstore.access.datakeys import LIVE_KEY_INDEX, KeyringError

    keyring = Keyring.from_settings(settings)
    try:
        with keyring.engine.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{settings.db_schema}"'))
            conn.execute(sa.text(
                f'CREATE TABLE "{settings.db_schema}".subject_keys (key_id text PRIMARY KEY, '
                "subject_id text NOT NULL, wrapped bytea, created_at bigint NOT NULL, "
                "destroyed_at bigint)"))
            conn.execute(sa.text(
                f'INSERT INTO "{settings.db_schema}".subject_keys VALUES '
                "('k1', 'erin', 'x', 1, NULL), ('k2', 'erin', 'y', 2, NULL)"))
        with pytest.raises(KeyringError, match="more than one live data key"):
            keyring.data_keys(["frank"], 3)
        with keyring.engine.begin() as conn:
            conn.execute(sa.text(f'UPDATE "{settings.db_schema}".subject_keys SET wrapped = '
                                 "NULL, destroyed_at = 3 WHERE key_id = 'k1'"))
        keyring.data_keys(["frank"], 4)
        with keyring.engine.connect() as conn:
            indexes = set(conn.execute(sa.text(
                "SELECT indexname FROM pg_indexes WHERE schemaname = :s AND tablename = "
                "'subject_keys'"), {"s": settings.db_schema}).scalars())
        assert LIVE_KEY_INDEX in indexes
        assert ("frank" in dict(_live_keys(keyring))) and len(_live_keys(keyring)) == 2
    finally:
        keyring.dispose()
