"""Avro single-object encoding of events, with the ``.avsc`` files as the schema registry.

Wire format (Avro specification, "Single object encoding")::

    C3 01 | 8-byte little-endian CRC-64-AVRO fingerprint of the writer schema's
            Parsing Canonical Form | Avro binary body

Every message names its exact writer schema. The reader looks the fingerprint up
in a :class:`SchemaRegistry` and resolves writer → reader schema with fastavro,
following Avro's schema-resolution rules (so a new optional field with a default
neither breaks old events nor old readers that know the new writer schema).
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import fingerprint as avro_fingerprint
from fastavro.schema import to_parsing_canonical_form

from beliefstore.errors import BeliefstoreError, PoisonEvent, SchemaNotFound, ValidationError
from beliefstore.events.model import (
    Event,
    ObservationRecorded,
    ObservationRetracted,
    SubjectErased,
)
from beliefstore.events.sealing import FieldSealer
from beliefstore.events.validation import MAX_TIMESTAMP_MS, plainly_valid, validate
from beliefstore.timefmt import to_millis

MAGIC = b"\xc3\x01"
"""The single-object encoding marker."""
HEADER_LENGTH = 10
"""Marker (2 bytes) + fingerprint (8 bytes)."""

_FILE_NAME = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)\.v(?P<version>\d+)\.avsc$")
_CLASSES: dict[str, type[ObservationRecorded] | type[ObservationRetracted] | type[SubjectErased]]
_CLASSES = {cls.schema_name: cls for cls in (ObservationRecorded, ObservationRetracted, SubjectErased)}


class SealedEventError(BeliefstoreError):
    """A sealed observation met a serde without a keyring: configure DATABASE_URL and
    the master key (BELIEFSTORE_MASTER_KEY or <home>/master.key), or use
    :meth:`AvroSerde.for_settings`."""

    def __init__(self, event_id: str):
        super().__init__(f"observation {event_id} is sealed and this reader has no keyring: "
                         "set DATABASE_URL and BELIEFSTORE_MASTER_KEY (or run where "
                         ".beliefstore/master.key is)")


@dataclass(frozen=True)
class RegisteredSchema:
    """One version of one event schema.

    Attributes:
        name: full record name, e.g. ``beliefstore.ObservationRecorded``.
        version: the ``N`` of the file name ``ObservationRecorded.vN.avsc``.
        fingerprint: 8 bytes, CRC-64-AVRO of the Parsing Canonical Form, little-endian.
        parsed: the fastavro-parsed schema.
        source: the file it came from.
        document: the ``.avsc`` JSON document as written (for discovery, ``GET /v1/schemas``).
        own: whether it is one of this code's versions (shipped), not an extra writer schema.
    """

    name: str
    version: int
    fingerprint: bytes
    parsed: Any
    source: str
    document: Any = None
    own: bool = True


def schema_fingerprint(schema: Any) -> bytes:
    """CRC-64-AVRO fingerprint (8 bytes, little-endian) of a schema's Parsing Canonical Form."""
    pcf = to_parsing_canonical_form(fastavro.parse_schema(schema, _write_hint=False))
    return bytes.fromhex(avro_fingerprint(pcf, "CRC-64-AVRO"))


