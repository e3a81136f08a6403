"""The API's guards: bearer API keys (401), scopes (403), rate limits (429) and the
request body size limit (413).

The rate limit is a token bucket per API key (per client address for failed
authentications, and for everyone when authentication is off), kept in the memory of
one API process: with N API processes behind a load balancer, a key may make up to N
times ``BELIEFSTORE_RATE_LIMIT`` requests per second in all.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from fastapi import HTTPException
from fastapi.security import HTTPBearer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from beliefstore.api.models import ErrorOut

if TYPE_CHECKING:
    from beliefstore.access.scopes import Principal

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key from `beliefstore keys create` (printed once), sent as "
    "`Authorization: Bearer bsk_<key id>_<secret>`.",
)

REALM = 'Bearer realm="beliefstore"'


def unauthorized(message: str, reason: str) -> HTTPException:
    """401 with ``WWW-Authenticate: Bearer`` (RFC 6750; ``invalid_token`` unless missing)."""
    challenge = REALM if reason == "missing" else f'{REALM}, error="invalid_token"'
    return HTTPException(401, message, headers={"WWW-Authenticate": challenge})


def forbidden(message: str) -> HTTPException:
    return HTTPException(403, message)


def require_own_source(caller: Principal, source: str, events: str, fix: str) -> None:
    """403 unless ``source`` is ``caller``'s agent: an agent writes events only as itself
    (an unrestricted admin key may write any source).

    Args:
        caller: the request's key.
        source: the event's ``source``.
        events: what is posted, plural, for the message (``"observations"``).
        fix: the sentence that ends the message and says what to do instead.

    Raises:
        HTTPException: 403 naming the source, the key and ``fix``.
    """
    if not caller.unrestricted and source != caller.agent:
        raise forbidden(
            f"source {source!r} is not this key's agent: {events} posted with "
            f"{caller.describe()} must have source {caller.agent!r}. {fix}")


def too_many_requests(message: str, retry_after_s: float) -> HTTPException:
    seconds = max(1, math.ceil(retry_after_s))
    return HTTPException(429, f"{message}; retry after {seconds} s",
                         headers={"Retry-After": str(seconds)})


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorOut, "description": description}


UNAUTHORIZED = _error("No API key, or an invalid or revoked one (`WWW-Authenticate: Bearer`).")
RATE_LIMITED = _error("Too many requests with this key; `Retry-After` says when to retry.")
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: UNAUTHORIZED, 429: RATE_LIMITED,
    503: _error("The database is unreachable, so the key cannot be checked."),
}
READ_RESPONSES: dict[int | str, dict[str, Any]] = {
    **AUTH_RESPONSES,
    404: _error("Unknown subject or belief (among the contexts the key may read)."),
}
TRACE_RESPONSES: dict[int | str, dict[str, Any]] = {
    **READ_RESPONSES,
    403: _error("The key may not read this context (not in its read scope, or restricted)."),
}
WRITE_RESPONSES: dict[int | str, dict[str, Any]] = {
    **AUTH_RESPONSES,
    400: _error("The body cannot be parsed (not UTF-8 JSON)."),
    403: _error("The key may not write this context, or the source is not the key's agent."),
    413: _error("The request body is larger than BELIEFSTORE_MAX_BODY_BYTES."),
}
ADMIN_RESPONSES: dict[int | str, dict[str, Any]] = {
    **AUTH_RESPONSES, 403: _error("The key is not an admin key."),
}


class BodyLimitMiddleware:
    """Refuse request bodies larger than ``max_bytes`` with 413, before the app reads them.

    ``path_limits`` gives some paths their own limit (``{path: bytes}``). A declared
    ``Content-Length`` over the limit is refused at once; a chunked body is
    read up to the limit (never further) and then refused. Bodies within the limit are
    buffered (at most ``max_bytes``) and handed to the app unchanged.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, path_limits: dict[str, int] | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.path_limits = dict(path_limits or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # ``path_limits``: endpoints with their own limit (the batch ingest)
        limit = self.path_limits.get(scope.get("path", ""), self.max_bytes)
        length = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = None
        if length is not None and length > limit:
            await self._refuse(send, f"the request body is {length} bytes; the limit is "
                               f"{limit} bytes", scope.get("path", "") in self.path_limits)
            return
        messages: list[Message] = []
        total = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            total += len(message.get("body", b""))
            if total > limit:
                await self._refuse(send, f"the request body is larger than the limit of "
                                   f"{limit} bytes", scope.get("path", "") in self.path_limits)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            if messages:
                return messages.pop(0)
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send, what: str, own_limit: bool = False) -> None:
        import json

        body = json.dumps({"detail": (
            f"{what}: nothing was produced; split the batch into several requests"
            if own_limit else
            f"{what} (BELIEFSTORE_MAX_BODY_BYTES): send one observation per request, with "
            "value at most 4096 and evidence at most 16384 characters, or ask the operator "
            "to raise the limit")}).encode("utf-8")
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


__all__ = [
    "ADMIN_RESPONSES",
    "AUTH_RESPONSES",
    "BodyLimitMiddleware",
    "READ_RESPONSES",
    "TRACE_RESPONSES",
    "WRITE_RESPONSES",
    "bearer",
    "forbidden",
    "too_many_requests",
    "unauthorized",
]
