"""Checks every event before it is produced, and after it is decoded from the log.

The same rules serve the SDK, the HTTP API (``422`` with the field's error), the
``produce`` command and the projector (an invalid decoded event is a poison
message). Every problem is reported with the offending field's name.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from beliefstore.errors import FieldError, ValidationError
from beliefstore.events.model import (
    EVENT_TYPES,
    Event,
    ObservationRecorded,
    ObservationRetracted,
    SubjectErased,
)

MAX_ID_LENGTH = 256
"""Longest subject_id / source, in characters."""
MAX_NAME_LENGTH = 128
"""Longest context / attribute, in characters."""
MAX_VALUE_LENGTH = 4096
"""Longest observed value, in characters."""
MAX_TEXT_LENGTH = 16384
"""Longest evidence / reason, in characters."""
MAX_METADATA_ENTRIES = 32
MAX_METADATA_KEY_LENGTH = 128
MAX_METADATA_VALUE_LENGTH = 1024
MAX_TIMESTAMP_MS = 253402300799999
"""9999-12-31T23:59:59.999Z: the largest occurred_at accepted, epoch milliseconds."""

_NAME = re.compile(r"^[A-Za-z0-9_.:-]+$")
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
"""What ``str(uuid.UUID(v)) == v`` accepts: the canonical lowercase form."""
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BAD_ID = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")
"""What _check_id refuses anywhere in an id: control characters, NUL, lone surrogates."""
# What PostgreSQL text (and UTF-8) cannot hold: NUL, and lone UTF-16 surrogates (a JSON
# "\ud800" decodes to one).
_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")
_UNSTORABLE_MESSAGE = ("must not contain NUL (\\u0000) or unpaired surrogates "
                       "(PostgreSQL text and UTF-8 cannot hold them)")


def _check_id(errors: list[FieldError], name: str, value: Any, limit: int = MAX_ID_LENGTH) -> None:
    if isinstance(value, str) and 0 < len(value) <= limit and not value[0].isspace() \
            and not _BAD_ID.search(value):
        return  # the common case in one scan; the checks below name what is wrong
    if not isinstance(value, str):
        errors.append(FieldError(name, f"must be a string, got {type(value).__name__}"))
    elif not value.strip():
        errors.append(FieldError(name, "must not be empty"))
    elif len(value) > limit:
        errors.append(FieldError(name, f"is {len(value)} characters long; the limit is {limit}"))
    elif _CONTROL.search(value):
        errors.append(FieldError(name, "must not contain control characters"))
    elif _UNSTORABLE.search(value):
        errors.append(FieldError(name, _UNSTORABLE_MESSAGE))


def _check_name(errors: list[FieldError], name: str, value: Any) -> None:
    if isinstance(value, str) and len(value) <= MAX_NAME_LENGTH and _NAME.fullmatch(value):
        return  # letters, digits and _ . : - only: no space, control or NUL to look for
    before = len(errors)
    _check_id(errors, name, value, MAX_NAME_LENGTH)
    if len(errors) == before and not _NAME.match(value):
        errors.append(
            FieldError(name, f"{value!r} may only contain letters, digits and _ . : - (no spaces)")
        )


def _check_uuid(errors: list[FieldError], name: str, value: Any) -> None:
    if not isinstance(value, str):
        errors.append(FieldError(name, f"must be a UUID string, got {type(value).__name__}"))
        return
    if _CANONICAL_UUID.fullmatch(value):
        return  # the common case, without building a uuid.UUID
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        errors.append(FieldError(name, f"{value!r} is not a UUID"))
        return
    if str(parsed) != value:
        errors.append(FieldError(name, f"must be a canonical lowercase UUID, e.g. {parsed}"))


def _check_text(errors: list[FieldError], name: str, value: Any, limit: int) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        errors.append(FieldError(name, f"must be a string or null, got {type(value).__name__}"))
    elif len(value) > limit:
        errors.append(FieldError(name, f"is {len(value)} characters long; the limit is {limit}"))
    elif _UNSTORABLE.search(value):
        errors.append(FieldError(name, _UNSTORABLE_MESSAGE))


def _check_time(errors: list[FieldError], name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        errors.append(
            FieldError(name, f"must be an integer (epoch milliseconds), got {type(value).__name__}")
        )
    elif not 0 <= value <= MAX_TIMESTAMP_MS:
        errors.append(FieldError(name, f"{value} is outside 0..{MAX_TIMESTAMP_MS} epoch ms"))


def _check_common(errors: list[FieldError], event: Any) -> None:
    _check_uuid(errors, "event_id", event.event_id)
    _check_id(errors, "subject_id", event.subject_id)
    _check_id(errors, "source", event.source)
    _check_time(errors, "occurred_at", event.occurred_at)


def _check_observation(errors: list[FieldError], event: ObservationRecorded) -> None:
    _check_name(errors, "context", event.context)
    _check_name(errors, "attribute", event.attribute)
    if not isinstance(event.value, str):
        errors.append(FieldError("value", f"must be a string, got {type(event.value).__name__}"))
    elif not event.value:
        errors.append(FieldError("value", "must not be empty"))
    elif len(event.value) > MAX_VALUE_LENGTH:
        errors.append(
            FieldError("value", f"is {len(event.value)} characters long; the limit is "
                       f"{MAX_VALUE_LENGTH}")
        )
    elif _UNSTORABLE.search(event.value):
        errors.append(FieldError("value", _UNSTORABLE_MESSAGE))
    c = event.confidence
    if isinstance(c, bool) or not isinstance(c, int | float):
        errors.append(FieldError("confidence", f"must be a number, got {type(c).__name__}"))
    elif math.isnan(c) or not 0.0 <= c <= 1.0:
        errors.append(FieldError("confidence", f"{c} is outside [0, 1]"))
    _check_text(errors, "evidence", event.evidence, MAX_TEXT_LENGTH)
    md = event.metadata
    if not isinstance(md, Mapping):
        errors.append(FieldError("metadata", f"must be an object of strings, got {type(md).__name__}"))
        return
    if len(md) > MAX_METADATA_ENTRIES:
        errors.append(
            FieldError("metadata", f"has {len(md)} entries; the limit is {MAX_METADATA_ENTRIES}")
        )
    for k, v in md.items():
        if not isinstance(k, str) or not k or len(k) > MAX_METADATA_KEY_LENGTH:
            errors.append(
                FieldError("metadata", f"key {k!r} must be a non-empty string of at most "
                           f"{MAX_METADATA_KEY_LENGTH} characters")
            )
        elif _UNSTORABLE.search(k):
            errors.append(FieldError("metadata", f"key {k!r} {_UNSTORABLE_MESSAGE}"))
        elif not isinstance(v, str):
            errors.append(FieldError(f"metadata.{k}", f"must be a string, got {type(v).__name__}"))
        elif len(v) > MAX_METADATA_VALUE_LENGTH:
            errors.append(
                FieldError(f"metadata.{k}", f"is {len(v)} characters long; the limit is "
                           f"{MAX_METADATA_VALUE_LENGTH}")
            )
        elif _UNSTORABLE.search(v):
            errors.append(FieldError(f"metadata.{k}", _UNSTORABLE_MESSAGE))


def check_id(name: str, value: Any) -> list[FieldError]:
    """The problems of ``value`` as an id (subject_id, source): a non-blank string of at
    most :data:`MAX_ID_LENGTH` characters, without control characters, NUL or surrogates.
    ``[]`` when it is valid. The API applies it to ids in paths and queries."""
    errors: list[FieldError] = []
    _check_id(errors, name, value)
    return errors


def check_name(name: str, value: Any) -> list[FieldError]:
    """The problems of ``value`` as a context or attribute name: ``[A-Za-z0-9_.:-]``, at
    most :data:`MAX_NAME_LENGTH` characters. ``[]`` when it is valid."""
    errors: list[FieldError] = []
    _check_name(errors, name, value)
    return errors


def plainly_valid(cls: type, r: dict[str, Any]) -> bool:
    """Whether the plain record ``r`` of a current ``cls`` schema (its types the schema's:
    strings ``str``, the confidence a ``float``, ``occurred_at`` and uuids already
    checked by the caller, as ``AvroSerde._read_fast`` does) passes :func:`validate` by
    the same fast branches validation takes (``_check_id``, ``_check_name``,
    ``_check_text``, the value, confidence and metadata rules), and is not sealed. ``False`` only means
    "not proven": the caller then validates the event (``AvroSerde.decode_plain``
    returns ``None`` and ``decode`` decides). Kept beside the rules it mirrors so a
    change of one is seen next to the other; ``tests/test_serde_fuzz.py`` checks that
    every record it passes is the event ``decode`` returns."""
    subject, source = r["subject_id"], r["source"]
    if not (0 < len(subject) <= MAX_ID_LENGTH and 0 < len(source) <= MAX_ID_LENGTH
            and not subject[0].isspace() and not source[0].isspace()
            and not _BAD_ID.search(subject) and not _BAD_ID.search(source)):
        return False
    if cls is ObservationRecorded:
        context, attribute, value = r["context"], r["attribute"], r["value"]
        confidence, evidence, metadata = r["confidence"], r["evidence"], r["metadata"]
        if r.get("sealed") is not None or not (
                type(confidence) is float and 0.0 <= confidence <= 1.0
                and len(context) <= MAX_NAME_LENGTH and len(attribute) <= MAX_NAME_LENGTH
                and _NAME.fullmatch(context) and _NAME.fullmatch(attribute)
                and 0 < len(value) <= MAX_VALUE_LENGTH and not _UNSTORABLE.search(value)
                and type(metadata) is dict):
            return False
        if evidence is not None and (len(evidence) > MAX_TEXT_LENGTH
                                     or _UNSTORABLE.search(evidence)):
            return False
        if metadata:
            if len(metadata) > MAX_METADATA_ENTRIES:
                return False
            for k, v in metadata.items():
                if not 0 < len(k) <= MAX_METADATA_KEY_LENGTH \
                        or len(v) > MAX_METADATA_VALUE_LENGTH \
                        or _UNSTORABLE.search(k) or _UNSTORABLE.search(v):
                    return False
        return True
    reason = r.get("reason")
    return reason is None or (len(reason) <= MAX_TEXT_LENGTH
                              and not _UNSTORABLE.search(reason))


def validate(event: Event) -> Event:
    """Check every field of ``event`` and return it unchanged.

    Raises:
        ValidationError: listing every offending field (confidence outside [0, 1] or NaN,
            empty or over-long ids, a value that is not a string, over-long text, ...).
    """
    errors: list[FieldError] = []
    _check_common(errors, event)
    if isinstance(event, ObservationRecorded):
        _check_observation(errors, event)
    elif isinstance(event, ObservationRetracted):
        _check_uuid(errors, "retracted_event_id", event.retracted_event_id)
        _check_text(errors, "reason", event.reason, MAX_TEXT_LENGTH)
    elif isinstance(event, SubjectErased):
        _check_text(errors, "reason", event.reason, MAX_TEXT_LENGTH)
    else:
        errors.append(FieldError("type", f"unknown event class {type(event).__name__}"))
    if errors:
        raise ValidationError(errors)
    return event


def from_dict(data: Mapping[str, Any]) -> Event:
    """Build and validate an event from DESIGN.md's JSON event format.

    ``data`` has a ``type`` of ``observed`` / ``retracted`` / ``erased`` and the event's
    fields (``occurred_at`` in epoch milliseconds). ``confidence`` may be an int (``1``).

    Raises:
        ValidationError: unknown ``type``, unknown or missing fields, or any check of
            :func:`validate` failing.
    """
    if not isinstance(data, Mapping):
        raise ValidationError([FieldError("event", "must be a JSON object")])
    kind = data.get("type")
    cls = EVENT_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValidationError(
            [FieldError("type", f"{kind!r} is not one of {', '.join(sorted(EVENT_TYPES))}")]
        )
    names = {f.name: f for f in fields(cls)}
    errors = [
        FieldError(k, f"unknown field for a {kind!r} event") for k in data if k not in names
        and k != "type"
    ]
    required = [
        n for n, f in names.items()
        if f.default is f.default_factory  # both MISSING: no default
    ]
    errors += [FieldError(n, "is required") for n in required if n not in data]
    if errors:
        raise ValidationError(errors)
    kwargs = {k: v for k, v in data.items() if k != "type"}
    if cls is ObservationRecorded and kwargs.get("metadata") is None:
        kwargs["metadata"] = {}
    return validate(cls(**kwargs))
