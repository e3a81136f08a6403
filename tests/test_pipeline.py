"""Every merge vector through the live pipeline: SDK → Kafka → projector → PostgreSQL → API."""

from __future__ import annotations

from dataclasses import replace

import httpx
import pytest

from beliefstore.embedded import free_port
from beliefstore.events.producer import BeliefProducer
from beliefstore.runtime.serve import ApiServer, ProjectorThread
from tests.conftest import load_cases, wait_caught_up
from tests.test_fold import assert_matches

CASES = load_cases()


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_vector_through_live_pipeline(case, settings, engine, auth):
    from tests.conftest import case_events

    s = case["settings"]
    settings = replace(settings, half_lives=s.get("half_lives", {}), trust=s.get("trust", {}))
    with BeliefProducer.from_settings(settings) as producer:
        # One send per event, in the vector's delivery order (duplicates included).
        receipts = [producer.send(e) for e in case_events(case)]
    projector = ProjectorThread(settings)
    projector.start()
    server = ApiServer(settings, "127.0.0.1", free_port()).start_in_thread()
    try:
        wait_caught_up(settings, receipts)
        got = []
        for subject in sorted({e["subject_id"] for e in case["events"]}):
            response = httpx.get(f"{server.url}/v1/subjects/{subject}/self-model", headers=auth)
            assert response.status_code == 200, response.text
            for context, beliefs in sorted(response.json()["contexts"].items()):
                got += [{"subject_id": subject, "context": context, **b} for b in beliefs]
        got.sort(key=lambda b: (b["subject_id"], b["context"], b["attribute"]))
        assert_matches(got, case["expected"])
    finally:
        server.stop()
        projector.stop()
    assert projector.error is None
