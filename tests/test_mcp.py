"""The MCP server, through the official SDK's own client, over streamable HTTP (``/mcp`` on
the API, with bearer keys) and over stdio (``beliefstore mcp``), against real services:
every tool, the self-model resource, typed schemas, and the API's refusals (401, 403, 422)
with the same messages as over HTTP."""

from __future__ import annotations

import json
import sys
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import httpx2
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from beliefstore.events.producer import Receipt as SdkReceipt
from tests import agentworld
from tests.agentworld import SUBJECT, World
from tests.test_cli import cli_env

world = agentworld.world

BELIEFSTORE = Path(sys.executable).parent / "beliefstore"
TOOLS = {"observe", "retract", "get_self_model", "trace_belief", "belief_history",
         "list_contexts"}


@asynccontextmanager
async def http_client(world: World, key: str | None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
        async with Client(streamable_http_client(world.url + "/mcp", http_client=http),
                          cache=None) as client:
            yield client


@asynccontextmanager
async def stdio_client(world: World, key: str, tmp_path: Path):
    env = cli_env(world.settings, tmp_path, world.url, BELIEFSTORE_API_KEY=key)
    params = StdioServerParameters(command=str(BELIEFSTORE), args=["mcp"], env=env)
    async with Client(params, cache=None) as client:
        yield client


def structured(result) -> dict:
    assert not result.is_error, result.content
    return result.structured_content


def error_text(result) -> str:
    assert result.is_error, result.structured_content
    return " ".join(c.text for c in result.content)


async def exercise_every_tool(client: Client, world: World) -> None:
    """Every tool and the resource, as agent triage_agent (reads/writes *)."""
    tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == TOOLS
    observe_schema = tools["observe"].input_schema
    assert set(observe_schema["required"]) == {"subject_id", "context", "attribute", "value",
                                               "confidence"}
    assert observe_schema["properties"]["confidence"]["type"] == "number"
    assert "event_id" in tools["observe"].output_schema["properties"]
    assert "contexts" in tools["get_self_model"].output_schema["properties"]

    receipt = structured(await client.call_tool("observe", {
        "subject_id": SUBJECT, "context": "support", "attribute": "channel", "value": "chat",
        "confidence": 0.8, "evidence": "msg-9"}))
    assert receipt["topic"] == world.settings.topic
    world.wait_for([SdkReceipt(**{k: receipt[k] for k in ("event_id", "topic", "partition",
                                                           "offset")})])
    model = structured(await client.call_tool("get_self_model", {"subject_id": SUBJECT}))
    support = {b["attribute"]: b for b in model["contexts"]["support"]}
    assert support["channel"]["value"] == "chat" and support["channel"]["sources"] == [
        "triage_agent"]  # source = the key's agent
    assert set(model["contexts"]) == {"support", "billing"}
    fresh = structured(await client.call_tool("get_self_model", {
        "subject_id": SUBJECT, "max_age_s": 3600}))
    assert {b["attribute"] for bs in fresh["contexts"].values() for b in bs} == {
        "emotional_state", "channel"}
    filtered = structured(await client.call_tool("get_self_model", {
        "subject_id": SUBJECT, "context": "support", "min_confidence": 0.75}))
    assert set(filtered["contexts"]) == {"support"} and filtered["belief_count"] == 3

    trace = structured(await client.call_tool("trace_belief", {
        "subject_id": SUBJECT, "context": "support", "attribute": "channel"}))
    assert [e["event_id"] for e in trace["events"]] == [receipt["event_id"]]
    history = structured(await client.call_tool("belief_history", {
        "subject_id": SUBJECT, "context": "support", "attribute": "channel"}))
    assert [c["value"] for c in history["changes"]] == ["chat"]
    contexts = structured(await client.call_tool("list_contexts", {}))
    assert {c["context"] for c in contexts["contexts"]} == {"support", "billing"}

    resource = await client.read_resource(f"beliefstore://subjects/{SUBJECT}/self-model")
    document = json.loads(resource.contents[0].text)
    assert document["subject_id"] == SUBJECT and "channel" in {
        b["attribute"] for b in document["contexts"]["support"]}

    retraction = structured(await client.call_tool("retract", {
        "subject_id": SUBJECT, "event_id": receipt["event_id"], "reason": "test"}))
    world.wait_for([SdkReceipt(**{k: retraction[k] for k in ("event_id", "topic", "partition",
                                                              "offset")})])
    after = structured(await client.call_tool("get_self_model", {"subject_id": SUBJECT}))
    assert "channel" not in {b["attribute"] for b in after["contexts"]["support"]}

    invalid = error_text(await client.call_tool("observe", {
        "subject_id": SUBJECT, "context": "support", "attribute": "x", "value": "y",
        "confidence": 3}))
    assert "422" in invalid and "body.confidence" in invalid


async def refusals_match_http(client: Client, world: World) -> None:
    """As support_bot (reads and writes support only): the API's 403s and omissions."""
    denied = error_text(await client.call_tool("trace_belief", {
        "subject_id": SUBJECT, "context": "billing", "attribute": "plan"}))
    http = world.get("support_bot", f"/v1/subjects/{SUBJECT}/beliefs/billing/plan/trace")
    assert http.status_code == 403 and f"(403): {http.json()['detail']}" in denied
    write = error_text(await client.call_tool("observe", {
        "subject_id": SUBJECT, "context": "billing", "attribute": "plan", "value": "free",
        "confidence": 0.5}))
    assert "403" in write and "may not write context 'billing'" in write
    model = structured(await client.call_tool("get_self_model", {"subject_id": SUBJECT}))
    http_model = world.get("support_bot", f"/v1/subjects/{SUBJECT}/self-model").json()
    assert set(model["contexts"]) == set(http_model["contexts"]) == {"support"}
    history = error_text(await client.call_tool("belief_history", {
        "subject_id": SUBJECT, "context": "health", "attribute": "condition"}))
    assert "403" in history and "health" in history
    contexts = structured(await client.call_tool("list_contexts", {}))
    assert [c["context"] for c in contexts["contexts"]] == ["support"]
    missing = error_text(await client.call_tool("get_self_model", {"subject_id": "nobody"}))
    assert "404" in missing and "nobody" in missing


def test_mcp_over_streamable_http(world: World):
    async def run() -> None:
        async with http_client(world, world.keys["triage_agent"]) as client:
            await exercise_every_tool(client, world)
        async with http_client(world, world.keys["support_bot"]) as client:
            await refusals_match_http(client, world)

    anyio.run(run)


def test_mcp_over_http_needs_a_valid_key(world: World):
    for headers, words in (({}, "missing API key"),
                           ({"Authorization": "Bearer bsk_nope"}, "malformed API key")):
        response = httpx.post(world.url + "/mcp", headers={
            **headers, "Accept": "application/json, text/event-stream"},
            json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, timeout=10)
        assert response.status_code == 401, response.text
        assert words in response.json()["detail"]
        assert response.headers["www-authenticate"].startswith("Bearer")


def test_mcp_over_stdio(world: World, tmp_path):
    async def run() -> None:
        async with stdio_client(world, world.keys["triage_agent"], tmp_path) as client:
            await exercise_every_tool(client, world)
        async with stdio_client(world, world.keys["support_bot"], tmp_path) as client:
            await refusals_match_http(client, world)

    anyio.run(run)


def test_mcp_stdio_without_a_key_says_what_to_set(world: World, tmp_path):
    import subprocess

    env = cli_env(world.settings, tmp_path, world.url)
    result = subprocess.run([str(BELIEFSTORE), "mcp"], env=env, capture_output=True, text=True,
                            timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 2 and result.stdout == ""
    assert "BELIEFSTORE_API_KEY is not set" in " ".join(result.stderr.split())
