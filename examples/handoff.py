r"""A handoff between two agents through beliefstore.

The triage agent talks to a customer and writes what it learned with the typed HTTP
client (``beliefstore.client``); the billing agent, which only speaks MCP, takes over and
reads the customer's self-model through the MCP server at ``<API>/mcp`` before its first
word. Each agent has its own API key, so each sees only its contexts.

Run it against a running beliefstore (``beliefstore up``)::

    export BELIEFSTORE_API_URL=http://127.0.0.1:8000
    export TRIAGE_API_KEY=$(beliefstore keys create --agent triage_agent --read support --write support)
    export BILLING_API_KEY=$(beliefstore keys create --agent billing_agent \
        --read support,billing --write billing)
    python examples/handoff.py --subject customer-42

It prints what the billing agent learned, as JSON, and exits 0 (1 if the beliefs did not
arrive within ``--timeout`` seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import anyio
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from beliefstore.client import BeliefClient


def triage(api_url: str, key: str, subject: str) -> list[str]:
    """The triage agent records what the conversation showed; returns the event ids."""
    with BeliefClient(api_url, key) as client:
        results = client.observe_many([
            {"subject_id": subject, "context": "support", "attribute": "issue",
             "value": "unauthorized_recurring_charge", "confidence": 0.95, "evidence": "msg-1"},
            {"subject_id": subject, "context": "support", "attribute": "emotional_state",
             "value": "frustrated", "confidence": 0.88, "evidence": "msg-3"},
            {"subject_id": subject, "context": "support", "attribute": "communication_preference",
             "value": "direct", "confidence": 0.8, "evidence": "msg-4"},
        ])
        refused = [r for r in results if not r.ok]
        if refused:
            raise SystemExit(f"triage: observations refused: {[r.detail for r in refused]}")
        return [r.receipt.event_id for r in results if r.receipt is not None]


async def billing(api_url: str, key: str, subject: str, expected: int, timeout_s: float) -> dict:
    """The billing agent reads the self-model over MCP, waiting for the projector."""
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
        async with Client(streamable_http_client(f"{api_url}/mcp", http_client=http),
                          cache=None) as mcp:
            deadline = time.monotonic() + timeout_s
            while True:
                result = await mcp.call_tool("get_self_model", {"subject_id": subject,
                                                                "max_age_s": 3600})
                model = result.structured_content if not result.is_error else None
                if model and model["belief_count"] >= expected:
                    return model
                if time.monotonic() > deadline:
                    text = " ".join(getattr(c, "text", "") for c in result.content)
                    raise SystemExit(f"billing: the self-model is not there yet: {text}")
                await anyio.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subject", default="customer-42")
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()
    api_url = os.environ.get("BELIEFSTORE_API_URL", "http://127.0.0.1:8000").rstrip("/")
    try:
        triage_key, billing_key = os.environ["TRIAGE_API_KEY"], os.environ["BILLING_API_KEY"]
    except KeyError as exc:
        print(f"set {exc.args[0]} (see the docstring of examples/handoff.py)", file=sys.stderr)
        return 2
    written = triage(api_url, triage_key, args.subject)
    model = anyio.run(billing, api_url, billing_key, args.subject, len(written), args.timeout)
    learned = {f"{b['context']}/{b['attribute']}": {"value": b["value"],
                                                    "confidence": round(b["confidence"], 3),
                                                    "sources": b["sources"]}
               for beliefs in model["contexts"].values() for b in beliefs}
    print(json.dumps({"subject_id": args.subject, "written": written, "billing_sees": learned},
                     indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
