"""The asynchronous HTTP client: :class:`AsyncBeliefClient` (asyncio or trio, via anyio)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from datetime import datetime
from typing import Any, TypeVar

import anyio
import httpx

from beliefstore.client import core
from beliefstore.client.errors import InvalidRequest, PermissionDenied
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


class AsyncBeliefClient:
    """A typed, asynchronous client of the beliefstore HTTP API (httpx): the methods of
    :class:`~beliefstore.client.BeliefClient`, with the same arguments, results, retries
    and errors, awaited (``agent()`` is a method here; ``watch`` is an async iterator).
    Both build their requests with :mod:`beliefstore.client.core`.

    Args:
        base_url: as :class:`~beliefstore.client.BeliefClient`.
        api_key: as :class:`~beliefstore.client.BeliefClient`.
        timeout_s: per request, seconds.
        retry: when to retry (429/502/503/504, connection errors), honouring ``Retry-After``.
        transport: an async httpx transport (e.g. ``httpx.ASGITransport``), for embedding.
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 timeout_s: float = 10.0, retry: core.RetryPolicy | None = None,
                 transport: httpx.AsyncBaseTransport | None = None):
        url, key = client_defaults(base_url, api_key)
        self.base_url = url
        self.retry = retry or core.RetryPolicy()
        self._http = httpx.AsyncClient(base_url=url, headers=core.bearer_headers(key),
                                       timeout=timeout_s, transport=transport)
        self._agent: str | None = None
        self._batch: bool | None = None

    # -- plumbing ----------------------------------------------------------------------

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncBeliefClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _send(self, call: core.Call[Any],
                    retry: core.RetryPolicy | None = None) -> httpx.Response:
        """``call`` with retries; returns the final response (any status)."""
        policy = retry or self.retry
        attempt = 1
        while True:
            try:
                response = await self._http.request(call.method, call.path,
                                                    params=call.params, json=call.json)
            except httpx.TransportError as exc:
                if not policy.should_retry(attempt):
                    raise core.unreachable(self.base_url, exc) from exc
                await anyio.sleep(policy.wait_s(attempt, None))
            else:
                wait = policy.wait_after(attempt, response)
                if wait is None:
                    return response
                await anyio.sleep(wait)
            attempt += 1

    async def _run(self, call: core.Call[T]) -> T:
        """``call``'s typed result; an error answer raises its typed error."""
        response = await self._send(call)
        if response.status_code >= 400:
            raise core.api_error(response)
        return call.parse(response.json())

    # -- who -----------------------------------------------------------------------------

    async def whoami(self) -> dict[str, Any]:
        """:meth:`BeliefClient.whoami`, awaited."""
        return await self._run(core.whoami_call())

    async def agent(self) -> str:
        """The key's agent: the source of this client's observations (asked once)."""
        if self._agent is None:
            self._agent = str((await self.whoami())["agent"])
        return self._agent

    # -- writes --------------------------------------------------------------------------

    async def observe(self, subject_id: str, context: str, attribute: str, value: str,
                      confidence: float, *, source: str | None = None,
                      evidence: str | None = None, metadata: Mapping[str, str] | None = None,
                      occurred_at: int | datetime | None = None,
                      event_id: str | None = None) -> Receipt:
        """:meth:`BeliefClient.observe`, awaited."""
        return await self._run(core.observe_call(core.observation_body(
            subject_id, context, attribute, value, confidence, source or await self.agent(),
            evidence, metadata, occurred_at, event_id)))

    async def observe_many(self, observations: Iterable[Mapping[str, Any]]) -> list[BatchResult]:
        """:meth:`BeliefClient.observe_many`, awaited."""
        bodies = [core.prepare_observation(o, o.get("source") or await self.agent())
                  for o in observations]
        if not bodies:
            return []
        if self._batch is not False:
            batch = core.batch_call(bodies)
            response = await self._send(batch)
            self._batch = not core.route_missing(response)
            if self._batch:
                if response.status_code >= 400:
                    raise core.api_error(response)
                return batch.parse(response.json())
        results = []
        for body in bodies:
            try:
                receipt = await self._run(core.observe_call(body))
                results.append(core.single_result(receipt))
            except (InvalidRequest, PermissionDenied) as exc:
                results.append(core.single_result(error=exc))
        return results

    async def retract(self, subject_id: str, event_id: str, reason: str | None = None, *,
                      occurred_at: int | datetime | None = None,
                      retraction_id: str | None = None) -> Receipt:
        """:meth:`BeliefClient.retract`, awaited."""
        return await self._run(core.retract_call(
            core.retraction_body(subject_id, event_id, reason, occurred_at, retraction_id)))

    # -- reads ---------------------------------------------------------------------------

    async def self_model(self, subject_id: str, *, max_age_s: float | None = None,
                         as_of: datetime | str | None = None,
                         time: str | None = None) -> SelfModel:
        """:meth:`BeliefClient.self_model`, awaited."""
        return await self._run(core.self_model_call(subject_id, max_age_s=max_age_s,
                                                    as_of=as_of, time=time))

    async def beliefs(self, subject_id: str, *, context: str | None = None,
                      min_confidence: float | None = None, max_age_s: float | None = None,
                      as_of: datetime | str | None = None, time: str | None = None) -> Beliefs:
        """:meth:`BeliefClient.beliefs`, awaited."""
        return await self._run(core.beliefs_call(subject_id, context=context,
                                                 min_confidence=min_confidence,
                                                 max_age_s=max_age_s, as_of=as_of, time=time))

    async def trace(self, subject_id: str, context: str, attribute: str) -> Trace:
        """:meth:`BeliefClient.trace`, awaited."""
        return await self._run(core.trace_call(subject_id, context, attribute))

    async def history(self, subject_id: str, context: str, attribute: str) -> History:
        """:meth:`BeliefClient.history`, awaited."""
        return await self._run(core.history_call(subject_id, context, attribute))

    async def contexts(self) -> list[ContextInfo]:
        """:meth:`BeliefClient.contexts`, awaited."""
        return await self._run(core.contexts_call())

    async def schemas(self) -> list[SchemaInfo]:
        """:meth:`BeliefClient.schemas`, awaited."""
        return await self._run(core.schemas_call())

    async def schema(self, fingerprint: str) -> SchemaInfo:
        """:meth:`BeliefClient.schema`, awaited."""
        return await self._run(core.schema_call(fingerprint))

    async def watch(self, subject_id: str, *, last_event_id: str | None = None,
                    read_timeout_s: float | None = None) -> AsyncIterator[WatchEvent]:
        """:meth:`BeliefClient.watch` as an async iterator."""
        timeout = httpx.Timeout(self._http.timeout.connect, read=read_timeout_s)
        async with self._http.stream("GET", core.watch_path(subject_id), timeout=timeout,
                                     headers=core.watch_headers(last_event_id)) as response:
            if response.status_code >= 400:
                await response.aread()
                raise core.watch_refused(response)
            parser = core.SSEParser()
            async for line in response.aiter_lines():
                event = parser.feed(line)
                if event is not None:
                    yield event


__all__ = ["AsyncBeliefClient"]
