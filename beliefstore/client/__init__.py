"""Typed HTTP clients of the beliefstore API for agents that do not run the Kafka SDK.

* :class:`BeliefClient` (sync) and :class:`AsyncBeliefClient` (async), on httpx:
  ``observe``, ``observe_many``, ``retract``, ``self_model``, ``beliefs``, ``trace``,
  ``history``, ``watch``, ``contexts``, ``schemas``, ``schema``, ``whoami``;
* retries with backoff that honour ``Retry-After`` on 429/503 (:class:`RetryPolicy`);
  a POST is retried with the same client-made ``event_id``, which the fold counts once;
* typed errors carrying the API's message (:mod:`beliefstore.client.errors`).

Example::

    from beliefstore.client import BeliefClient

    with BeliefClient("http://127.0.0.1:8000", api_key="bsk_...") as client:
        client.observe("user-42", "support", "issue", "refund", 0.9)
        model = client.self_model("user-42", max_age_s=3600)
"""

from beliefstore.client.aio import AsyncBeliefClient
from beliefstore.client.core import RetryPolicy
from beliefstore.client.errors import (
    APIError,
    AuthenticationError,
    ClientError,
    ConnectionFailed,
    InvalidRequest,
    NotFound,
    NotSupported,
    PayloadTooLarge,
    PermissionDenied,
    RateLimited,
    Unavailable,
)
from beliefstore.client.models import (
    BatchResult,
    Belief,
    Beliefs,
    ContextInfo,
    History,
    Receipt,
    SchemaInfo,
    SelfModel,
    Trace,
    WatchEvent,
)
from beliefstore.client.sync import BeliefClient

__all__ = [
    "APIError",
    "AsyncBeliefClient",
    "AuthenticationError",
    "BatchResult",
    "Belief",
    "BeliefClient",
    "Beliefs",
    "ClientError",
    "ConnectionFailed",
    "ContextInfo",
    "History",
    "InvalidRequest",
    "NotFound",
    "NotSupported",
    "PayloadTooLarge",
    "PermissionDenied",
    "RateLimited",
    "Receipt",
    "RetryPolicy",
    "SchemaInfo",
    "SelfModel",
    "Trace",
    "Unavailable",
    "WatchEvent",
]
