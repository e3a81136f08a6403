"""What the sync and async clients share: each request as a :class:`Call` (method, path,
parameters, body, and how to read the answer), the retry policy, error mapping, the
batch answer and the server-sent-events parser. No I/O here ("sans-I/O", as in h11): the
two clients differ only in how they send a :class:`Call` and wait.
"""

from __future__ import annotations

import email.utils
import json
import random
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx

from beliefstore.client.errors import (
    APIError,
    ClientError,
    ConnectionFailed,
    NotSupported,
    error_for,
)
from beliefstore.client.models import (
    BatchResult,
    Beliefs,
    ContextInfo,
    History,
    Receipt,
    SchemaInfo,
    SelfModel,
    Trace,
    WatchEvent,
)

T = TypeVar("T")

BATCH_PATH = "/v1/observations:batch"
"""The batch ingest endpoint (where the server has it; else one POST per observation)."""


def watch_path(subject_id: str) -> str:
    return f"/v1/subjects/{quote(subject_id, safe='')}/watch"


def subject_path(subject_id: str, *rest: str) -> str:
    """``/v1/subjects/{id}/...`` with every segment percent-encoded."""
    return "/".join(["/v1/subjects", *(quote(p, safe="") for p in (subject_id, *rest))])


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait before trying a request again.

    A request is retried on 429, 502, 503 and 504 answers and on connection errors and
    timeouts, at most ``attempts`` tries in all. The wait before try *n* (n ≥ 2) is the
    server's ``Retry-After`` when it sent one (seconds or an HTTP date), else
    ``min(max_backoff_s, backoff_s · 2^(n−2))`` with ±25 % jitter (exponential backoff
    with jitter, as in the AWS Architecture Blog's "Exponential Backoff And Jitter");
    either is capped at ``max_wait_s``.

    Attributes:
        attempts: tries in all (1: never retry).
        backoff_s: first backoff, seconds.
        max_backoff_s: cap of the exponential backoff, seconds.
        max_wait_s: cap of any wait, ``Retry-After`` included, seconds.
    """

    attempts: int = 4
    backoff_s: float = 0.25
    max_backoff_s: float = 8.0
    max_wait_s: float = 60.0

    RETRY_STATUSES = frozenset({429, 502, 503, 504})

    def should_retry(self, attempt: int) -> bool:
        """Whether try number ``attempt`` (1-based) may be followed by another."""
        return attempt < self.attempts

    def wait_after(self, attempt: int, response: httpx.Response) -> float | None:
        """Seconds to wait before trying again after ``response`` to try ``attempt``
        (1-based), or ``None`` when the response is final (not retryable, or no tries
        left)."""
        if response.status_code in self.RETRY_STATUSES and self.should_retry(attempt):
            return self.wait_s(attempt, retry_after_s(response))
        return None

    def wait_s(self, attempt: int, retry_after_s: float | None) -> float:
        """Seconds to wait after failed try ``attempt`` (1-based)."""
        if retry_after_s is not None:
            return min(self.max_wait_s, max(0.0, retry_after_s))
        base = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
        return min(self.max_wait_s, base * random.uniform(0.75, 1.25))


NO_RETRY = RetryPolicy(attempts=1)


def retry_after_s(response: httpx.Response, now: datetime | None = None) -> float | None:
    """The ``Retry-After`` header in seconds (RFC 9110 §10.2.3: delay-seconds or an
    HTTP-date), or ``None`` when absent or unreadable."""
    raw = response.headers.get("retry-after")
    if not raw:
        return None
    raw = raw.strip()
    if raw.isdigit():
        return float(raw)
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def detail_of(response: httpx.Response) -> Any:
    """The body's ``detail`` (FastAPI's error shape), or the raw text."""
    try:
        body = response.json()
    except ValueError:
        return response.text or response.reason_phrase
    return body.get("detail", body) if isinstance(body, dict) else body


def api_error(response: httpx.Response) -> APIError:
    """The typed error for an error response."""
    return error_for(response.status_code, detail_of(response), response.request.method,
                     str(response.request.url), retry_after_s(response))


def route_missing(response: httpx.Response) -> bool:
    """Whether the server has no such route: 405, or a 404 with FastAPI's bare
    ``{"detail": "Not Found"}`` (a beliefstore 404 always says what is missing)."""
    if response.status_code == 405:
        return True
    return response.status_code == 404 and detail_of(response) == "Not Found"


def _clean(body: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in body.items() if v is not None}
    occurred = out.get("occurred_at")
    if isinstance(occurred, datetime):
        out["occurred_at"] = occurred.isoformat()
    return out


def observation_body(subject_id: str, context: str, attribute: str, value: str,
                     confidence: float, source: str, evidence: str | None = None,
                     metadata: Mapping[str, str] | None = None,
                     occurred_at: int | datetime | None = None,
                     event_id: str | None = None) -> dict[str, Any]:
    """The ``POST /v1/observations`` body, with an ``event_id`` (a new UUID4 unless given)
    fixed before the first try, so every retry carries the same one and the fold counts
    the observation once (its rule 1: an event id counts once)."""
    return _clean({
        "subject_id": subject_id, "context": context, "attribute": attribute, "value": value,
        "confidence": confidence, "source": source, "evidence": evidence,
        "metadata": dict(metadata) if metadata is not None else None,
        "occurred_at": occurred_at, "event_id": event_id or str(uuid.uuid4()),
    })


def prepare_observation(item: Mapping[str, Any], default_source: str) -> dict[str, Any]:
    """One item of ``observe_many``: a mapping of ``observe``'s arguments → its body."""
    data = dict(item)
    data.setdefault("source", default_source)
    return observation_body(**data)


