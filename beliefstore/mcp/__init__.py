"""beliefstore as an MCP server (the official ``mcp`` Python SDK): tools ``observe``,
``retract``, ``get_self_model``, ``trace_belief``, ``belief_history``, ``list_contexts``
and the resource ``beliefstore://subjects/{subject_id}/self-model``.

Every tool is a call of the HTTP API through :class:`beliefstore.client.AsyncBeliefClient`,
so an MCP caller gets exactly the API's checks, scopes and messages: over stdio
(``beliefstore mcp``) with BELIEFSTORE_API_KEY against BELIEFSTORE_API_URL, and over
streamable HTTP at ``/mcp`` on the API with the caller's own bearer key
(:mod:`beliefstore.api.routes.mcp`).
"""

from beliefstore.mcp.server import ClientFactory, build_server

__all__ = ["ClientFactory", "build_server"]