class SchemaRegistry:
    """The schemas beliefstore can read and write, looked up by fingerprint.

    ``own`` schemas are this code's versions: the highest version of each record name
    is the one written and the reader schema every message is resolved to. ``extra``
    schemas are only known as writer schemas (e.g. a newer producer's ``.avsc``
    dropped into ``BELIEFSTORE_SCHEMA_PATH``), so an older reader can still decode
    their messages.

    Raises:
        ValueError: a file name that is not ``Name.vN.avsc``, or a record name that
            does not match the file name.
    """

    def __init__(self, own: Iterable[tuple[str, str]], extra: Iterable[tuple[str, str]] = ()):
        self._by_fingerprint: dict[bytes, RegisteredSchema] = {}
        self._current: dict[str, RegisteredSchema] = {}
        for origin, text in own:
            entry = self._add(origin, text, own=True)
            best = self._current.get(entry.name)
            if best is None or entry.version > best.version:
                self._current[entry.name] = entry
        for origin, text in extra:
            self._add(origin, text, own=False)

    def _add(self, origin: str, text: str, own: bool) -> RegisteredSchema:
        match = _FILE_NAME.match(Path(origin).name)
        if not match:
            raise ValueError(f"{origin}: schema files must be named Name.vN.avsc")
        raw = json.loads(text)
        parsed: dict[str, Any] = fastavro.parse_schema(raw)  # type: ignore[assignment]
        name = parsed["name"]
        if name.rsplit(".", 1)[-1] != match["name"]:
            raise ValueError(f"{origin}: file name does not match record name {name}")
        entry = RegisteredSchema(
            name=name,
            version=int(match["version"]),
            fingerprint=schema_fingerprint(raw),
            parsed=parsed,
            source=origin,
            document=raw,
            own=own,
        )
        self._by_fingerprint[entry.fingerprint] = entry
        return entry

    @classmethod
    def default(cls, extra_path: str | None = None) -> SchemaRegistry:
        """The shipped ``schemas/`` files, plus every ``*.avsc`` in ``extra_path``.

        ``extra_path`` is an ``os.pathsep``-separated list of folders; it defaults to
        the ``BELIEFSTORE_SCHEMA_PATH`` environment variable.
        """
        package = resources.files("beliefstore.schemas")
        own = [
            (item.name, item.read_text(encoding="utf-8"))
            for item in package.iterdir()
            if item.name.endswith(".avsc")
        ]
        if extra_path is None:
            extra_path = os.environ.get("BELIEFSTORE_SCHEMA_PATH", "")
        extra = [
            (str(p), p.read_text(encoding="utf-8"))
            for folder in extra_path.split(os.pathsep)
            if folder
            for p in sorted(Path(folder).glob("*.avsc"))
        ]
        return cls(own, extra)

    def current(self, name: str) -> RegisteredSchema:
        """The schema this code writes and reads ``name`` as (its highest own version)."""
        return self._current[name]

    def is_current(self, entry: RegisteredSchema) -> bool:
        """Whether ``entry`` is the version this code writes for its record name."""
        best = self._current.get(entry.name)
        return best is not None and best.fingerprint == entry.fingerprint

    def lookup(self, fingerprint: bytes) -> RegisteredSchema:
        """The schema with this fingerprint.

        Raises:
            SchemaNotFound: no registered schema has it.
        """
        try:
            return self._by_fingerprint[fingerprint]
        except KeyError:
            raise SchemaNotFound(fingerprint) from None

    def __iter__(self):
        return iter(self._by_fingerprint.values())


@dataclass(frozen=True)
class DecodedEvent:
    """A message decoded from the log.

    Attributes:
        event: the validated event.
        writer: the writer schema named by the message's fingerprint.
        record: the record as resolved to the reader schema (may hold fields the
            event classes do not model yet, with their defaults); its ``uuid`` and
            ``timestamp-millis`` fields may hold the plain Avro values (``str``, epoch ms)
            rather than ``uuid.UUID`` and ``datetime``.
    """

    event: Event
    writer: RegisteredSchema
    record: dict[str, Any]


_KNOWN: dict[type, frozenset[str]] = {}

_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
"""A UUID in the form ``str(uuid.UUID(v))`` gives: the ids the fast path passes through."""


def _plain(schema: Any) -> Any:
    """``schema`` (an ``.avsc`` document) without its ``logicalType`` annotations."""
    if isinstance(schema, dict):
        return {k: _plain(v) for k, v in schema.items() if k != "logicalType"}
    if isinstance(schema, list):
        return [_plain(v) for v in schema]
    return schema


@dataclass(frozen=True)
class _FastPlan:
    """How :meth:`AvroSerde._decode_fast` reads one current writer schema: its parsed
    form without logical types (uuids stay strings, timestamps epoch ms), the event class
    and its fields, and the uuid fields to check."""

    writer: RegisteredSchema
    parsed: Any
    cls: type
    known: frozenset[str]
    uuids: tuple[str, ...]


