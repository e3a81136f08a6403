"""The event types: immutable values, one class per Avro record in ``schemas/``.

Times are epoch milliseconds (UTC) as ``int``; ids are strings; ``event_id`` is a
canonical lowercase UUID string. Construct events through
:mod:`beliefstore.events.validation` (or the SDK) to get them checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar


@dataclass(frozen=True)
class ObservationRecorded:
    """An agent's observation about a person.

    Attributes:
        event_id: UUID of this event; deliveries of the same id count once.
        subject_id: the person observed (Kafka key).
        source: id of the observing agent.
        occurred_at: when it was observed, epoch milliseconds UTC.
        context: namespace of the attribute (``support``, ``billing``, ...).
        attribute: what was observed (``emotional_state``, ...).
        value: the observed value.
        confidence: the source's confidence in [0, 1].
        evidence: optional free text or reference (message id) backing it.
        metadata: optional string map (model name, session id, correlation id).
    """

    event_id: str
    subject_id: str
    source: str
    occurred_at: int
    context: str
    attribute: str
    value: str
    confidence: float
    evidence: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    type: ClassVar[str] = "observed"
    schema_name: ClassVar[str] = "beliefstore.ObservationRecorded"

    @property
    def key(self) -> tuple[str, str, str]:
        """The belief this observation is about: ``(subject_id, context, attribute)``."""
        return (self.subject_id, self.context, self.attribute)


@dataclass(frozen=True)
class ObservationRetracted:
    """A source withdraws one of its own observations.

    Attributes:
        event_id: UUID of this event.
        subject_id: the person (Kafka key).
        source: id of the retracting agent; only the observation's own source counts.
        occurred_at: epoch milliseconds UTC.
        retracted_event_id: ``event_id`` of the withdrawn :class:`ObservationRecorded`.
        reason: optional free text.
    """

    event_id: str
    subject_id: str
    source: str
    occurred_at: int
    retracted_event_id: str
    reason: str | None = None

    type: ClassVar[str] = "retracted"
    schema_name: ClassVar[str] = "beliefstore.ObservationRetracted"


@dataclass(frozen=True)
class SubjectErased:
    """Forget everything observed about ``subject_id`` at or before ``occurred_at``.

    Attributes:
        event_id: UUID of this event.
        subject_id: the person to forget (Kafka key).
        source: id of the requesting agent or operator.
        occurred_at: epoch milliseconds UTC; observations at or before it are dropped.
        reason: optional free text.
    """

    event_id: str
    subject_id: str
    source: str
    occurred_at: int
    reason: str | None = None

    type: ClassVar[str] = "erased"
    schema_name: ClassVar[str] = "beliefstore.SubjectErased"


Event = ObservationRecorded | ObservationRetracted | SubjectErased
"""Any beliefstore event."""

EVENT_TYPES: dict[str, type[ObservationRecorded] | type[ObservationRetracted] | type[SubjectErased]]
EVENT_TYPES = {cls.type: cls for cls in (ObservationRecorded, ObservationRetracted, SubjectErased)}
"""JSON ``type`` tag → event class."""
