"""Typed request and response bodies of the HTTP API (the OpenAPI document's contract)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, field_validator

from beliefstore.events.validation import check_id


class ObservationIn(BaseModel):
    """An observation to record. Same rules as the Python SDK's ``observe``."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{
            "subject_id": "user-42",
            "context": "support",
            "attribute": "emotional_state",
            "value": "frustrated",
            "confidence": 0.88,
            "source": "triage_agent",
            "evidence": "msg-1842: 'this is the third time I am charged'",
            "metadata": {"model": "gpt-x", "session_id": "s-77"},
        }]},
    )

    subject_id: StrictStr = Field(description="The person observed (at most 256 characters).")
    context: StrictStr = Field(description="Namespace, e.g. support, billing ([A-Za-z0-9_.:-]).")
    attribute: StrictStr = Field(description="What is observed, e.g. emotional_state.")
    value: StrictStr = Field(description="The observed value (a string, at most 4096 characters).")
    confidence: StrictFloat | StrictInt = Field(description="The source's confidence in [0, 1].")
    source: StrictStr = Field(description="Id of the observing agent.")
    evidence: StrictStr | None = Field(None, description="Free text or a message id backing it.")
    metadata: dict[StrictStr, StrictStr] | None = Field(
        None, description="Model name, session id, correlation id, ..."
    )
    occurred_at: StrictInt | datetime | None = Field(
        None, description="When it was observed: epoch milliseconds or ISO 8601; default now."
    )
    event_id: StrictStr | None = Field(
        None, description="UUID for idempotent retries; default a new UUID4."
    )


class ReceiptOut(BaseModel):
    """Where the broker stored the event (acknowledged by all in-sync replicas)."""

    event_id: str
    topic: str
    partition: int
    offset: int


class BatchIn(BaseModel):
    """Up to 500 observations to record in one request (``POST /v1/observations:batch``).

    Each item is checked on its own (same rules as ``POST /v1/observations``): an invalid
    item gets its own 422 in the answer and does not stop the others.
    """

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "observations": [{"subject_id": "user-42", "context": "support",
                          "attribute": "emotional_state", "value": "frustrated",
                          "confidence": 0.88, "source": "triage_agent"}]}]})

    observations: list[dict[str, object]] = Field(
        description="The observations, each an ObservationIn object (at most 500).")


class BatchItemOut(BaseModel):
    """The result of one item of a batch, at the item's position."""

    status: int = Field(description="201 stored, 422 invalid, 403 not allowed for this key, "
                                    "503 not acknowledged by the broker.")
    receipt: ReceiptOut | None = Field(None, description="Where it was stored (201 only).")
    errors: list[dict[str, object]] | None = Field(
        None, description="422: one entry per wrong field; ``loc`` names it "
                          "(``body``, ``observations``, index, field).")
    detail: str | None = Field(None, description="403/503: what is wrong and the fix.")


class BatchOut(BaseModel):
    """One result per submitted observation, in the order submitted."""

    accepted: int
    rejected: int
    results: list[BatchItemOut]


class BeliefOut(BaseModel):
    """One belief of the self-model."""

    context: str
    attribute: str
    value: str
    confidence: float = Field(description="Confidence of value, in (0, 1).")
    alternatives: dict[str, float] = Field(description="Other values → their confidence.")
    sources: list[str] = Field(description="Agents whose counting observations support value.")
    support: list[str] = Field(description="Event ids of those observations.")
    source_count: int = Field(description="Distinct sources with a counting observation.")
    last_observed_at: datetime
    updated_at: datetime | None = Field(
        description="When the projector last wrote it; null for an as_of view (computed).")
    age_s: float | None = Field(None, description="Seconds from its newest counting "
                                "observation (last_observed_at) to now, or to as_of for a past "
                                "view; 0 for an observation dated in the future.")


class SelfModelOut(BaseModel):
    """Everything currently believed about a subject, grouped by context."""

    subject_id: str
    contexts: dict[str, list[BeliefOut]]
    belief_count: int
    as_of: datetime | None = Field(None, description="The instant of a past view, else null.")
    time: Literal["recorded", "occurred"] | None = Field(
        None, description="The time axis of a past view, else null.")


class BeliefsOut(BaseModel):
    """A filtered list of a subject's beliefs."""

    subject_id: str
    beliefs: list[BeliefOut]


class KafkaPosition(BaseModel):
    """Where an event sits in the log."""

    topic: str
    partition: int
    offset: int


