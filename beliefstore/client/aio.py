"""The asynchronous HTTP client: :class:`AsyncBeliefClient` (asyncio or trio, via anyio)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from datetime import datetime
from typing import Any

import anyio
import httpx

from beliefstore.client import core
from beliefstore.client.errors import (
    ConnectionFailed,
    InvalidRequest,
    NotSupported,
    PermissionDenied,
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
from beliefstore.client.settings import client_defaults


class AsyncBeliefClient:
    """A typed, asynchronous client of the beliefstore HTTP API (httpx): the methods of
    :class:`~beliefstore.client.BeliefClient`, awaited (``agent()`` is a method here).

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

    Raises (every method): the typed errors of :mod:`beliefstore.client.errors`, each with
    the API's message.
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 timeout_s: float = 10.0, retry: core.RetryPolicy | None = None,
                 transport: httpx.AsyncBaseTransport | None = None):
        url, key = client_defaults(base_url, api_key)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.base_url = url
        self.retry = retry or core.RetryPolicy()
        self._http = httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout_s,
                                  transport=transport)
        self._agent: str | None = None
        self._batch: bool | None = None

    # -- plumbing ----------------------------------------------------------------------

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncBeliefClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _send(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
              json: Any = None, retry: core.RetryPolicy | None = None) -> httpx.Response:
        """One request with retries; returns the final response (any status)."""
        policy = retry or self.retry
        attempt = 1
        while True:
            try:
                response = await self._http.request(method, path, params=params, json=json)
            except httpx.TransportError as exc:
                if not policy.should_retry(attempt):
                    raise ConnectionFailed(f"cannot reach the API at {self.base_url} ({exc!r}): "
                                           "check BELIEFSTORE_API_URL and that the API runs") from exc
                await anyio.sleep(policy.wait_s(attempt, None))
                attempt += 1
                continue
            if response.status_code in policy.RETRY_STATUSES and policy.should_retry(attempt):
                await anyio.sleep(policy.wait_s(attempt, core.retry_after_s(response)))
                attempt += 1
                continue
            return response

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self._send(method, path, **kwargs)
        if response.status_code >= 400:
            raise core.api_error(response)
        return response.json()

    # -- who -----------------------------------------------------------------------------

    async def whoami(self) -> dict[str, Any]:
        """The key's agent and scopes (``GET /v1/whoami``)."""
        return await self._call("GET", "/v1/whoami")

    async def agent(self) -> str:
        """The key's agent: the source of this client's observations (asked once)."""
        if self._agent is None:
            self._agent = str((await self.whoami())["agent"])
        return self._agent

    # -- writes --------------------------------------------------------------------------

    async def observe(self, subject_id: str, context: str, attribute: str, value: str,
                confidence: float, *, source: str | None = None, evidence: str | None = None,
                metadata: Mapping[str, str] | None = None,
                occurred_at: int | datetime | None = None,
                event_id: str | None = None) -> Receipt:
        """Record one observation (``POST /v1/observations``); returns its receipt once the
        broker acknowledged it. ``source`` defaults to the key's agent (the only one the
        API accepts); ``event_id`` defaults to a new UUID4, fixed across retries."""
        body = core.observation_body(subject_id, context, attribute, value, confidence,
                                     source or await self.agent(), evidence, metadata, occurred_at,
                                     event_id)
        return Receipt.model_validate(await self._call("POST", "/v1/observations", json=body))

    async def observe_many(self, observations: Iterable[Mapping[str, Any]]) -> list[BatchResult]:
        """Record several observations, each a mapping of :meth:`observe`'s arguments.

        Uses ``POST /v1/observations:batch`` (body ``{"observations": [...]}``) where the
        server has it, else one ``POST /v1/observations`` per item. Returns one
        :class:`BatchResult` per item, in order: status 201 with the receipt, or the
        refusal's status (422, 403) with the API's ``detail``; other errors raise.
        """
        bodies = [core.prepare_observation(o, o.get("source") or await self.agent())
                  for o in observations]
        if not bodies:
            return []
        if self._batch is not False:
            response = await self._send("POST", core.BATCH_PATH, json={"observations": bodies})
            if core.route_missing(response):
                self._batch = False
            elif response.status_code >= 400:
                raise core.api_error(response)
            else:
                self._batch = True
                return core.batch_results(response.json())
        results = []
        for body in bodies:
            try:
                receipt = Receipt.model_validate(await self._call("POST", "/v1/observations", json=body))
                results.append(core.single_result(receipt))
            except (InvalidRequest, PermissionDenied) as exc:
                results.append(core.single_result(error=exc))
        return results

    async def retract(self, subject_id: str, event_id: str, reason: str | None = None, *,
                occurred_at: int | datetime | None = None,
                retraction_id: str | None = None) -> Receipt:
        """Withdraw this agent's observation ``event_id`` (``POST /v1/retractions``);
        returns the retraction's receipt. ``retraction_id`` (default a new UUID4, fixed
        across retries) is the retraction event's own id."""
        body = core.retraction_body(subject_id, event_id, reason, occurred_at, retraction_id)
        return Receipt.model_validate(await self._call("POST", "/v1/retractions", json=body))

    # -- reads ---------------------------------------------------------------------------

    async def self_model(self, subject_id: str, *, max_age_s: float | None = None,
                   as_of: datetime | str | None = None, time: str | None = None) -> SelfModel:
        """Everything believed about the subject that the key may read, by context;
        ``max_age_s`` leaves out beliefs older than that (seconds)."""
        params = core.read_params(max_age_s=max_age_s, as_of=as_of, time=time)
        return SelfModel.model_validate(
            await self._call("GET", core.subject_path(subject_id, "self-model"), params=params))

    async def beliefs(self, subject_id: str, *, context: str | None = None,
                min_confidence: float | None = None, max_age_s: float | None = None,
                as_of: datetime | str | None = None, time: str | None = None) -> Beliefs:
        """The subject's beliefs, filtered by context, confidence and age."""
        params = core.read_params(context, min_confidence, max_age_s, as_of, time)
        return Beliefs.model_validate(
            await self._call("GET", core.subject_path(subject_id, "beliefs"), params=params))

    async def trace(self, subject_id: str, context: str, attribute: str) -> Trace:
        """Every event behind one belief, counting or not, and why."""
        return Trace.model_validate(await self._call(
            "GET", core.subject_path(subject_id, "beliefs", context, attribute, "trace")))

    async def history(self, subject_id: str, context: str, attribute: str) -> History:
        """How one belief evolved, event by event."""
        return History.model_validate(await self._call(
            "GET", core.subject_path(subject_id, "beliefs", context, attribute, "history")))

    async def contexts(self) -> list[ContextInfo]:
        """The contexts the key may read, with attributes, counts, half-life, restriction."""
        return [ContextInfo.model_validate(c) for c in (await self._call("GET", "/v1/contexts"))["contexts"]]

    async def schemas(self) -> list[SchemaInfo]:
        """Every Avro schema the API knows."""
        return [SchemaInfo.model_validate(s) for s in (await self._call("GET", "/v1/schemas"))["schemas"]]

    async def schema(self, fingerprint: str) -> SchemaInfo:
        """One schema by its fingerprint (16 hex digits)."""
        return SchemaInfo.model_validate(await self._call("GET", f"/v1/schemas/{fingerprint}"))

    async def watch(self, subject_id: str, *, last_event_id: str | None = None,
                    read_timeout_s: float | None = None) -> AsyncIterator[WatchEvent]:
        """Follow the subject's belief changes as they happen
        (``GET /v1/subjects/{id}/watch``, server-sent events); each event's ``data`` is
        one belief change. Resume after a disconnect with the last event's ``id`` as
        ``last_event_id``. The stream ends when the server closes it.

        Raises:
            NotSupported: the server has no watch endpoint.
        """
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        path = core.watch_path(subject_id)
        timeout = httpx.Timeout(self._http.timeout.connect, read=read_timeout_s)
        async with self._http.stream("GET", path, headers=headers, timeout=timeout) as response:
            if response.status_code >= 400:
                await response.aread()
                if core.route_missing(response):
                    raise NotSupported("GET /v1/subjects/{subject_id}/watch",
                                       "this beliefstore API has no watch stream; poll "
                                       "self_model() instead")
                raise core.api_error(response)
            parser = core.SSEParser()
            async for line in response.aiter_lines():
                event = parser.feed(line)
                if event is not None:
                    yield event


__all__ = ["AsyncBeliefClient"]
