"""Typed answers of the API as :mod:`beliefstore.client` returns them (pydantic models).

They mirror the API's OpenAPI document and accept fields added by newer servers
(``extra="allow"``), so a client keeps working against a newer API.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class Receipt(_Model):
    """Where the broker stored an event: ``event_id`` and Kafka ``topic``/``partition``/``offset``."""

    event_id: str
    topic: str
    partition: int
    offset: int


class BatchResult(_Model):
    """One observation's outcome in :meth:`~beliefstore.client.BeliefClient.observe_many`.

    Attributes:
        status: 201 when stored (``receipt`` set), else the refusal's status (422, 403, ...)
            with the API's ``detail``.
    """

    status: int
    receipt: Receipt | None = None
    detail: Any = None

    @property
    def ok(self) -> bool:
        return self.receipt is not None


class Belief(_Model):
    """One belief: value, confidence in (0, 1), alternatives (value → confidence), the
    sources and event ids behind it, and ``age_s`` (seconds since its newest counting
    observation)."""

    context: str
    attribute: str
    value: str
    confidence: float
    alternatives: dict[str, float] = Field(default_factory=dict)
    sources: list[str] = Field(default_factory=list)
    support: list[str] = Field(default_factory=list)
    source_count: int = 0
    last_observed_at: datetime
    updated_at: datetime | None = None
    age_s: float | None = None


class SelfModel(_Model):
    """Everything believed about a subject, grouped by context."""

    subject_id: str
    contexts: dict[str, list[Belief]]
    belief_count: int
    as_of: datetime | None = None
    time: str | None = None

    def beliefs(self) -> list[Belief]:
        """Every belief, context by context."""
        return [b for beliefs in self.contexts.values() for b in beliefs]

    def get(self, context: str, attribute: str) -> Belief | None:
        """The belief of ``context``/``attribute``, or ``None``."""
        return next((b for b in self.contexts.get(context, []) if b.attribute == attribute), None)


class Beliefs(_Model):
    """A filtered list of a subject's beliefs."""

    subject_id: str
    beliefs: list[Belief]


class TraceEvent(_Model):
    """One event of a belief's key, with whether it counts and why not."""

    event_id: str
    type: str
    source: str
    occurred_at: datetime
    recorded_at: datetime | None = None
    value: str | None = None
    confidence: float | None = None
    status: str
    reason: str | None = None
    weight: float | None = None
    kafka: dict[str, Any]
    writer_fingerprint: str


class Trace(_Model):
    """A belief with every event behind it, counting or not, and the settings used."""

    subject_id: str
    context: str
    attribute: str
    belief: Belief | None = None
    half_life_s: float
    trust: dict[str, float] = Field(default_factory=dict)
    scores: dict[str, float] = Field(default_factory=dict)
    events: list[TraceEvent]


class HistoryEntry(_Model):
    """The belief after one event that changed it."""

    recorded_at: datetime
    value: str | None = None
    confidence: float | None = None
    event_id: str
    event_type: str
    source: str
    kafka_partition: int
    kafka_offset: int


class History(_Model):
    """How one belief evolved, in log order."""

    subject_id: str
    context: str
    attribute: str
    changes: list[HistoryEntry]


class AttributeInfo(_Model):
    attribute: str
    belief_count: int


class ContextInfo(_Model):
    """A context the key may read: attributes, belief count, half-life (s), restricted."""

    context: str
    attributes: list[AttributeInfo]
    belief_count: int
    half_life_s: float
    restricted: bool


class SchemaInfo(_Model):
    """An Avro schema the API knows: name, version, fingerprint (16 hex digits), the ``.avsc``."""

    name: str
    version: int
    fingerprint: str
    current: bool = False
    schema_: dict[str, Any] = Field(alias="schema")

    model_config = ConfigDict(extra="allow", populate_by_name=True)


class WatchEvent(_Model):
    """One server-sent event of ``GET /v1/subjects/{id}/watch``: its ``id`` (resume with
    it as ``last_event_id``), ``event`` name and ``data`` (one belief change, JSON)."""

    id: str | None = None
    event: str = "message"
    data: Any = None


__all__ = [
    "AttributeInfo",
    "BatchResult",
    "Belief",
    "Beliefs",
    "ContextInfo",
    "History",
    "HistoryEntry",
    "Receipt",
    "SchemaInfo",
    "SelfModel",
    "Trace",
    "TraceEvent",
    "WatchEvent",
]