class TraceEventOut(BaseModel):
    """One event of a belief's key and whether it counts."""

    event_id: str
    type: Literal["observed", "retracted"]
    source: str
    occurred_at: datetime
    recorded_at: datetime | None = Field(description="The broker's append timestamp.")
    value: str | None = Field(description="Observed value; null for retractions and erased events.")
    confidence: float | None
    evidence: str | None = None
    retracted_event_id: str | None = None
    status: Literal[
        "counting", "superseded", "retracted", "erased", "retraction", "retraction_ignored"
    ]
    reason: str | None = Field(description="Why the event does not count (which event caused it).")
    weight: float | None = Field(description="Log-odds weight w_i of a counting observation.")
    decay: float | None = Field(description="Recency factor 2^(-age/H) of a counting observation.")
    trust: float | None = Field(None, description="The source's trust (counting observations).")
    log_odds: float | None = Field(
        None, description="logit(clip(confidence, 0.001, 0.999)) (counting observations).")
    kafka: KafkaPosition
    writer_fingerprint: str = Field(description="CRC-64-AVRO fingerprint of the writer schema (hex).")


class TraceOut(BaseModel):
    """A belief with every event behind it, counting or not, and the settings used."""

    subject_id: str
    context: str
    attribute: str
    belief: BeliefOut | None = Field(description="Null when no observation counts any more.")
    half_life_s: float
    trust: dict[str, float] = Field(description="Trust of every source in the trace.")
    scores: dict[str, float] = Field(
        description="Score of every value: the sum of its counting observations' weights.")
    events: list[TraceEventOut]


class HistoryEntryOut(BaseModel):
    """The belief after one event that changed it."""

    recorded_at: datetime = Field(description="When the event was appended to the log.")
    value: str | None = Field(description="The belief's value after it; null: no belief.")
    confidence: float | None
    event_id: str
    event_type: Literal["observed", "retracted"]
    source: str
    kafka_partition: int
    kafka_offset: int
    alternatives: dict[str, float] = Field(
        default_factory=dict, description="The other values after it → their confidence.")


class HistoryOut(BaseModel):
    """How one belief evolved, in log order."""

    subject_id: str
    context: str
    attribute: str
    changes: list[HistoryEntryOut]


class ErrorOut(BaseModel):
    """An error with a message that says what is wrong and how to fix it."""

    detail: str


class CheckOut(BaseModel):
    """The state of one dependency."""

    ok: bool
    detail: str


class ReadyOut(BaseModel):
    """Readiness: broker and database reachable, and the projection's lag."""

    ready: bool
    database: CheckOut
    broker: CheckOut
    projection_lag: int | None = Field(
        description="Messages not yet projected, as of the projector's last batch."
    )
    failing: list[str] = Field(
        default_factory=list,
        description="The dependencies that are down (`database`, `broker`); empty when ready."
    )


class WhoAmIOut(BaseModel):
    """The caller as the API sees it: the key's agent and scopes."""

    agent: str = Field(description="The key's agent: the only source it may post as.")
    key_id: str | None = Field(description="The key's id; null when authentication is off.")
    read: list[str] = Field(description="Contexts it may read; * = every unrestricted context.")
    write: list[str] = Field(description="Contexts it may write; * = every unrestricted context.")
    admin: bool
    auth: bool = Field(description="Whether the API checks keys (BELIEFSTORE_AUTH).")
    restricted_contexts: list[str] = Field(
        description="Restricted contexts this key may read, because it names them.")


class KeyOut(BaseModel):
    """An API key's metadata (the secret is stored only as a salted hash, never shown)."""

    key_id: str
    agent: str
    read: list[str]
    write: list[str]
    admin: bool
    created_at: datetime
    revoked_at: datetime | None


