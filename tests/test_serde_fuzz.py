"""Fuzzing the decoder: whatever bytes arrive on the topic, ``AvroSerde.decode`` either
returns a valid event or raises ``PoisonEvent`` (which the projector sends to the DLQ) —
never another exception that would stop the worker.

Budget: 300 examples per strategy (random bytes; bytes behind a valid marker and
fingerprint; mutated valid messages), about 900 decodes in all, a few seconds.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from beliefstore.errors import PoisonEvent
from beliefstore.events import serde as serde_module
from beliefstore.events.model import ObservationRecorded, ObservationRetracted, SubjectErased
from beliefstore.events.serde import MAGIC, AvroSerde, encode_record
from beliefstore.events.validation import validate

SERDE = AvroSerde()
EVENTS = [
    ObservationRecorded(
        event_id="6f1c2a3b-0000-4000-8000-00000000abcd", subject_id="user-9",
        source="triage_agent", occurred_at=1767225600000, context="support",
        attribute="emotional_state", value="frustrated", confidence=0.88, evidence="msg-1",
        metadata={"model": "m1", "session": "s-2"}),
    ObservationRecorded(
        event_id="6f1c2a3b-0000-4000-8000-00000000abce", subject_id="ü-👤", source="bot",
        occurred_at=0, context="c", attribute="a", value="v" * 300, confidence=0.0),
    ObservationRetracted(
        event_id="6f1c2a3b-0000-4000-8000-00000000abcf", subject_id="user-9",
        source="triage_agent", occurred_at=1767225600001,
        retracted_event_id="6f1c2a3b-0000-4000-8000-00000000abcd", reason="wrong customer"),
    SubjectErased(
        event_id="6f1c2a3b-0000-4000-8000-00000000abd0", subject_id="user-9",
        source="privacy-officer", occurred_at=1767225600002, reason="GDPR art. 17"),
]
VALID = [SERDE.encode(e) for e in EVENTS]
FINGERPRINTS = [schema.fingerprint for schema in SERDE.registry]

# Exceptions decode documents besides PoisonEvent for *sealed* observations (the
# crypto-shredding work): a reader without a keyring, or a destroyed key. Anything else
# escaping decode is a bug.
DOCUMENTED = tuple(
    cls for cls in (PoisonEvent, getattr(serde_module, "SealedEventError", None),
                    getattr(serde_module, "EventShredded", None))
    if isinstance(cls, type)
)
FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def decode_or_poison(data: bytes) -> None:
    try:
        decoded = SERDE.decode(data)
    except DOCUMENTED:
        return
    # Whatever decodes is a valid event.
    assert validate(decoded.event) is decoded.event or validate(decoded.event) == decoded.event


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes_never_raise_anything_but_poison(data):
    decode_or_poison(data)


@FUZZ
@given(fingerprint=st.sampled_from(FINGERPRINTS), body=st.binary(max_size=600))
def test_random_bodies_behind_a_known_fingerprint(fingerprint, body):
    decode_or_poison(MAGIC + fingerprint + body)


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "extend",
                                     "splice"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":  # interesting bytes for Avro varints and lengths
            data[at] = draw(st.sampled_from([0x00, 0x01, 0x02, 0x7F, 0x80, 0xFE, 0xFF]))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 8))]
        elif kind == "truncate":
            del data[at:]
        elif kind == "extend":
            data += draw(st.binary(min_size=1, max_size=32))
        else:  # the body of one valid message behind another's header
            other = draw(st.sampled_from(VALID))
            data = bytearray(data[:10] + other[10:])
    return bytes(data)


@FUZZ
@given(mutated())
def test_mutated_valid_messages_never_raise_anything_but_poison(data):
    decode_or_poison(data)


def test_the_valid_messages_decode():
    assert [SERDE.decode(d).event for d in VALID] == EVENTS


def _outcome(decode, data: bytes):
    """What ``decode(data)`` gives: ``("event", event)`` or ``("poison", kind, reason)``."""
    try:
        return ("event", decode(data).event)
    except PoisonEvent as exc:
        return ("poison", exc.kind, exc.reason)


def _checked_decode(data: bytes):
    """``decode`` with its fast path off: every message through the checked path."""
    return SERDE.open_decoded(SERDE._decode_checked(data))


@FUZZ
@given(st.one_of(mutated(), st.sampled_from(VALID)))
def test_the_fast_path_decodes_exactly_as_the_checked_path(data):
    # AvroSerde.decode reads current-schema messages without fastavro's logical types and
    # falls back to the checked path for anything unusual: the same events, the same
    # poison kinds and reasons (the dead-letter headers) either way.
    assert _outcome(SERDE.decode, data) == _outcome(_checked_decode, data)


def test_the_fast_path_takes_the_common_case_and_leaves_the_rest():
    assert all(SERDE._decode_fast(d) is not None for d in VALID)
    # A non-canonical uuid on the wire (upper case): the checked path normalises it.
    upper = encode_record({**vars(EVENTS[0]), "event_id": EVENTS[0].event_id.upper()},
                          SERDE.registry.current(EVENTS[0].schema_name))
    assert SERDE._decode_fast(upper) is None
    assert SERDE.decode(upper).event == EVENTS[0]
    # A time before the epoch: the checked path names the field.
    early = encode_record({**vars(EVENTS[0]), "occurred_at": -1},
                          SERDE.registry.current(EVENTS[0].schema_name))
    assert SERDE._decode_fast(early) is None
    assert _outcome(SERDE.decode, early) == _outcome(_checked_decode, early)