def _decoded(plan: _FastPlan, record: dict[str, Any]) -> DecodedEvent:
    """The event of a record read under ``plan`` (its class's fields only), with the
    record and the writer schema: not validated or opened."""
    known = plan.known
    return DecodedEvent(event=plan.cls(**{k: v for k, v in record.items() if k in known}),
                        writer=plan.writer, record=record)


def _known_fields(cls: type) -> frozenset[str]:
    """The field names of an event class (cached: ``dataclasses.fields`` is slow)."""
    known = _KNOWN.get(cls)
    if known is None:
        known = _KNOWN[cls] = frozenset(f.name for f in fields(cls))
    return known


class AvroSerde:
    """Encodes events to, and decodes them from, single-object-encoded Avro bytes.

    Args:
        registry: the schemas (default: the shipped ones + ``BELIEFSTORE_SCHEMA_PATH``).
        sealer: seals observations' personal fields on encode and opens them on decode
            (crypto-shredding); without one, observations are written in plaintext and
            sealed ones cannot be decoded.
    """

    def __init__(self, registry: SchemaRegistry | None = None,
                 sealer: FieldSealer | None = None):
        self.registry = registry or SchemaRegistry.default()
        self.sealer = sealer
        self._plans: dict[bytes, _FastPlan | None] = {}

    @classmethod
    def for_settings(cls, settings) -> AvroSerde:
        """The serde for ``settings``: sealing on when ``settings.sealing`` and a database
        (for the keyring) are configured.

        Raises:
            KeyringError: a malformed master key.
        """
        if not (getattr(settings, "sealing", False) and settings.database_url):
            return cls()
        from beliefstore.access.datakeys import Keyring

        return cls(sealer=FieldSealer(Keyring.from_settings(settings)))

    def encode(self, event: Event,
               data_keys: Mapping[str, tuple[str, bytes]] | None = None) -> bytes:
        """The single-object encoding of ``event`` under its current schema (observations
        sealed when this serde has a sealer, with the subject's key from ``data_keys``
        (``{subject_id: (key_id, key)}``, as :meth:`Keyring.data_keys` returns them) if
        it is there, else looked up).

        Raises:
            ValidationError: the event is invalid (see :func:`validate`).
        """
        validate(event)
        schema = self.registry.current(event.schema_name)
        record = {f.name: getattr(event, f.name) for f in fields(event)}
        if self.sealer is not None and isinstance(event, ObservationRecorded):
            record |= {"value": "", "evidence": None, "metadata": {},
                       "sealed": self.sealer.seal(
                           event, None if data_keys is None else data_keys.get(event.subject_id))}
        return encode_record(record, schema)

    def decode(self, data: bytes, *, open_sealed: bool = True) -> DecodedEvent:
        """Decode and validate one message.

        With ``open_sealed=False`` a sealed observation comes back still sealed and not
        yet validated (its personal fields empty, the ``sealed`` record in ``record``);
        :meth:`open_decoded` finishes it. The projector decodes a whole batch that way,
        fetches every data key the batch needs in one query
        (:meth:`~beliefstore.access.datakeys.Keyring.prefetch`), then opens them.

        Raises:
            PoisonEvent: ``kind`` is ``bad_marker`` (no ``C3 01``), ``unknown_schema``
                (:class:`SchemaNotFound`), ``truncated`` (body ends early or has
                trailing bytes) or ``invalid_event`` (decodes but fails validation, or
                its sealed fields do not authenticate).
            EventShredded: a sealed observation whose subject was erased (key destroyed).
            SealedEventError: a sealed observation and no sealer configured.
        """
        decoded = self._decode_fast(data)
        if decoded is None:
            decoded = self._decode_checked(data)
        if not open_sealed and decoded.record.get("sealed") is not None and isinstance(
                decoded.event, ObservationRecorded):
            return decoded
        return self.open_decoded(decoded)

    def _plan(self, fingerprint: bytes) -> _FastPlan | None:
        """The fast path's plan of a writer schema (``None``: not a current schema, so
        it needs resolution: the checked path)."""
        try:
            return self._plans[fingerprint]
        except KeyError:
            pass
        plan = None
        try:
            entry: RegisteredSchema | None = self.registry.lookup(fingerprint)
        except SchemaNotFound:
            entry = None
        if entry is not None and entry.own and self.registry.is_current(entry) \
                and entry.name in _CLASSES:
            cls = _CLASSES[entry.name]
            uuids = tuple(f["name"] for f in entry.document["fields"]
                          if isinstance(f["type"], dict)
                          and f["type"].get("logicalType") == "uuid")
            plan = _FastPlan(entry, fastavro.parse_schema(_plain(entry.document)), cls,
                             _known_fields(cls), uuids)
        self._plans[fingerprint] = plan
        return plan

    def _read_fast(self, data: bytes) -> tuple[_FastPlan, dict[str, Any]] | None:
        """The read of :meth:`_decode_fast`: the plan and the plain record of a message
        under a current schema whose uuids are canonical and whose time is in range;
        ``None`` for anything else."""
        if data is None or len(data) < HEADER_LENGTH or data[:2] != MAGIC:
            return None
        plan = self._plan(bytes(data[2:HEADER_LENGTH]))
        if plan is None:
            return None
        buffer = io.BytesIO(data)
        buffer.seek(HEADER_LENGTH)
        try:
            record = fastavro.schemaless_reader(buffer, plan.parsed, None)
        except Exception:  # the checked path names it
            return None
        if buffer.tell() != len(data) or not isinstance(record, dict):
            return None
        for name in plan.uuids:
            value = record.get(name)
            if not isinstance(value, str) or not _CANONICAL_UUID.fullmatch(value):
                return None
        occurred_at = record.get("occurred_at")
        if not isinstance(occurred_at, int) or not 0 <= occurred_at <= MAX_TIMESTAMP_MS:
            return None
        return plan, record

    def decode_plain(self, data: bytes
                     ) -> tuple[type[Event], RegisteredSchema, dict[str, Any]] | None:
        """The bulk rebuild's decoding: ``(event class, writer schema, record)`` of a
        message that :meth:`decode` would return as a valid, unsealed event whose fields
        are the record's (``occurred_at`` epoch ms, ids strings), without building the
        event or validating it field by field; ``None`` whenever that is not proven
        (a bad marker, an older or unknown schema, a sealed observation, anything the
        quick checks below do not pass): then :meth:`decode` decodes the message, and
        names the fault if it is poison. So ``decode_plain`` changes no outcome, it only
        skips work for the common case. The quick checks are sufficient conditions of
        :func:`~beliefstore.events.validation.validate` (its own fast branches), not
        all of it: a valid event may still get ``None`` (e.g. an id that starts with a
        space). ``tests/test_serde_fuzz.py`` checks that every record it returns is
        :meth:`decode`'s event."""
        read = self._read_valid(data)
        return None if read is None else (read[0].cls, read[0].writer, read[1])

    def _read_valid(self, data: bytes) -> tuple[_FastPlan, dict[str, Any]] | None:
        """:meth:`_read_fast`'s plan and record when the quick checks prove the event valid
        (:func:`~beliefstore.events.validation.plainly_valid`), else ``None``."""
        read = self._read_fast(data)
        if read is None or not plainly_valid(read[0].cls, read[1]):
            return None
        return read

    def decode_valid(self, data: bytes) -> DecodedEvent | None:
        """The live projector's decoding of the common case: :meth:`decode`'s event for a
        message :meth:`decode_plain` takes (valid, unsealed, under a current schema),
        built from its record without validating it field by field; ``None`` for
        anything else, which :meth:`decode` then decodes (and names the fault of).
        ``tests/test_serde_fuzz.py`` checks the event equals :meth:`decode`'s."""
        read = self._read_valid(data)
        return None if read is None else _decoded(*read)

    def _decode_fast(self, data: bytes) -> DecodedEvent | None:
        """The common case of :meth:`decode` in fewer steps, not yet validated or opened:
        a message under a current schema read without fastavro's logical types (no
        ``uuid.UUID`` or ``datetime`` built and turned back), giving the same event as
        :meth:`_decode_checked` whenever its uuids are canonical and its time is in
        range. ``None`` for anything else (a bad marker, an unknown or older schema, a
        body that does not read cleanly, a non-canonical uuid, a time out of range):
        the checked path then decodes it and names the fault."""
        read = self._read_fast(data)
        return None if read is None else _decoded(*read)

    def _decode_checked(self, data: bytes) -> DecodedEvent:
        """Decode one message, every fault named (the path of :meth:`decode` for what
        :meth:`_decode_fast` does not take); not yet validated or opened.

        Raises:
            PoisonEvent: as :meth:`decode`.
        """
        if data is None or len(data) < HEADER_LENGTH or data[:2] != MAGIC:
            head = (data or b"")[:2].hex() or "empty"
            raise PoisonEvent(
                "bad_marker",
                f"message does not start with the Avro single-object marker c301 "
                f"(starts with {head}, {len(data or b'')} bytes)",
            )
        writer = self.registry.lookup(bytes(data[2:HEADER_LENGTH]))
        reader = self.registry.current(writer.name)
        buffer = io.BytesIO(data[HEADER_LENGTH:])
        try:
            # Same schema: no resolution step (fastavro resolves whenever a reader is given).
            record = fastavro.schemaless_reader(
                buffer, writer.parsed,
                None if reader.fingerprint == writer.fingerprint else reader.parsed)
        except (EOFError, ValueError, IndexError, UnicodeDecodeError, OverflowError) as exc:
            raise PoisonEvent(
                "truncated", f"Avro body does not match {writer.name} v{writer.version}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        except Exception as exc:  # fastavro raises assorted errors on corrupt bodies
            raise PoisonEvent(
                "truncated", f"Avro body of {writer.name} v{writer.version} is corrupt: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        rest = len(data) - HEADER_LENGTH - buffer.tell()
        if rest:
            raise PoisonEvent(
                "truncated", f"{rest} trailing bytes after the {writer.name} body"
            )
        if not isinstance(record, dict):
            raise PoisonEvent("truncated", f"{writer.name} body is not a record")
        cls = _CLASSES[writer.name]
        known = _known_fields(cls)
        kwargs = {k: v for k, v in record.items() if k in known}
        if isinstance(kwargs.get("occurred_at"), datetime):  # the events' only time field
            kwargs["occurred_at"] = to_millis(kwargs["occurred_at"])
        for k in ("event_id", "retracted_event_id"):
            if k in kwargs:
                kwargs[k] = str(kwargs[k])
        try:
            event = cls(**kwargs)
        except ValidationError as exc:
            raise PoisonEvent("invalid_event", str(exc)) from exc
        return DecodedEvent(event=event, writer=writer, record=record)

    def open_decoded(self, decoded: DecodedEvent) -> DecodedEvent:
        """Open the sealed fields of ``decoded`` (if any) and validate it: the second half
        of ``decode(data, open_sealed=False)``.

        Raises:
            PoisonEvent, EventShredded, SealedEventError: as :meth:`decode`.
        """
        event = decoded.event
        sealed = decoded.record.get("sealed")
        try:
            if sealed is not None and isinstance(event, ObservationRecorded):
                if self.sealer is None:
                    raise SealedEventError(event.event_id)
                event = self.sealer.open(event, sealed)
            event = validate(event)
        except ValidationError as exc:
            raise PoisonEvent("invalid_event", str(exc)) from exc
        return DecodedEvent(event=event, writer=decoded.writer, record=decoded.record)


def encode_record(record: dict[str, Any], schema: RegisteredSchema) -> bytes:
    """Single-object-encode a plain record under ``schema`` (no validation)."""
    buffer = io.BytesIO()
    buffer.write(MAGIC)
    buffer.write(schema.fingerprint)
    fastavro.schemaless_writer(buffer, schema.parsed, record)
    return buffer.getvalue()
