"""The MCP server over streamable HTTP at ``/mcp``, with the API's own bearer keys.

A request to ``/mcp`` is authenticated (and rate limited) exactly like every other
endpoint (401/429 with the same messages) before the MCP SDK sees it. Each tool call then
calls the API in process (``httpx.ASGITransport``) with the caller's ``Authorization``
header, so the read/write scopes, restricted contexts, source binding and messages are
the API's own, and every call is in the access log as a direct HTTP read would be.

The MCP session manager runs stateless with JSON responses (any API process can answer
any request, as behind a load balancer) and is started by the app's lifespan.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import APIRouter, FastAPI, HTTPException
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from mcp.server.mcpserver import Context
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp
from mcp.server.transport_security import TransportSecuritySettings
from starlette.requests import Request
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from beliefstore.api.deps import get_caller
from beliefstore.api.security import bearer
from beliefstore.client import AsyncBeliefClient
from beliefstore.client.core import NO_RETRY
from beliefstore.mcp import build_server

router = APIRouter()
"""No FastAPI routes: :func:`mount` adds ``/mcp`` as a raw ASGI route."""

PATH = "/mcp"
_INTERNAL = "http://beliefstore-api.internal"


class BearerGuard:
    """ASGI wrapper: the API's authentication and rate limit (:func:`get_caller`) before
    ``app``; a refusal is the API's JSON error with its status and headers."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope)
        state = request.app.state.beliefstore
        try:
            credentials = await bearer(request)
            caller = await run_in_threadpool(get_caller, request, state, credentials)
            if inspect.isawaitable(caller):  # an async get_caller works the same
                await caller
        except HTTPException as exc:
            await JSONResponse({"detail": exc.detail}, exc.status_code, exc.headers)(
                scope, receive, send)
            return
        await self.app(scope, receive, send)


def mount(app: FastAPI) -> None:
    """Add ``/mcp`` to ``app`` and keep the MCP session manager on ``app.state``; the
    app's lifespan must run :func:`running`."""

    def client_for(ctx: Context | None) -> AsyncBeliefClient:
        headers = ctx.headers if ctx is not None else None
        token = ""
        if headers is not None:
            scheme, _, value = (headers.get("authorization") or "").partition(" ")
            token = value.strip() if scheme.lower() == "bearer" else ""
        return AsyncBeliefClient(_INTERNAL, token, transport=httpx.ASGITransport(app=app),
                                 retry=NO_RETRY, timeout_s=60.0)

    server = build_server(client_for)
    server.streamable_http_app(
        streamable_http_path=PATH, stateless_http=True, json_response=True,
        # Bearer keys are required on every request (BearerGuard), so DNS rebinding
        # cannot reach it without a key; the API is served under any host name.
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False))
    app.state.mcp_server = server
    app.router.routes.append(Route(PATH, endpoint=BearerGuard(
        StreamableHTTPASGIApp(server.session_manager)), methods=["GET", "POST", "DELETE"],
        include_in_schema=False))


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[None]:
    """Run the MCP session manager of :func:`mount` for the app's lifetime."""
    server = getattr(app.state, "mcp_server", None)
    if server is None:
        yield
        return
    async with server.session_manager.run():
        yield
