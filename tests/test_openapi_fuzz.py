"""schemathesis against the live API's own OpenAPI document: every operation, generated
requests with a valid admin key, no 5xx, and every status the API answers is one its
document declares (with the declared content type and body schema).

Budget: 25 examples per operation (9 operations), generation phase only, drawn from
schemathesis' positive cases, positive cases aimed at a stored subject (so reads get
past 404), and negative cases; about 10 s.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from beliefstore.embedded import free_port
from beliefstore.runtime.serve import ApiServer
from tests.conftest import wait_caught_up

# schemathesis' own strategies use `random` inside (a deprecation warning of hypothesis).
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")

T0 = 1767225600000
EXAMPLES = 25
ATTRIBUTES = {"support": "emotional_state", "health": "condition", "billing": "plan"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


@pytest.fixture
def live_api(settings, engine, producer, projector, key_store):
    """The API (rate limit raised so the fuzzer is not throttled), with one subject's
    beliefs in an ordinary and a restricted context."""
    receipts = [
        producer.observe("user-1", "support", "emotional_state", "calm", 0.7, "triage_agent",
                         occurred_at=T0),
        producer.observe("user-1", "health", "condition", "asthma", 0.7, "nurse_bot",
                         occurred_at=T0),
    ]
    key_store.restrict("health")
    wait_caught_up(settings, receipts)
    server = ApiServer(replace(settings, rate_limit=10_000, rate_burst=10_000), "127.0.0.1",
                       free_port()).start_in_thread()
    yield server.url
    server.stop()


def fuzz(strategy, base_url: str, headers: dict[str, str], statuses: set[int]) -> None:
    @settings(max_examples=EXAMPLES, deadline=None, phases=[Phase.generate],
              database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case) -> None:
        response = case.call(base_url=base_url, headers=headers)
        statuses.add(response.status_code)
        case.validate_response(response, checks=CHECKS, headers=headers)

    run()


def test_every_operation_answers_as_documented(live_api, key_store):
    key = key_store.create("fuzz_agent", "*", "*", admin=True).token
    headers = {"Authorization": f"Bearer {key}"}
    schema = schemathesis.openapi.from_url(f"{live_api}/openapi.json")
    # The watch is an endless event stream, not a request/response pair: test_watch.py
    # covers it (404s, scope, resume, heartbeats).
    operations = [op for op in (result.ok() for result in schema.get_all_operations())
                  if not op.path.endswith("/watch")]
    assert len(operations) >= 9, [op.label for op in operations]
    seen: dict[str, set[int]] = {}

    def pin(case, context: str):
        """Aim a generated request at the stored subject, so reads get past 404."""
        if case.path_parameters and "subject_id" in case.path_parameters:
            case.path_parameters["subject_id"] = "user-1"
            if "context" in case.path_parameters:
                case.path_parameters["context"] = context
                case.path_parameters["attribute"] = ATTRIBUTES[context]
        if isinstance(case.body, dict) and "source" in case.body:
            case.body.update(source="fuzz_agent", subject_id="user-1", context=context,
                             attribute=ATTRIBUTES[context])
        return case

    for operation in operations:
        statuses = seen.setdefault(operation.label, set())
        positive = operation.as_strategy()
        strategy = st.one_of(
            positive,
            st.tuples(positive, st.sampled_from(sorted(ATTRIBUTES))).map(lambda p: pin(*p)),
            operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
        )

        fuzz(strategy, live_api, headers, statuses)

    # The generated requests got past authentication (negative cases also send broken
    # Authorization headers: 401) and reached the stored subject, in its ordinary (200)
    # and its restricted context (403).
    reads = set().union(*(statuses for label, statuses in seen.items() if "subject_id" in label))
    assert {200, 403, 404} <= reads, seen
    assert all(statuses for statuses in seen.values()), seen
