"""Avro single-object encoding: round trip, every kind of poison, schema evolution."""

from __future__ import annotations

import struct
from importlib import resources
from pathlib import Path

import pytest

from beliefstore.errors import PoisonEvent, SchemaNotFound
from beliefstore.events.model import ObservationRecorded
from beliefstore.events.serde import MAGIC, AvroSerde, SchemaRegistry, encode_record
from tests.conftest import case_events, load_cases

V2 = Path(__file__).parent / "data" / "schemas_v2"
EVENTS = [e for c in load_cases() for e in case_events(c)]
OBS = ObservationRecorded(
    event_id="6f1c2a3b-0000-4000-8000-00000000abcd", subject_id="user-9", source="triage_agent",
    occurred_at=1767225600000, context="support", attribute="emotional_state",
    value="frustrated", confidence=0.88, evidence="msg-1", metadata={"model": "m1"},
)


def shipped() -> list[tuple[str, str]]:
    pkg = resources.files("beliefstore.schemas")
    return [(p.name, p.read_text()) for p in pkg.iterdir() if p.name.endswith(".avsc")]


def test_round_trip_of_every_vector_event():
    serde = AvroSerde()
    for event in EVENTS + [OBS]:
        data = serde.encode(event)
        assert data[:2] == MAGIC
        assert data[2:10] == serde.registry.current(event.schema_name).fingerprint
        assert serde.decode(data).event == event


def test_fingerprint_is_crc64_avro_of_canonical_form():
    # The Avro specification's test vector: fingerprint of "int" is 0x7275d51a3f395c8f.
    from beliefstore.events.serde import schema_fingerprint

    assert schema_fingerprint("int") == struct.pack("<Q", 0x7275D51A3F395C8F)


@pytest.mark.parametrize("mangle, kind", [
    (lambda d: b"", "bad_marker"),
    (lambda d: b"\x00\x01" + d[2:], "bad_marker"),
    (lambda d: b'{"json": true}', "bad_marker"),
    (lambda d: d[:2] + b"\xff" * 8 + d[10:], "unknown_schema"),
    (lambda d: d[:-5], "truncated"),
    (lambda d: d[:12], "truncated"),
    (lambda d: d + b"\x00\x00", "truncated"),
])
def test_poison_kinds(mangle, kind):
    serde = AvroSerde()
    with pytest.raises(PoisonEvent) as info:
        serde.decode(mangle(serde.encode(OBS)))
    assert info.value.kind == kind
    assert info.value.reason
    if kind == "unknown_schema":
        assert isinstance(info.value, SchemaNotFound)


def test_schema_valid_but_invalid_values_are_poison():
    serde = AvroSerde()
    record = {**OBS.__dict__, "confidence": 7.5}
    data = encode_record(record, serde.registry.current(OBS.schema_name))
    with pytest.raises(PoisonEvent) as info:
        serde.decode(data)
    assert info.value.kind == "invalid_event" and "confidence" in info.value.reason


def schema_version(registry: SchemaRegistry, version: int):
    return next(s for s in registry if s.name == OBS.schema_name and s.version == version)


def test_new_reader_reads_old_events():
    """v1 and v2 events decode under a reader whose current schema is v3 (defaults filled)."""
    new = AvroSerde(SchemaRegistry(shipped() + [(str(p), p.read_text()) for p in V2.glob("*.avsc")]))
    assert new.registry.current(OBS.schema_name).version == 3
    v1 = encode_record(OBS.__dict__, schema_version(new.registry, 1))
    v2 = AvroSerde(SchemaRegistry(shipped())).encode(OBS)
    for data, version in ((v1, 1), (v2, 2)):
        decoded = new.decode(data)
        assert decoded.event == OBS
        assert decoded.writer.version == version
        assert decoded.record["language"] is None and decoded.record["sealed"] is None


def test_old_reader_reads_new_events():
    """A v3 event (with the new field set) decodes under the shipped reader that knows v3
    as a writer schema, e.g. through BELIEFSTORE_SCHEMA_PATH; the new field is dropped."""
    newer = SchemaRegistry(shipped() + [(str(p), p.read_text()) for p in V2.glob("*.avsc")])
    data = encode_record({**OBS.__dict__, "language": "de-CH"}, newer.current(OBS.schema_name))
    old = AvroSerde(SchemaRegistry.default(extra_path=str(V2)))
    assert old.registry.current(OBS.schema_name).version == 2
    decoded = old.decode(data)
    assert decoded.event == OBS
    assert decoded.writer.version == 3
    assert "language" not in decoded.record
    # Without the v3 schema registered, the old reader refuses it clearly.
    with pytest.raises(SchemaNotFound, match="BELIEFSTORE_SCHEMA_PATH"):
        AvroSerde(SchemaRegistry(shipped())).decode(data)


def test_v1_reader_reads_plaintext_v2_events():
    """The sealing schema change is compatible backwards too: a v1-only reader that knows
    the v2 writer schema decodes a plaintext v2 observation."""
    v1_only = [(n, t) for n, t in shipped() if not n.startswith("ObservationRecorded.v2")]
    v2_file = [(n, t) for n, t in shipped() if n.startswith("ObservationRecorded.v2")]
    old = AvroSerde(SchemaRegistry(v1_only, extra=v2_file))
    assert old.registry.current(OBS.schema_name).version == 1
    assert old.decode(AvroSerde().encode(OBS)).event == OBS


def test_registry_rejects_misnamed_schema_files():
    with pytest.raises(ValueError, match="Name.vN.avsc"):
        SchemaRegistry([("observation.avsc", (V2 / "ObservationRecorded.v3.avsc").read_text())])
