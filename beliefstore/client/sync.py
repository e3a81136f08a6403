"""The synchronous HTTP client: :class:`BeliefClient`."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any, TypeVar

import httpx

from beliefstore.client import core
from beliefstore.client.errors import APIError, InvalidRequest, PermissionDenied
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
from beliefstore.client.settings import client_defaults

T = TypeVar("T")


class BeliefClient:
    """A typed, synchronous client of the beliefstore HTTP API (httpx).

    Args:
        base_url: the API, e.g. ``http://127.0.0.1:8000``; default ``BELIEFSTORE_API_URL``
            (or a running ``beliefstore up``'s address).
        api_key: the agent's key (``Authorization: Bearer``); default ``BELIEFSTORE_API_KEY``.
        timeout_s: per request, seconds.
        retry: when to retry (429/502/503/504, connection errors), honouring ``Retry-After``.
        transport: an httpx transport (e.g. ``httpx.ASGITransport``), for embedding.

    Retrying a POST is safe: the client fixes the ``event_id`` of an observation or a
    retraction before the first try, and the fold counts an event id once, so a write
    whose acknowledgement was lost and that is sent again is not counted twice (the log
    may then hold the event twice; the read model does not).

    Each method builds its request with :mod:`beliefstore.client.core` (shared with
    :class:`~beliefstore.client.AsyncBeliefClient`) and sends it.

    Raises (every method): the typed errors of :mod:`beliefstore.client.errors`, each with
    the API's message.
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 timeout_s: float = 10.0, retry: core.RetryPolicy | None = None,
                 transport: httpx.BaseTransport | None = None):
        url, key = client_defaults(base_url, api_key)
        self.base_url = url
        self.retry = retry or core.RetryPolicy()
        self._http = httpx.Client(base_url=url, headers=core.bearer_headers(key),
                                  timeout=timeout_s, transport=transport)
        self._agent: str | None = None
        self._batch: bool | None = None

    # -- plumbing ----------------------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> BeliefClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, call: core.Call[Any], retry: core.RetryPolicy | None = None) -> httpx.Response:
        """``call`` with retries; returns the final response (any status)."""
        policy = retry or self.retry
        attempt = 1
        while True:
            try:
                response = self._http.request(call.method, call.path, params=call.params,
                                              json=call.json)
            except httpx.TransportError as exc:
                if not policy.should_retry(attempt):
                    raise core.unreachable(self.base_url, exc) from exc
                time.sleep(policy.wait_s(attempt, None))
            else:
                wait = policy.wait_after(attempt, response)
                if wait is None:
                    return response
                time.sleep(wait)
            attempt += 1

    def _run(self, call: core.Call[T]) -> T:
        """``call``'s typed result; an error answer raises its typed error."""
        response = self._send(call)
        if response.status_code >= 400:
            raise core.api_error(response)
        return call.parse(response.json())

    # -- who -----------------------------------------------------------------------------

    def whoami(self) -> dict[str, Any]:
        """The key's agent and scopes (``GET /v1/whoami``)."""
        return self._run(core.whoami_call())

    @property
    def agent(self) -> str:
        """The key's agent: the source of this client's observations (asked once)."""
        if self._agent is None:
            self._agent = str(self.whoami()["agent"])
        return self._agent

    # -- writes --------------------------------------------------------------------------

    def observe(self, subject_id: str, context: str, attribute: str, value: str,
                confidence: float, *, source: str | None = None, evidence: str | None = None,
                metadata: Mapping[str, str] | None = None,
                occurred_at: int | datetime | None = None,
                event_id: str | None = None) -> Receipt:
        """Record one observation (``POST /v1/observations``); returns its receipt once the
        broker acknowledged it. ``source`` defaults to the key's agent (the only one the
        API accepts); ``event_id`` defaults to a new UUID4, fixed across retries."""
        return self._run(core.observe_call(core.observation_body(
            subject_id, context, attribute, value, confidence, source or self.agent,
            evidence, metadata, occurred_at, event_id)))

    def observe_many(self, observations: Iterable[Mapping[str, Any]]) -> list[BatchResult]:
        """Record several observations, each a mapping of :meth:`observe`'s arguments.

        Uses ``POST /v1/observations:batch`` (body ``{"observations": [...]}``) where the
        server has it, else one ``POST /v1/observations`` per item. Returns one
        :class:`BatchResult` per item, in order: status 201 with the receipt, or the
        refusal's status (422, 403) with the API's ``detail``; other errors raise.
        """
        bodies = [core.prepare_observation(o, o.get("source") or self.agent)
                  for o in observations]
        if not bodies:
            return []
        if self._batch is not False:
            batch = core.batch_call(bodies)
            response = self._send(batch)
            self._batch = not core.route_missing(response)
            if self._batch:
                if response.status_code >= 400:
                    raise core.api_error(response)
                return batch.parse(response.json())
        results = []
        for body in bodies:
            try:
                receipt = self._run(core.observe_call(body))
                results.append(core.single_result(receipt))
            except (InvalidRequest, PermissionDenied) as exc:
                results.append(core.single_result(error=exc))
        return results

    def retract(self, subject_id: str, event_id: str, reason: str | None = None, *,
                occurred_at: int | datetime | None = None,
                retraction_id: str | None = None) -> Receipt:
        """Withdraw this agent's observation ``event_id`` (``POST /v1/retractions``);
        returns the retraction's receipt. ``retraction_id`` (default a new UUID4, fixed
        across retries) is the retraction event's own id."""
        return self._run(core.retract_call(
            core.retraction_body(subject_id, event_id, reason, occurred_at, retraction_id)))

    # -- reads ---------------------------------------------------------------------------

    def self_model(self, subject_id: str, *, max_age_s: float | None = None,
                   as_of: datetime | str | None = None, time: str | None = None) -> SelfModel:
        """Everything believed about the subject that the key may read, by context;
        ``max_age_s`` leaves out beliefs older than that (seconds)."""
        return self._run(core.self_model_call(subject_id, max_age_s=max_age_s, as_of=as_of,
                                              time=time))

    def beliefs(self, subject_id: str, *, context: str | None = None,
                min_confidence: float | None = None, max_age_s: float | None = None,
                as_of: datetime | str | None = None, time: str | None = None) -> Beliefs:
        """The subject's beliefs, filtered by context, confidence and age."""
        return self._run(core.beliefs_call(subject_id, context=context,
                                           min_confidence=min_confidence,
                                           max_age_s=max_age_s, as_of=as_of, time=time))

    def trace(self, subject_id: str, context: str, attribute: str) -> Trace:
        """Every event behind one belief, counting or not, and why."""
        return self._run(core.trace_call(subject_id, context, attribute))

    def history(self, subject_id: str, context: str, attribute: str) -> History:
        """How one belief evolved, event by event."""
        return self._run(core.history_call(subject_id, context, attribute))

    def contexts(self) -> list[ContextInfo]:
        """The contexts the key may read, with attributes, counts, half-life, restriction."""
        return self._run(core.contexts_call())

    def schemas(self) -> list[SchemaInfo]:
        """Every Avro schema the API knows."""
        return self._run(core.schemas_call())

    def schema(self, fingerprint: str) -> SchemaInfo:
        """One schema by its fingerprint (16 hex digits)."""
        return self._run(core.schema_call(fingerprint))

    def watch(self, subject_id: str, *, last_event_id: str | None = None,
              read_timeout_s: float | None = None) -> Iterator[WatchEvent]:
        """Follow the subject's belief changes as they happen
        (``GET /v1/subjects/{id}/watch``, server-sent events); each event's ``data`` is
        one belief change. Resume after a disconnect with the last event's ``id`` as
        ``last_event_id``. The stream ends when the server closes it.

        Raises:
            NotSupported: the server has no watch endpoint.
        """
        timeout = httpx.Timeout(self._http.timeout.connect, read=read_timeout_s)
        with self._http.stream("GET", core.watch_path(subject_id), timeout=timeout,
                               headers=core.watch_headers(last_event_id)) as response:
            if response.status_code >= 400:
                response.read()
                raise core.watch_refused(response)
            parser = core.SSEParser()
            for line in response.iter_lines():
                event = parser.feed(line)
                if event is not None:
                    yield event


__all__ = ["APIError", "BeliefClient"]
