"""beliefstore's error hierarchy, so callers catch what they can handle.

::

    BeliefstoreError
     ├── ValidationError      an observation/retraction/erasure is malformed (nothing produced)
     ├── PoisonEvent          a message on the topic cannot be decoded or validated
     │    └── SchemaNotFound  its writer-schema fingerprint is in no known schema
     ├── ProduceError         the broker did not acknowledge a send
     ├── LogResetError        a stored offset lies beyond the partition's end
     └── FencedError          another worker claimed a partition this one was committing for
"""

from __future__ import annotations

from dataclasses import dataclass


class BeliefstoreError(Exception):
    """Base class of every error beliefstore raises on purpose."""


@dataclass(frozen=True)
class FieldError:
    """One problem with one field of an event.

    Attributes:
        field: the field's name as in the Avro schema / JSON event (e.g. ``confidence``).
        message: what is wrong and what is accepted, for a human.
    """

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class ValidationError(BeliefstoreError, ValueError):
    """An event is malformed; nothing was produced.

    Attributes:
        errors: one :class:`FieldError` per offending field (at least one).
    """

    def __init__(self, errors: list[FieldError]):
        if not errors:
            raise ValueError("ValidationError needs at least one FieldError")
        self.errors = list(errors)
        super().__init__("; ".join(str(e) for e in self.errors))

    @classmethod
    def single(cls, field: str, message: str) -> ValidationError:
        """A ValidationError about one field."""
        return cls([FieldError(field, message)])

    @property
    def field(self) -> str:
        """The name of the first offending field."""
        return self.errors[0].field


class PoisonEvent(BeliefstoreError):
    """A message on the event topic that cannot be turned into a valid event.

    The projector sends such messages to the dead-letter topic with ``reason``
    and ``kind`` in its headers and carries on.

    Attributes:
        kind: a short machine-readable class of problem: ``bad_marker``,
            ``unknown_schema``, ``truncated``, ``invalid_event``.
    """

    def __init__(self, kind: str, reason: str):
        self.kind = kind
        self.reason = reason
        super().__init__(f"{kind}: {reason}")


class SchemaNotFound(PoisonEvent):
    """No schema in the registry has the message's writer-schema fingerprint."""

    def __init__(self, fingerprint: bytes):
        self.fingerprint = fingerprint
        super().__init__(
            "unknown_schema",
            f"no known schema has fingerprint {fingerprint.hex()}; add its .avsc to the "
            "registry (BELIEFSTORE_SCHEMA_PATH) if it was written by a newer producer",
        )


class ProduceError(BeliefstoreError):
    """The broker did not acknowledge an event (timeout, unreachable, refused)."""


class LogResetError(BeliefstoreError):
    """A stored projection offset lies beyond the end of its partition.

    The broker's log was lost or the topic was recreated; continuing would skip
    or duplicate events. Replay the projection, or point at the right cluster.
    """


class FencedError(BeliefstoreError):
    """Another projector worker claimed a partition since this one did; the batch was
    rolled back. (A rebalance moved the partition, or a second worker started.)

    Attributes:
        partitions: the partitions this worker no longer owns.
    """

    def __init__(self, partitions: list[int], detail: str = ""):
        self.partitions = partitions
        super().__init__(
            f"partition(s) {partitions} were claimed by another worker; this worker's batch "
            f"was rolled back{': ' + detail if detail else ''}"
        )
