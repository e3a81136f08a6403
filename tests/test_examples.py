"""``examples/handoff.py`` runs as documented against the real services: the triage agent
writes with the client, the billing agent reads over MCP."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests import agentworld
from tests.agentworld import World
from tests.test_cli import cli_env

world = agentworld.world
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_handoff_example(world: World, tmp_path):
    env = cli_env(world.settings, tmp_path, world.url, TRIAGE_API_KEY=world.keys["support_bot"],
                  BILLING_API_KEY=world.keys["billing_agent"])
    result = subprocess.run([sys.executable, str(EXAMPLES / "handoff.py"), "--subject",
                             "customer-ex"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert len(out["written"]) == 3
    assert out["billing_sees"]["support/issue"] == {
        "value": "unauthorized_recurring_charge", "confidence": 0.95, "sources": ["support_bot"]}
    assert set(out["billing_sees"]) == {"support/issue", "support/emotional_state",
                                        "support/communication_preference"}


def test_handoff_example_without_keys_says_what_to_set(tmp_path):
    env = {"PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, str(EXAMPLES / "handoff.py")], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "TRIAGE_API_KEY" in result.stderr
