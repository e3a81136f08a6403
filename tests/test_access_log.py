"""The access log's batching: entries sent many to a Kafka record, nothing lost on a clean
close, read back by the audit path (``read_access_log``, ``beliefstore access-log``) in
the new and the old (one record per entry) format. Real broker; no mocks."""

from __future__ import annotations

import json
from dataclasses import replace

from kafka import KafkaProducer

from beliefstore.access.accesslog import (
    AccessLogger,
    AccessRecord,
    parse_message,
    read_access_log,
)
from beliefstore.events.eventlog import partition_of_key
from beliefstore.events.topics import ensure_topics
from tests.conftest import read_topic
from tests.test_cli import cli_env, run

SUBJECTS = [f"user-{i}" for i in range(40)]


def test_entries_are_batched_and_none_is_lost_on_close(settings):
    logger = AccessLogger(settings, max_batch=100)
    reads = 0
    for round_no in range(30):
        for subject in SUBJECTS:
            logger.record("billing_bot", "k1", subject, "self-model", ["support", "billing"],
                          count=round_no)
            reads += 1
    # the read path only appended: nothing has to be sent yet for record() to return
    logger.close()
    assert (logger.produced, logger.failed, logger.dropped) == (reads, 0, 0)
    assert logger.pending() == 0

    messages = read_topic(settings.kafka_bootstrap_servers, settings.access_topic)
    assert 0 < len(messages) < reads / 10, len(messages)  # batches, not one record per read
    entries = []
    for m in messages:
        parsed, bad = parse_message(m.value, m.partition, m.offset)
        assert bad == 0 and json.loads(m.value)["v"] == 2
        assert len(parsed) <= 100
        for e in parsed:  # each entry lies in its subject's partition
            assert m.partition == partition_of_key(settings.access_topic, e.subject_id.encode(),
                                                   settings.partitions)
        entries.extend(parsed)
    assert len(entries) == reads
    assert len({e.access_id for e in entries}) == reads

    records, skipped = read_access_log(settings, "user-7")
    assert skipped == 0
    # in read order, whole
    assert [r.count for r in records] == list(range(30))
    assert {(r.agent, r.key_id, r.endpoint, r.contexts) for r in records} == {
        ("billing_bot", "k1", "self-model", ("billing", "support"))}


def test_records_after_close_are_dropped_not_blocking(settings):
    logger = AccessLogger(settings)
    logger.record("a", None, "user-1", "beliefs", [])
    logger.close()
    logger.close()  # idempotent
    logger.record("a", None, "user-1", "beliefs", [])
    assert (logger.produced, logger.dropped) == (1, 1)


def test_waiting_entries_beyond_the_bound_are_dropped(settings):
    # No broker at all: the background thread cannot send; the read path never waits.
    local = replace(settings, kafka_bootstrap_servers=None)
    logger = AccessLogger(local, max_pending=50, flush_interval_s=60)
    for i in range(80):
        logger.record("a", None, f"user-{i}", "self-model", ["support"])
    assert logger.dropped == 30 and logger.pending() == 50
    logger.close()
    assert logger.produced == 0 and logger.dropped == 80 and logger.pending() == 0


def test_old_single_entry_records_stay_readable(settings, tmp_path):
    """Records of format version 1 (one JSON entry per Kafka record, keyed by the subject,
    as written before batching) are read beside version-2 batches, by the function and by
    the CLI; a foreign message is counted as skipped."""
    topic = settings.access_topic
    ensure_topics(settings.kafka_bootstrap_servers or "", {topic: settings.partitions})
    old = {"v": 1, "access_id": "0f0e", "at": 1767225600123, "agent": "triage_bot",
           "key_id": "k0", "subject_id": "user-42", "endpoint": "trace",
           "contexts": ["support"], "attribute": "emotional_state", "as_of": None, "count": 3}
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers)
    try:
        producer.send(topic, key=b"user-42", value=json.dumps(old).encode()).get(timeout=15)
        producer.send(topic, key=b"user-42", value=b"not json").get(timeout=15)
    finally:
        producer.close()
    logger = AccessLogger(settings)
    logger.record("billing_bot", "k1", "user-42", "self-model", ["billing"], count=2)
    logger.record("billing_bot", "k1", "user-43", "self-model", ["billing"], count=2)
    logger.close()
    assert logger.produced == 2

    records, skipped = read_access_log(settings, "user-42")
    assert skipped == 1
    assert [(r.agent, r.endpoint, r.attribute, r.count) for r in records] == [
        ("triage_bot", "trace", "emotional_state", 3), ("billing_bot", "self-model", None, 2)]
    assert records[0] == AccessRecord.from_json(old, records[0].partition, records[0].offset)

    env = cli_env(settings, tmp_path, BELIEFSTORE_ACCESS_TOPIC=topic)
    result = run(["access-log", "--subject", "user-42", "--json"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["agent"], r["endpoint"]) for r in rows] == [("triage_bot", "trace"),
                                                           ("billing_bot", "self-model")]