class RetractionIn(BaseModel):
    """A retraction of one of the caller's own observations (``ObservationRetracted``)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{
            "subject_id": "user-42",
            "retracted_event_id": "0b7d5c2e-4c1e-4a57-9d0e-1f2a3b4c5d6e",
            "reason": "wrong customer",
        }]},
    )

    subject_id: StrictStr = Field(description="The subject of the retracted observation.")
    retracted_event_id: StrictStr = Field(description="event_id of the observation to withdraw.")
    source: StrictStr | None = Field(
        None, description="The retracting agent; default (and only allowed value) the key's agent.")
    reason: StrictStr | None = Field(None, description="Why it is withdrawn.")
    occurred_at: StrictInt | datetime | None = Field(
        None, description="When it was retracted: epoch milliseconds or ISO 8601; default now.")
    event_id: StrictStr | None = Field(
        None, description="UUID of the retraction itself, for idempotent retries; default a new UUID4.")


class SchemaOut(BaseModel):
    """One Avro schema the API knows (shipped in ``schemas/`` or on BELIEFSTORE_SCHEMA_PATH)."""

    name: str = Field(description="Full record name, e.g. beliefstore.ObservationRecorded.")
    version: int = Field(description="The N of its file name Name.vN.avsc.")
    fingerprint: str = Field(description="CRC-64-AVRO fingerprint of its Parsing Canonical Form, "
                             "8 bytes little-endian as 16 hex digits (as in a trace's "
                             "writer_fingerprint and the single-object encoding's header).")
    current: bool = Field(description="Whether this code writes this version (the newest shipped).")
    schema_: dict = Field(alias="schema", description="The .avsc document itself.")

    model_config = ConfigDict(populate_by_name=True)


class SchemasOut(BaseModel):
    """Every schema the API knows, by name then version."""

    schemas: list[SchemaOut]


class AttributeOut(BaseModel):
    """One attribute of a context and how many subjects have a belief about it."""

    attribute: str
    belief_count: int


class ContextOut(BaseModel):
    """A context the key may read, with what is believed in it."""

    context: str
    attributes: list[AttributeOut] = Field(description="Attributes with at least one belief.")
    belief_count: int = Field(description="Beliefs in the context, over every subject.")
    half_life_s: float = Field(description="The fold's half-life for the context, seconds.")
    restricted: bool = Field(description="Only keys that name it may read or write it.")


class ContextsOut(BaseModel):
    """The contexts the key may read."""

    contexts: list[ContextOut]

class SubjectSummaryOut(BaseModel):
    """A subject found by a search, counted within the contexts the key may read (no values)."""

    subject_id: str
    contexts: list[str] = Field(description="Contexts with observations the key may read.")
    keys: list[str] = Field(description="Their observed context/attribute pairs (no values).")
    observations: int = Field(description="Stored observations in those contexts.")
    beliefs: int = Field(description="Current beliefs in those contexts (0 once erased).")
    last_observed_at: datetime = Field(description="The newest observation's occurred_at.")
    changed_at: datetime | None = Field(
        description="When one of those beliefs last changed in the read model (null: none).")
    erased: bool = Field(description="Whether the subject was erased (crypto-shredded).")


class ProjectionOut(BaseModel):
    """A read model of the catalog; ``active`` is the one the API serves."""

    name: str
    schema_name: str = Field(description="The PostgreSQL schema holding its tables.")
    active: bool
    status: str = Field(description="live, building or built.")
    created_at: datetime
    switched_at: datetime | None


class AccessRecordOut(BaseModel):
    """One answered read of the subject, from the access topic."""

    at: datetime
    agent: str
    key_id: str | None
    endpoint: str = Field(description="self-model, beliefs, history or trace.")
    contexts: list[str]
    attribute: str | None
    as_of: str | None
    count: int | None
    partition: int | None
    offset: int | None


class AccessLogOut(BaseModel):
    """Who read a subject's beliefs, in log order (admin keys only)."""

    subject_id: str
    topic: str
    records: list[AccessRecordOut]
    skipped: int = Field(description="Messages of the partition that were not access records.")


class LoginLinkIn(BaseModel):
    """What a one-time console login link opens."""

    subject_id: str | None = Field(None, max_length=256,
                                   description="Open this subject after login.")

    @field_validator("subject_id")
    @classmethod
    def _storable(cls, value: str | None) -> str | None:
        """The same rules as every subject id (no NUL or control characters, ...)."""
        if value is not None and (problems := check_id("subject_id", value)):
            raise ValueError(f"subject_id {problems[0].message}")
        return value


class LoginLinkOut(BaseModel):
    """A single-use console login link for the key that asked for it (expires in 5 minutes)."""

    url: str = Field(description="Open it in a browser once; it holds no API key.")
    expires_at: datetime


class LoginIn(BaseModel):
    """The console's login form."""

    key: str = Field(max_length=200, description="An API key, bsk_<key id>_<secret>.")


class ConsoleMeOut(BaseModel):
    """Whether the console is logged in, as whom, and the half-lives that tell how stale a
    belief is."""

    authenticated: bool
    detail: str | None = Field(None, description="Why not, when not authenticated.")
    caller: WhoAmIOut | None = None
    default_half_life_s: float
    half_lives: dict[str, float] = Field(description="Context → half-life, seconds.")
