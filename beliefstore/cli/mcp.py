"""``beliefstore mcp``: the MCP server over stdio, for MCP clients that launch it.
"""

from __future__ import annotations

import typer

from beliefstore.cli.common import fail, load_settings


def mcp() -> None:
    """Serve beliefstore's MCP tools (observe, retract, get_self_model, trace_belief,
    belief_history, list_contexts) and the self-model resource over stdio, for an MCP
    client that launches this command. Every call goes to the HTTP API at
    BELIEFSTORE_API_URL with the key in BELIEFSTORE_API_KEY, so the key's scopes apply.
    Standard output carries the protocol; messages go to standard error."""
    import logging
    from contextlib import asynccontextmanager

    import anyio

    from beliefstore.client import AsyncBeliefClient
    from beliefstore.mcp import build_server

    logging.basicConfig(level=logging.WARNING, format="beliefstore mcp: %(message)s")
    settings = load_settings()
    if not settings.api_key and settings.auth:
        raise fail("BELIEFSTORE_API_KEY is not set: set it to the agent's API key (made with "
                   "`beliefstore keys create --agent NAME --read CONTEXTS --write CONTEXTS`) "
                   "in the MCP client's configuration (its \"env\")", 2)
    api = AsyncBeliefClient(settings.api_url, settings.api_key or "")

    @asynccontextmanager
    async def shared(_ctx):
        yield api  # one client (one connection pool) for the whole session

    server = build_server(shared)

    async def serve() -> None:
        try:
            await server.run_stdio_async()
        finally:
            await api.aclose()

    anyio.run(serve)


def register(app: typer.Typer) -> None:
    """Add ``mcp`` to ``app``."""
    app.command()(mcp)
