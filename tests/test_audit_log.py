"""The auditor's view of the raw log: ``beliefstore events get``, ``partition_for`` and
``beliefstore export`` (read model and --from-log), against the real broker and PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from kafka import KafkaProducer

from beliefstore.events.eventlog import (
    MessageNotFound,
    fetch_message,
    iter_subject_events,
    partition_for,
    partition_of_key,
)
from beliefstore.events.jsonl import to_dict
from beliefstore.events.model import ObservationRecorded
from beliefstore.events.serde import AvroSerde
from beliefstore.settings import Settings
from tests.conftest import wait_caught_up
from tests.test_cli import cli_env

BELIEFSTORE = Path(sys.executable).parent / "beliefstore"
T0 = 1767225600000
MIN = 60_000




def run(args: list[str], settings: Settings, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BELIEFSTORE), *args], env=cli_env(settings, tmp_path),
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)


def flat(text: str) -> str:
    return " ".join(text.split())


def subjects_in_one_partition(partitions: int, count: int, prefix: str) -> list[str]:
    """``count`` fresh subject ids that the default partitioner puts in one partition."""
    first = f"{prefix}-{uuid.uuid4().hex[:8]}"
    target = partition_of_key("t", first.encode(), partitions)
    out = [first]
    while len(out) < count:
        candidate = f"{prefix}-{uuid.uuid4().hex[:8]}"
        if partition_of_key("t", candidate.encode(), partitions) == target:
            out.append(candidate)
    return out


# -- events get ----------------------------------------------------------------------------


def test_events_get_shows_the_decoded_event_and_its_writer_schema(settings, producer, tmp_path):
    subject = f"cust-{uuid.uuid4().hex[:8]}"
    r1 = producer.observe(subject, "support", "emotional_state", "frustrated", 0.88,
                          source="triage_agent", evidence="msg-[1842]",
                          metadata={"model": "gpt-x", "session": "s-1"}, occurred_at=T0)
    r2 = producer.retract(subject, r1.event_id, source="triage_agent", reason="wrong customer",
                          occurred_at=T0 + MIN)
    sent = {
        r1.event_id: {"type": "observed", "event_id": r1.event_id, "subject_id": subject,
                      "source": "triage_agent", "occurred_at": T0, "context": "support",
                      "attribute": "emotional_state", "value": "frustrated", "confidence": 0.88,
                      "evidence": "msg-[1842]", "metadata": {"model": "gpt-x", "session": "s-1"}},
        r2.event_id: {"type": "retracted", "event_id": r2.event_id, "subject_id": subject,
                      "source": "triage_agent", "occurred_at": T0 + MIN,
                      "retracted_event_id": r1.event_id, "reason": "wrong customer"},
    }
    registry = AvroSerde().registry
    for receipt, schema in ((r1, "beliefstore.ObservationRecorded"),
                            (r2, "beliefstore.ObservationRetracted")):
        result = run(["events", "get", str(receipt.partition), str(receipt.offset), "--json"],
                     settings, tmp_path)
        assert result.returncode == 0, result.stderr
        body = json.loads(result.stdout)
        assert (body["topic"], body["partition"], body["offset"]) == (
            settings.topic, receipt.partition, receipt.offset)
        assert body["key"] == subject
        assert body["event"] == sent[receipt.event_id]
        assert body["error"] is None
        writer = registry.current(schema)
        assert body["writer"] == {"name": schema, "version": writer.version,
                                  "fingerprint": writer.fingerprint.hex()}
        assert body["timestamp"] > 0 and body["timestamp_iso"].endswith("Z")

    # The human form carries the same facts.
    text = run(["events", "get", str(r1.partition), str(r1.offset)], settings, tmp_path)
    assert text.returncode == 0, text.stderr
    fingerprint = registry.current("beliefstore.ObservationRecorded").fingerprint.hex()
    assert f"fingerprint {fingerprint}" in text.stdout
    assert f"key        {subject}" in text.stdout
    assert json.loads(text.stdout.split("event      ", 1)[1]) == sent[r1.event_id]


def test_events_get_poison_and_past_the_log_end(settings, producer, tmp_path):
    subject = f"cust-{uuid.uuid4().hex[:8]}"
    good = producer.observe(subject, "support", "issue", "refund", 0.9, source="triage_agent")
    raw = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers)
    try:
        md = raw.send(settings.topic, key=subject.encode(), value=b"garbage",
                      partition=good.partition, headers=[("origin", b"fuzzer")]).get(timeout=15)
    finally:
        raw.close()

    result = run(["events", "get", str(md.partition), str(md.offset)], settings, tmp_path)
    assert result.returncode == 0, result.stderr
    out = flat(result.stdout)
    assert "poison bad_marker:" in out
    assert "67 61 72 62 61 67 65 |garbage|" in out
    assert "origin: fuzzer" in out
    body = json.loads(run(["events", "get", str(md.partition), str(md.offset), "--json"],
                          settings, tmp_path).stdout)
    assert body["error"]["kind"] == "bad_marker"
    assert body["event"] is None and body["writer"] is None
    assert body["value_head_hex"] == b"garbage".hex()
    assert body["headers"] == [{"name": "origin", "value": "fuzzer"}]

    log_end = md.offset + 1
    past = run(["events", "get", str(md.partition), str(log_end)], settings, tmp_path)
    assert past.returncode == 1
    assert f"log end {log_end}" in flat(past.stderr)
    assert past.stdout == ""
    missing = run(["events", "get", "99", "0"], settings, tmp_path)
    assert missing.returncode == 1
    assert "no partition 99" in flat(missing.stderr)

    with pytest.raises(MessageNotFound) as info:
        fetch_message(settings.kafka_bootstrap_servers or "", settings.topic, md.partition,
                      log_end + 1000)
    assert info.value.log_end == log_end
    with pytest.raises(LookupError):
        fetch_message(settings.kafka_bootstrap_servers or "", f"{settings.topic}.nope", 0, 0)


def test_partition_for_matches_the_sdk(settings, producer):
    bootstrap = settings.kafka_bootstrap_servers or ""
    seen = set()
    for n in range(12):
        subject = f"subject-{n}-{uuid.uuid4().hex[:6]}"
        receipt = producer.observe(subject, "support", "issue", "refund", 0.5, source="bot")
        assert partition_for(bootstrap, settings.topic, subject) == receipt.partition, subject
        seen.add(receipt.partition)
    assert len(seen) > 1  # the subjects really spread over the partitions


# -- export ----------------------------------------------------------------------------------


def api_beliefs(api_url: str, subject: str, auth: dict[str, str]) -> dict[tuple[str, str], dict]:
    response = httpx.get(f"{api_url}/v1/subjects/{subject}/self-model", timeout=10, headers=auth)
    assert response.status_code == 200, response.text
    return {(b["context"], b["attribute"]): b
            for beliefs in response.json()["contexts"].values() for b in beliefs}


def folded(path: Path, settings: Settings, tmp_path: Path) -> dict[tuple[str, str], dict]:
    result = run(["fold", str(path)], settings, tmp_path)
    assert result.returncode == 0, result.stderr
    return {(b["context"], b["attribute"]): b for b in json.loads(result.stdout)}


def assert_same_self_model(offline: dict, api: dict) -> None:
    assert offline.keys() == api.keys()
    for key, b in api.items():
        mine = offline[key]
        assert mine["value"] == b["value"], key
        assert mine["confidence"] == pytest.approx(b["confidence"], abs=1e-9), key
        assert sorted(mine["support"]) == sorted(b["support"]), key
        assert mine["alternatives"].keys() == b["alternatives"].keys(), key
        for value, confidence in b["alternatives"].items():
            assert mine["alternatives"][value] == pytest.approx(confidence, abs=1e-9), key


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_export_round_trip_rebuilds_the_self_model(settings, producer, projector, api_url,
                                                   tmp_path, auth):
    a, b = subjects_in_one_partition(settings.partitions, 2, "cust")
    receipts = []
    obs = producer.observe

    def both(subject: str) -> list:
        out = [
            obs(subject, "support", "emotional_state", "confused", 0.55, "triage_agent",
                occurred_at=T0),
            # supersedes the triage agent's first reading
            obs(subject, "support", "emotional_state", "frustrated", 0.88, "triage_agent",
                evidence="msg-3", occurred_at=T0 + 2 * MIN),
            obs(subject, "support", "emotional_state", "angry", 0.62, "sentiment_agent",
                metadata={"model": "m1"}, occurred_at=T0 + 6 * MIN),
            obs(subject, "support", "issue", "refund", 0.9, "triage_agent", occurred_at=T0 + MIN),
            obs(subject, "billing", "plan", "pro", 0.8, "billing_agent", occurred_at=T0 + 3 * MIN),
            obs(subject, "billing", "plan", "basic", 0.7, "sales_bot", occurred_at=T0 + 4 * MIN),
        ]
        # own-source retraction (counts) and another source's retraction (ignored)
        out.append(producer.retract(subject, out[5].event_id, "sales_bot",
                                    reason="wrong account", occurred_at=T0 + 8 * MIN))
        out.append(producer.retract(subject, out[3].event_id, "sentiment_agent",
                                    occurred_at=T0 + 9 * MIN))
        return out

    sent_a = both(a)
    sent_b = both(b)
    receipts += sent_a + sent_b
    # duplicates: the same events delivered again
    dup = ObservationRecorded(event_id=sent_a[2].event_id, subject_id=a, source="sentiment_agent",
                              occurred_at=T0 + 6 * MIN, context="support",
                              attribute="emotional_state", value="angry", confidence=0.62,
                              metadata={"model": "m1"})
    receipts += producer.send_many([dup, dup])
    receipts.append(obs(b, "support", "issue", "billing_error", 0.95, "triage_agent",
                        occurred_at=T0 + 10 * MIN))
    wait_caught_up(settings, receipts)
    api = api_beliefs(api_url, a, auth)
    assert api[("support", "emotional_state")]["value"] == "frustrated"
    assert api[("billing", "plan")]["value"] == "pro"

    ids_a = {r.event_id for r in sent_a}
    ids_b = {r.event_id for r in sent_b} | {receipts[-1].event_id}
    exports = {}
    for name, extra in (("read_model", []), ("log", ["--from-log"])):
        path = tmp_path / f"{name}.jsonl"
        result = run(["export", "--subject", a, "--output", str(path), *extra], settings, tmp_path)
        assert result.returncode == 0, result.stderr
        assert f"exported {len(ids_a)} event(s) about {a}" in flat(result.stderr)
        if extra:
            assert "2 duplicate(s) dropped" in flat(result.stderr)
        lines = read_jsonl(path)
        assert {e["subject_id"] for e in lines} == {a}
        assert [e["event_id"] for e in lines if e["event_id"] in ids_b] == []
        assert len(lines) == len({e["event_id"] for e in lines}) == len(ids_a)
        assert {e["event_id"] for e in lines} == ids_a
        assert_same_self_model(folded(path, settings, tmp_path), api)
        exports[name] = lines

    # the read model is ordered by (occurred_at, event_id); the log export keeps log order
    rm = exports["read_model"]
    assert rm == sorted(rm, key=lambda e: (e["occurred_at"], e["event_id"]))
    assert [e["event_id"] for e in exports["log"]] == [r.event_id for r in sent_a]
    # both give the same events, field for field
    assert sorted(rm, key=lambda e: e["event_id"]) == sorted(exports["log"],
                                                             key=lambda e: e["event_id"])

    # stdout export, and an unknown subject
    stdout = run(["export", "--subject", b], settings, tmp_path)
    assert stdout.returncode == 0, stdout.stderr
    assert {json.loads(x)["event_id"] for x in stdout.stdout.splitlines()} == ids_b
    nobody = run(["export", "--subject", "nobody-here"], settings, tmp_path)
    assert nobody.returncode == 1
    assert "no events about subject 'nobody-here'" in flat(nobody.stderr)


def test_export_after_an_erasure(settings, producer, projector, api_url, tmp_path, auth):
    a, b = subjects_in_one_partition(settings.partitions, 2, "erase")
    receipts = [
        producer.observe(a, "support", "issue", "refund", 0.9, "triage_agent",
                         evidence="card ending 4242", occurred_at=T0),
        producer.observe(a, "support", "emotional_state", "calm", 0.7, "sentiment_agent",
                         occurred_at=T0 + MIN),
        producer.observe(b, "support", "issue", "refund", 0.6, "triage_agent", occurred_at=T0),
    ]
    erasure = producer.erase(a, "privacy-officer", reason="GDPR art. 17",
                             occurred_at=T0 + 5 * MIN)
    after = producer.observe(a, "support", "issue", "upgrade", 0.8, "triage_agent",
                             occurred_at=T0 + 10 * MIN)
    receipts += [erasure, after]
    wait_caught_up(settings, receipts)
    api = api_beliefs(api_url, a, auth)
    assert set(api) == {("support", "issue")}

    path = tmp_path / "erased.jsonl"
    result = run(["export", "-s", a, "-o", str(path)], settings, tmp_path)
    assert result.returncode == 0, result.stderr
    lines = read_jsonl(path)
    assert [(e["type"], e["event_id"]) for e in lines] == [
        ("erased", erasure.event_id), ("observed", after.event_id)]
    assert not [e for e in lines if e["type"] == "observed"
                and e["occurred_at"] <= T0 + 5 * MIN]
    assert "4242" not in path.read_text()
    assert_same_self_model(folded(path, settings, tmp_path), api)

    # The log is immutable: it still holds the erased observations, and the fold drops them.
    log_path = tmp_path / "erased-log.jsonl"
    result = run(["export", "-s", a, "-o", str(log_path), "--from-log"], settings, tmp_path)
    assert result.returncode == 0, result.stderr
    assert [e["event_id"] for e in read_jsonl(log_path)] == [
        r.event_id for r in (receipts[0], receipts[1], erasure, after)]
    assert_same_self_model(folded(log_path, settings, tmp_path), api)


def test_iter_subject_events_skips_other_subjects_and_counts_poison(settings, producer):
    bootstrap = settings.kafka_bootstrap_servers or ""
    a, b = subjects_in_one_partition(settings.partitions, 2, "scan")
    ra = producer.observe(a, "support", "issue", "refund", 0.9, "triage_agent")
    producer.observe(b, "support", "issue", "refund", 0.9, "triage_agent")
    raw = KafkaProducer(bootstrap_servers=bootstrap)
    try:
        raw.send(settings.topic, key=a.encode(), value=b"\xc3\x01garbage!",
                 partition=ra.partition).get(timeout=15)
        # a valid event of b under a's key: poison, as the projector sees it
        body = AvroSerde().encode(ObservationRecorded(
            event_id=str(uuid.uuid4()), subject_id=b, source="x", occurred_at=T0,
            context="support", attribute="issue", value="v", confidence=0.5))
        raw.send(settings.topic, key=a.encode(), value=body, partition=ra.partition).get(timeout=15)
    finally:
        raw.close()
    rb = producer.observe(a, "support", "issue", "refund", 0.8, "other_agent")
    calls: list[tuple[int, int]] = []
    scan = iter_subject_events(bootstrap, settings.topic, a,
                               serde=AvroSerde.for_settings(settings),
                               progress=lambda done, total: calls.append((done, total)))
    got = list(scan)
    assert [m.decoded.event.event_id for m in got if m.decoded] == [ra.event_id, rb.event_id]
    assert [to_dict(m.decoded.event)["subject_id"] for m in got if m.decoded] == [a, a]
    assert scan.partition == ra.partition
    assert scan.end_offset == rb.offset + 1
    assert scan.scanned == 5
    assert sorted(m.error.kind for m in scan.poison if m.error) == ["invalid_event",
                                                                     "unknown_schema"]
    assert calls[-1] == (rb.offset + 1, rb.offset + 1)
    assert list(iter_subject_events(bootstrap, settings.topic, "no-such-subject")) == []
