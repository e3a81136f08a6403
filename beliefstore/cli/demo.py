"""``beliefstore demo``: the seed scenario on real services.

A customer writes to support about a charge for a plan they cancelled. The triage
agent records what it learned through the Python SDK (straight to Kafka); a
sentiment agent, which only speaks HTTP, posts its own observations to the API,
one conflicting and two corroborating; the triage agent retracts one mistaken
observation. The projector folds the events into PostgreSQL, and the billing agent,
taking over the conversation, reads the self-model through the API; the trace of
the contested belief is printed as an auditor would see it.

Each agent that speaks HTTP gets its own API key for the run (made first, revoked at
the end): the sentiment agent may write support, the billing agent may read support
and billing, and the triage agent (which writes through the SDK, a trusted path) may
only read support, so its attempt to read a billing trace is refused with 403.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import replace
from typing import Annotated

import httpx
import typer
from rich.console import Console

from beliefstore.cli.common import console as stdout
from beliefstore.cli.common import fail, load_settings, print_self_model, print_trace, setup_logging
from beliefstore.errors import BeliefstoreError
from beliefstore.settings import Settings, read_state
from beliefstore.timefmt import now_millis

TRIAGE = [
    # context, attribute, value, confidence, evidence, minutes before now
    ("support", "emotional_state", "confused", 0.55, "msg-1: first impression", 13),
    ("support", "issue", "unauthorized_recurring_charge", 0.95,
     "msg-1: 'you charged me again for a plan I cancelled in March'", 12),
    ("support", "emotional_state", "frustrated", 0.88, "msg-3: 'third time I write about this'", 11),
    ("support", "expertise_level", "high", 0.82, "msg-4: quotes the invoice id and the API", 10),
    ("support", "communication_preference", "direct", 0.76, "msg-5: 'just tell me what you will do'", 9),
    ("billing", "plan_status", "active", 0.6, "read from the wrong account", 8),
]
KEYS = {
    # agent: (read scope, write scope)
    "triage_agent": ("support", ""),
    "sentiment_agent": ("support", "support"),
    "billing_agent": ("support,billing", ""),
}
SENTIMENT = [
    ("support", "emotional_state", "angry", 0.62, "tone model on msg-1..msg-5", 7),
    ("support", "expertise_level", "high", 0.7, "vocabulary model on msg-4", 7),
    ("support", "communication_preference", "direct", 0.8, "short imperative sentences", 6),
]


def run_demo(settings: Settings, console: Console) -> str:
    """Run the scenario; return the subject id. Starts whatever is not running.

    If ``beliefstore up`` runs in this directory, its services, projector and API are
    used; otherwise the embedded services (data under ``.beliefstore/``), a projector
    and the API are started for the demo and stopped at its end.
    """
    # imported here, not at the top: they pull in the API app, Kafka and SQLAlchemy, and
    # every `beliefstore` command (its --help too) would pay for them at start-up
    from beliefstore.embedded import free_port
    from beliefstore.events.producer import BeliefProducer, Receipt
    from beliefstore.projector.catalog import ProjectionCatalog
    from beliefstore.runtime.serve import ApiServer, ProjectorThread, wait_projected
    from beliefstore.runtime.startup import prepare, start_missing_services

    subject = f"customer-{uuid.uuid4().hex[:8]}"
    running_up = bool(read_state(settings.home))
    with contextlib.ExitStack() as stack:
        if running_up:
            console.print(f"using the services of the running `beliefstore up` ({settings.api_url})")
            catalog = ProjectionCatalog.from_settings(settings)
            api_url = settings.api_url
        else:
            missing = [name for name, configured in (
                ("Kafka broker", settings.kafka_bootstrap_servers),
                ("PostgreSQL", settings.database_url)) if not configured]
            if missing:
                console.print(f"starting the embedded {' and '.join(missing)} (.beliefstore/)...")
            settings = start_missing_services(settings, stack, durable=True)
            catalog = prepare(settings)
            projector = ProjectorThread(settings, catalog)
            projector.start()
            stack.callback(projector.stop)
            server = ApiServer(settings, "127.0.0.1", free_port(), catalog=catalog)
            server.start_in_thread()
            stack.callback(server.stop)
            api_url = server.url
            settings = replace(settings, api_url=api_url)
        console.print(f"Kafka {settings.kafka_bootstrap_servers}, API {api_url}, "
                      f"subject [bold]{subject}[/]\n")

        from beliefstore.access.keys import KeyStore

        keys = KeyStore.of_catalog(catalog)
        made = {agent: keys.create(agent, read, write) for agent, (read, write) in KEYS.items()}

        def revoke_demo_keys() -> None:
            for new in made.values():
                keys.revoke(new.key.key_id)

        stack.callback(revoke_demo_keys)
        console.rule("API keys for the agents that speak HTTP (revoked at the end)")
        for agent, new in made.items():
            read, write = KEYS[agent]
            console.print(f"  {agent:<16} key {new.key.key_id}  reads {read or '-'}, "
                          f"writes {write or '-'}")

        def bearer(agent: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {made[agent].token}"}

        now = now_millis()
        receipts: list[Receipt] = []
        producer = stack.enter_context(BeliefProducer.from_settings(settings))
        console.rule("triage_agent records what it learned (Python SDK → Kafka)")
        retract_me = None
        for context, attribute, value, confidence, evidence, minutes in TRIAGE:
            r = producer.observe(subject, context, attribute, value, confidence,
                                 source="triage_agent", evidence=evidence,
                                 metadata={"model": "triage-v3", "session_id": "support-8812"},
                                 occurred_at=now - minutes * 60_000)
            receipts.append(r)
            retract_me = r if attribute == "plan_status" else retract_me
            console.print(f"  {context}/{attribute} = {value} ({confidence}) → "
                          f"partition {r.partition} offset {r.offset}")
        assert retract_me is not None
        r = producer.retract(subject, retract_me.event_id, source="triage_agent",
                             reason="read from another customer's account",
                             occurred_at=now - 5 * 60_000)
        receipts.append(r)
        console.print(f"  retracts billing/plan_status ({retract_me.event_id[:8]}…) → "
                      f"partition {r.partition} offset {r.offset}")

        console.rule("sentiment_agent posts its observations (HTTP API → Kafka)")
        with httpx.Client(base_url=api_url, timeout=30) as http:
            for context, attribute, value, confidence, evidence, minutes in SENTIMENT:
                response = http.post("/v1/observations", headers=bearer("sentiment_agent"), json={
                    "subject_id": subject, "context": context, "attribute": attribute,
                    "value": value, "confidence": confidence, "source": "sentiment_agent",
                    "evidence": evidence, "occurred_at": now - minutes * 60_000,
                })
                response.raise_for_status()
                body = response.json()
                receipts.append(Receipt(**body))
                console.print(f"  {context}/{attribute} = {value} ({confidence}) → 201, "
                              f"partition {body['partition']} offset {body['offset']}")

            console.print("\nwaiting for the projector to fold the events into PostgreSQL...")
            wait_projected(catalog, settings.topic, receipts)


            console.rule("billing_agent takes over: GET /v1/subjects/{id}/self-model")
            model = http.get(f"/v1/subjects/{subject}/self-model", headers=bearer("billing_agent"))
            model.raise_for_status()
            print_self_model(model.json(), console)
            for context, attribute in (("support", "emotional_state"), ("billing", "plan_status")):
                console.rule(f"billing_agent audits: GET …/beliefs/{context}/{attribute}/trace")
                trace = http.get(f"/v1/subjects/{subject}/beliefs/{context}/{attribute}/trace",
                                 headers=bearer("billing_agent"))
                trace.raise_for_status()
                print_trace(trace.json(), console)
            console.rule("triage_agent (reads support only) asks for the billing trace")
            refused = http.get(f"/v1/subjects/{subject}/beliefs/billing/plan_status/trace",
                               headers=bearer("triage_agent"))
            console.print(f"  {refused.status_code}: {refused.json().get('detail')}")
        console.print(f"\nWith `beliefstore up` running: beliefstore self-model {subject}; "
                      f"who read it: beliefstore access-log --subject {subject}")
    return subject


def demo(
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the seed scenario end to end: a triage agent and a sentiment agent record what
    they learned in a support conversation (one via the SDK to Kafka, one via the HTTP
    API), one observation is retracted, the projector folds them into PostgreSQL, and the
    billing agent's read of the self-model and one belief's trace are printed, both read
    through the API."""
    setup_logging(verbose)
    settings = load_settings()
    try:
        run_demo(settings, stdout)
    except (BeliefstoreError, RuntimeError, OSError, httpx.HTTPError) as exc:
        raise fail(str(exc)) from None


def register(app: typer.Typer) -> None:
    """Add ``demo`` to ``app``."""
    app.command()(demo)
