"""Fuzzing the decoder: whatever bytes arrive on the topic, ``AvroSerde.decode`` either
returns a valid event or raises ``PoisonEvent`` (which the projector sends to the DLQ) —
never another exception that would stop the worker.

Budget: 300 examples per strategy (random bytes; bytes behind a valid marker and
fingerprint; mutated valid messages), about 900 decodes in all, a few seconds.
"""

from __future__ import annotations

import dataclasses
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from beliefstore.errors import PoisonEvent
from beliefstore.events import serde as serde_module
from beliefstore.events.model import ObservationRecorded, ObservationRetracted, SubjectErased
from beliefstore.events.serde import MAGIC, AvroSerde, encode_record
from beliefstore.events.validation import validate
from beliefstore.projector import rebuild_pool

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
        # a fastavro error message may name an object's address: not part of the outcome
        return ("poison", exc.kind, re.sub(r"0x[0-9a-f]+", "0x…", exc.reason))


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


# Records with every field drawn near the validation rules' edges (ids starting with a
# space, control characters, backslashes, NUL, empty or over-long strings, confidences
# outside [0, 1] or NaN, metadata at its limits), written with a current schema but
# without validation: what the bulk rebuild's decode_plain must either decode exactly as
# decode does or leave to it.
_CHARS = st.sampled_from(["a", "Z", "0", "-", "_", ".", ":", " ", "\t", "\n", "\\", "\x00",
                          "\x1f", "\x7f", "é", "👤", "\u2028", "\u00a0"])


def _string(max_size: int = 6) -> st.SearchStrategy[str]:
    return st.lists(_CHARS, max_size=max_size).map("".join)


def _long(limit: int) -> st.SearchStrategy[str]:
    return st.sampled_from([limit - 1, limit, limit + 1]).map(lambda n: "x" * n)


@st.composite
def edge_records(draw) -> bytes:
    base = draw(st.sampled_from(EVENTS))
    record = dict(vars(base))
    if isinstance(base, ObservationRecorded):
        record["sealed"] = None
    uuids = st.sampled_from([base.event_id, base.event_id.upper(), "not-a-uuid",
                             "6f1c2a3b-0000-4000-8000-00000000abcd"])
    strategies = {
        "event_id": uuids, "retracted_event_id": uuids,
        "subject_id": st.one_of(_string(), _long(256)), "source": st.one_of(_string(), _long(256)),
        "occurred_at": st.sampled_from([0, -1, 1767225600000, 253402300799999, 253402300800000]),
        "context": st.one_of(_string(), _long(128)), "attribute": st.one_of(_string(), _long(128)),
        "value": st.one_of(_string(), _long(4096)),
        "confidence": st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                                st.sampled_from([0.0, 1.0, -0.0, 1.0000000000000002])),
        "evidence": st.one_of(st.none(), _string(), _long(16384)),
        "reason": st.one_of(st.none(), _string(), _long(16384)),
        "metadata": st.one_of(
            st.dictionaries(st.one_of(_string(), _long(128)), st.one_of(_string(), _long(1024)),
                            max_size=3),
            st.just({f"k{i}": "v" for i in range(33)})),
    }
    for name in draw(st.lists(st.sampled_from(sorted(record)), max_size=4, unique=True)):
        if name in strategies:
            record[name] = draw(strategies[name])
    try:
        return encode_record(record, SERDE.registry.current(base.schema_name))
    except Exception:  # e.g. a lone surrogate: not encodable, so never on the wire
        return VALID[0]


def _plain_fields(cls, record) -> dict:
    return {f.name: record[f.name] for f in dataclasses.fields(cls)}


@FUZZ
@given(st.one_of(edge_records(), mutated(), st.sampled_from(VALID)))
def test_decode_plain_returns_only_what_decode_returns(data):
    # The bulk rebuild's decoding (decode_plain: no event object, no field-by-field
    # validation) takes a message only when decode would return that same valid event;
    # anything else (poison included) it leaves to decode.
    quick = SERDE.decode_plain(data)
    if quick is None:
        return
    cls, writer, record = quick
    decoded = SERDE.decode(data)  # raises if decode_plain took a poison message
    assert type(decoded.event) is cls and decoded.writer == writer
    assert _plain_fields(cls, record) == vars(decoded.event)


@FUZZ
@given(st.one_of(edge_records(), mutated(), st.sampled_from(VALID)))
def test_decode_valid_returns_only_decodes_event(data):
    # The live projector's decoding (decode_valid: decode_plain's record as an event, no
    # field-by-field validation) takes a message only when decode returns that same
    # event; anything else (poison included) it leaves to decode.
    quick = SERDE.decode_valid(data)
    if quick is None:
        return
    decoded = SERDE.decode(data)  # raises if decode_valid took a poison message
    assert quick.event == decoded.event and type(quick.event) is type(decoded.event)
    assert quick.writer == decoded.writer and quick.record.get("sealed") is None


def test_decode_valid_takes_the_common_case():
    assert [SERDE.decode_valid(d).event for d in VALID] == EVENTS
    spaced = SERDE.encode(dataclasses.replace(EVENTS[0], subject_id=" user-9"))
    assert SERDE.decode_valid(spaced) is None


def test_decode_plain_takes_the_common_case():
    assert all(SERDE.decode_plain(d) is not None for d in VALID)
    assert [_plain_fields(*SERDE.decode_plain(d)[::2]) for d in VALID] == [vars(e)
                                                                            for e in EVENTS]
    # an id that starts with a space is valid but not proven by the quick checks
    spaced = SERDE.encode(dataclasses.replace(EVENTS[0], subject_id=" user-9"))
    assert SERDE.decode_plain(spaced) is None and SERDE.decode(spaced).event.subject_id == " user-9"


class _CheckedOnly(AvroSerde):
    def decode_plain(self, data):  # every message through decode, as before decode_plain
        return None


@FUZZ
@given(st.lists(st.one_of(edge_records(), mutated(), st.sampled_from(VALID)), max_size=12),
       st.lists(st.sampled_from([None, b"user-9", b"other"]), min_size=12, max_size=12))
def test_the_rebuild_workers_items_do_not_depend_on_decode_plain(messages, keys):
    # rebuild_pool.decode_chunk: the same items (COPY lines, counting tuples, poison kinds
    # and reasons) whether a record takes decode_plain or decode.
    records = [(i, 1767225600000 + i if i % 3 else -1, keys[i], m)
               for i, m in enumerate(messages)]
    outcomes = []
    for serde in (SERDE, _CheckedOnly(SERDE.registry)):
        rebuild_pool._serde = serde
        try:
            outcomes.append(rebuild_pool.decode_chunk("topic\tx", 3, records))
        finally:
            rebuild_pool._serde = None
    # (a fastavro error message may name an object's address: not part of the outcome)
    same = [[tuple(re.sub(r"0x[0-9a-f]+", "0x…", x) if isinstance(x, str) else x
                   for x in item) for item in items] for items in outcomes]
    assert same[0] == same[1]
    assert len(outcomes[0]) == len(records)