def retraction_body(subject_id: str, event_id: str, reason: str | None = None,
                    occurred_at: int | datetime | None = None,
                    retraction_id: str | None = None) -> dict[str, Any]:
    """The ``POST /v1/retractions`` body, with the retraction's own id fixed up front."""
    return _clean({
        "subject_id": subject_id, "retracted_event_id": event_id, "reason": reason,
        "occurred_at": occurred_at, "event_id": retraction_id or str(uuid.uuid4()),
    })


def read_params(context: str | None = None, min_confidence: float | None = None,
                max_age_s: float | None = None, as_of: datetime | str | None = None,
                time: str | None = None) -> dict[str, Any]:
    """Query parameters of the self-model and beliefs reads, the unset ones left out."""
    params: dict[str, Any] = {"context": context, "min_confidence": min_confidence,
                              "max_age_s": max_age_s, "time": time,
                              "as_of": as_of.isoformat() if isinstance(as_of, datetime) else as_of}
    return {k: v for k, v in params.items() if v is not None}


def batch_results(body: Any) -> list[BatchResult]:
    """The batch endpoint's answer ``{"results": [{"status": 201, "receipt": {...}} |
    {"status": 422, "errors": [...]} | {"status": 403|503, "detail": "..."}, ...]}`` (one
    per observation, in order). A 422's field errors become its ``detail`` (a list, as
    the single POST's 422 body has them)."""
    out = []
    for r in body["results"]:
        item = {k: v for k, v in r.items() if k in ("status", "receipt", "detail")}
        if item.get("detail") is None and r.get("errors") is not None:
            item["detail"] = r["errors"]
        out.append(BatchResult.model_validate(item))
    return out


def single_result(receipt: Receipt | None = None, error: APIError | None = None) -> BatchResult:
    """A one-by-one fallback's outcome in the batch endpoint's shape."""
    if error is not None:
        return BatchResult(status=error.status, detail=error.detail)
    return BatchResult(status=201, receipt=receipt)


@dataclass(frozen=True)
class Call(Generic[T]):
    """One API request and how to read its 2xx answer.

    Attributes:
        method: the HTTP method.
        path: the path, its segments percent-encoded.
        parse: the answer's JSON body → the typed result (a 4xx/5xx raises instead).
        params: query parameters, the unset ones left out.
        json: the JSON body of a POST.
    """

    method: str
    path: str
    parse: Callable[[Any], T]
    params: Mapping[str, Any] | None = None
    json: Any = None


def whoami_call() -> Call[dict[str, Any]]:
    """``GET /v1/whoami``: the key's agent and scopes."""
    return Call("GET", "/v1/whoami", dict)


def observe_call(body: Mapping[str, Any]) -> Call[Receipt]:
    """``POST /v1/observations`` with an :func:`observation_body`."""
    return Call("POST", "/v1/observations", Receipt.model_validate, json=body)


def retract_call(body: Mapping[str, Any]) -> Call[Receipt]:
    """``POST /v1/retractions`` with a :func:`retraction_body`."""
    return Call("POST", "/v1/retractions", Receipt.model_validate, json=body)


def self_model_call(subject_id: str, *, max_age_s: float | None = None,
                    as_of: datetime | str | None = None,
                    time: str | None = None) -> Call[SelfModel]:
    """``GET /v1/subjects/{id}/self-model``."""
    return Call("GET", subject_path(subject_id, "self-model"), SelfModel.model_validate,
                params=read_params(max_age_s=max_age_s, as_of=as_of, time=time))


