"""The MCP server's tools and resource, over any :class:`AsyncBeliefClient`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Annotated

from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ResourceError, ToolError
from pydantic import BaseModel, Field

from beliefstore.client import AsyncBeliefClient
from beliefstore.client.errors import APIError, ClientError
from beliefstore.client.models import ContextInfo, History, Receipt, SelfModel, Trace

ClientFactory = Callable[[Context | None], AbstractAsyncContextManager[AsyncBeliefClient]]
"""Given the tool call's context (``None`` for a resource read without one), an async
context manager yielding the client to call the API with (e.g. with the caller's key)."""

INSTRUCTIONS = (
    "beliefstore keeps one shared self-model per person (subject): what agents have observed "
    "about them, merged into beliefs with a confidence. Before talking to a person, call "
    "get_self_model(subject_id) to learn what other agents already know (use max_age_s to skip "
    "stale beliefs); record what you learn with observe (confidence in [0, 1]); withdraw your own "
    "mistaken observation with retract(event_id). list_contexts shows the contexts you may read; "
    "trace_belief and belief_history explain a belief."
)

SubjectId = Annotated[str, Field(description="The person's id, e.g. customer-42.")]
ContextName = Annotated[str, Field(description="Namespace, e.g. support or billing "
                                   "([A-Za-z0-9_.:-]).")]
Attribute = Annotated[str, Field(description="What is observed, e.g. emotional_state.")]


class ContextList(BaseModel):
    """The contexts the key may read."""

    contexts: list[ContextInfo]


def _tool_error(exc: ClientError) -> ToolError:
    """The API's refusal as the tool's error: status and the API's own message."""
    if isinstance(exc, APIError):
        return ToolError(f"beliefstore API refused ({exc.status}): {exc.message}")
    return ToolError(str(exc))


def build_server(client: ClientFactory, *, name: str = "beliefstore") -> MCPServer:
    """The MCP server; each tool call gets its API client from ``client``.

    Raises (as tool errors, ``is_error=True`` with the message): the API's 401/403/404/422/429
    refusals with its message, and an unreachable API.
    """
    # log_level WARNING: MCPServer calls logging.basicConfig, which must not raise the
    # level of an application that left logging unconfigured.
    server: MCPServer = MCPServer(name, instructions=INSTRUCTIONS, version="1",
                                  log_level="WARNING")

    @server.tool(title="Record an observation")
    async def observe(
        subject_id: SubjectId, context: ContextName, attribute: Attribute,
        value: Annotated[str, Field(description="The observed value (at most 4096 characters).")],
        confidence: Annotated[float, Field(description="Your confidence in [0, 1].")],
        ctx: Context,
        evidence: Annotated[str | None, Field(description="Message id or quote backing it.")] = None,
    ) -> Receipt:
        """Record what you observed about a person. The source is your API key's agent.
        Returns the event id (keep it to retract the observation) and its Kafka position."""
        async with client(ctx) as api:
            try:
                return await api.observe(subject_id, context, attribute, value, confidence,
                                         evidence=evidence)
            except ClientError as exc:
                raise _tool_error(exc) from None

    @server.tool(title="Retract an observation")
    async def retract(
        subject_id: SubjectId,
        event_id: Annotated[str, Field(description="event_id of your observation to withdraw.")],
        ctx: Context,
        reason: Annotated[str | None, Field(description="Why it is withdrawn.")] = None,
    ) -> Receipt:
        """Withdraw one of your own earlier observations (by its event id); it stops counting
        once projected. Another agent's observation cannot be retracted by you."""
        async with client(ctx) as api:
            try:
                return await api.retract(subject_id, event_id, reason)
            except ClientError as exc:
                raise _tool_error(exc) from None

    @server.tool(title="Read a person's self-model")
    async def get_self_model(
        subject_id: SubjectId, ctx: Context,
        context: Annotated[str | None, Field(description="Only this context.")] = None,
        min_confidence: Annotated[float | None, Field(
            description="Only beliefs at least this confident, in [0, 1].")] = None,
        max_age_s: Annotated[float | None, Field(
            description="Leave out beliefs whose newest observation is older (seconds).")] = None,
    ) -> SelfModel:
        """What is believed about the person, grouped by context: each belief's value,
        confidence, alternatives, sources and age in seconds. Contexts your key may not
        read are left out."""
        async with client(ctx) as api:
            try:
                if context is None and min_confidence is None:
                    return await api.self_model(subject_id, max_age_s=max_age_s)
                found = await api.beliefs(subject_id, context=context,
                                          min_confidence=min_confidence, max_age_s=max_age_s)
            except ClientError as exc:
                raise _tool_error(exc) from None
        grouped: dict[str, list] = {}
        for b in found.beliefs:
            grouped.setdefault(b.context, []).append(b)
        return SelfModel(subject_id=subject_id, contexts=grouped, belief_count=len(found.beliefs))

    @server.tool(title="Trace a belief")
    async def trace_belief(subject_id: SubjectId, context: ContextName, attribute: Attribute,
                           ctx: Context) -> Trace:
        """Every event behind one belief, counting or not and why (superseded, retracted,
        erased), with weights, sources and Kafka positions."""
        async with client(ctx) as api:
            try:
                return await api.trace(subject_id, context, attribute)
            except ClientError as exc:
                raise _tool_error(exc) from None

    @server.tool(title="How a belief evolved")
    async def belief_history(subject_id: SubjectId, context: ContextName, attribute: Attribute,
                             ctx: Context) -> History:
        """The belief's value and confidence after each event that changed it, in log order."""
        async with client(ctx) as api:
            try:
                return await api.history(subject_id, context, attribute)
            except ClientError as exc:
                raise _tool_error(exc) from None

    @server.tool(title="Contexts you may read")
    async def list_contexts(ctx: Context) -> ContextList:
        """The contexts your key may read, each with its attributes, number of beliefs,
        half-life (seconds) and whether it is restricted."""
        async with client(ctx) as api:
            try:
                return ContextList(contexts=await api.contexts())
            except ClientError as exc:
                raise _tool_error(exc) from None

    @server.resource("beliefstore://subjects/{subject_id}/self-model",
                     name="self-model", mime_type="application/json",
                     description="A person's self-model (as get_self_model), as JSON.")
    async def self_model_resource(subject_id: str, ctx: Context) -> str:
        async with client(ctx) as api:
            try:
                model = await api.self_model(subject_id)
            except ClientError as exc:
                raise ResourceError(str(_tool_error(exc))) from None
        return model.model_dump_json()

    return server

