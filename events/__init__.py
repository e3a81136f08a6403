"""What happened: beliefstore's event types, their validation, Avro serde and the producer SDK.

Import the SDK from here::

    from beliefstore.events import BeliefProducer
    with BeliefProducer.from_settings() as producer:
        receipt = producer.observe("user-1", "support", "emotional_state", "frustrated", 0.88,
                                   source="triage_agent")
"""

from beliefstore.events.model import (
    Event,
    ObservationRecorded,
    ObservationRetracted,
    SubjectErased,
)

__all__ = [
    "Event",
    "ObservationRecorded",
    "ObservationRetracted",
    "SubjectErased",
    "BeliefProducer",
    "Receipt",
]


def __getattr__(name: str):  # lazy: the producer pulls in kafka-python
    if name in ("BeliefProducer", "Receipt"):
        from beliefstore.events import producer

        return getattr(producer, name)
    raise AttributeError(name)