def beliefs_call(subject_id: str, *, context: str | None = None,
                 min_confidence: float | None = None, max_age_s: float | None = None,
                 as_of: datetime | str | None = None,
                 time: str | None = None) -> Call[Beliefs]:
    """``GET /v1/subjects/{id}/beliefs``."""
    return Call("GET", subject_path(subject_id, "beliefs"), Beliefs.model_validate,
                params=read_params(context, min_confidence, max_age_s, as_of, time))


def trace_call(subject_id: str, context: str, attribute: str) -> Call[Trace]:
    """``GET /v1/subjects/{id}/beliefs/{context}/{attribute}/trace``."""
    return Call("GET", subject_path(subject_id, "beliefs", context, attribute, "trace"),
                Trace.model_validate)


def history_call(subject_id: str, context: str, attribute: str) -> Call[History]:
    """``GET /v1/subjects/{id}/beliefs/{context}/{attribute}/history``."""
    return Call("GET", subject_path(subject_id, "beliefs", context, attribute, "history"),
                History.model_validate)


def contexts_call() -> Call[list[ContextInfo]]:
    """``GET /v1/contexts``."""
    return Call("GET", "/v1/contexts",
                lambda body: [ContextInfo.model_validate(c) for c in body["contexts"]])


def schemas_call() -> Call[list[SchemaInfo]]:
    """``GET /v1/schemas``."""
    return Call("GET", "/v1/schemas",
                lambda body: [SchemaInfo.model_validate(s) for s in body["schemas"]])


def schema_call(fingerprint: str) -> Call[SchemaInfo]:
    """``GET /v1/schemas/{fingerprint}``."""
    return Call("GET", f"/v1/schemas/{quote(fingerprint, safe='')}", SchemaInfo.model_validate)


def batch_call(bodies: list[dict[str, Any]]) -> Call[list[BatchResult]]:
    """``POST /v1/observations:batch`` with :func:`prepare_observation` bodies."""
    return Call("POST", BATCH_PATH, batch_results, json={"observations": bodies})


def watch_headers(last_event_id: str | None) -> dict[str, str]:
    """The watch request's headers: SSE, and ``Last-Event-ID`` to resume."""
    headers = {"Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    return headers


def watch_refused(response: httpx.Response) -> ClientError:
    """The error for a watch answered 4xx/5xx (its body read):
    :class:`~beliefstore.client.errors.NotSupported` when the server has no watch route."""
    if route_missing(response):
        return NotSupported("GET /v1/subjects/{subject_id}/watch",
                            "this beliefstore API has no watch stream; poll "
                            "self_model() instead")
    return api_error(response)


def unreachable(base_url: str, exc: Exception) -> ConnectionFailed:
    """The error when the API cannot be reached after the retries."""
    return ConnectionFailed(f"cannot reach the API at {base_url} ({exc!r}): "
                            "check BELIEFSTORE_API_URL and that the API runs")


def bearer_headers(api_key: str | None) -> dict[str, str]:
    """``Authorization: Bearer`` for a key (none without one)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class SSEParser:
    """Incremental parser of a ``text/event-stream`` (WHATWG HTML, "Server-sent events":
    ``field: value`` lines, events ended by a blank line, ``data`` lines joined with
    newlines, lines starting with ``:`` are comments). Feed it lines without their
    line ending; it returns a :class:`WatchEvent` when one is complete. ``data`` is
    parsed as JSON when it is JSON."""

    def __init__(self) -> None:
        self.last_event_id: str | None = None
        self._data: list[str] = []
        self._event = "message"
        self._id: str | None = None

    def feed(self, line: str) -> WatchEvent | None:
        if line == "":
            if not self._data:
                self._event, self._id = "message", None
                return None
            raw = "\n".join(self._data)
            try:
                data: Any = json.loads(raw)
            except ValueError:
                data = raw
            event = WatchEvent(id=self._id if self._id is not None else self.last_event_id,
                               event=self._event, data=data)
            self._data, self._event, self._id = [], "message", None
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = self.last_event_id = value
        return None


__all__ = [
    "BATCH_PATH",
    "NO_RETRY",
    "Call",
    "RetryPolicy",
    "SSEParser",
    "api_error",
    "batch_results",
    "observation_body",
    "prepare_observation",
    "read_params",
    "retraction_body",
    "retry_after_s",
    "route_missing",
    "single_result",
    "subject_path",
    "watch_path",
]
