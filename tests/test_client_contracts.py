"""The client's side of two endpoints other issues add (the batch ingest of issue 11 and
the watch stream of issue 10), against a small Starlette server that speaks exactly the
contract the client documents, over real sockets:

* ``POST /v1/observations:batch`` with ``{"observations": [...]}`` → 207 with
  ``{"results": [{"status": 201, "receipt": {...}} | {"status": 422, "detail": [...]}]}``;
* ``GET /v1/subjects/{id}/watch``: server-sent events, ``id:`` and ``data:`` (one belief
  change as JSON), resumed with ``Last-Event-ID``.

The stand-in checks what the client sends and answers in the contract's shape; it is
not beliefstore's implementation (that lives on those issues' branches, and the
client's fallbacks on this branch are tested against the real API in test_client.py).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from beliefstore.client import AsyncBeliefClient, BeliefClient
from beliefstore.embedded import free_port

SEEN: dict[str, object] = {}


async def batch(request: Request) -> JSONResponse:
    body = await request.json()
    SEEN["batch"] = body
    SEEN["authorization"] = request.headers.get("authorization")
    results = []
    for i, o in enumerate(body["observations"]):
        if not 0 <= o["confidence"] <= 1:
            results.append({"status": 422, "detail": [{"loc": ["body", "observations", i,
                                                                "confidence"],
                                                        "msg": "must be in [0, 1]",
                                                        "type": "value_error"}]})
        else:
            results.append({"status": 201, "receipt": {"event_id": o["event_id"], "topic": "t",
                                                       "partition": 0, "offset": i}})
    return JSONResponse({"results": results}, status_code=207)


async def whoami(request: Request) -> JSONResponse:
    return JSONResponse({"agent": "triage_agent"})


async def watch(request: Request) -> StreamingResponse:
    SEEN["last_event_id"] = request.headers.get("last-event-id")
    start = int(request.headers.get("last-event-id") or 0)

    async def events():
        yield ": connected\n\n"
        for n in range(start + 1, start + 4):
            change = {"subject_id": request.path_params["subject_id"], "context": "support",
                      "attribute": "mood", "value": f"v{n}", "confidence": 0.5 + n / 100}
            yield f"id: {n}\nevent: belief\ndata: {json.dumps(change)}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def contract_url() -> Iterator[str]:
    app = Starlette(routes=[Route("/v1/observations:batch", batch, methods=["POST"]),
                            Route("/v1/whoami", whoami),
                            Route("/v1/subjects/{subject_id}/watch", watch)])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_observe_many_uses_the_batch_endpoint(contract_url):
    with BeliefClient(contract_url, "bsk_k") as client:
        results = client.observe_many([
            {"subject_id": "u", "context": "support", "attribute": "mood", "value": "ok",
             "confidence": 0.7},
            {"subject_id": "u", "context": "support", "attribute": "mood", "value": "ok",
             "confidence": 1.7, "event_id": "11111111-1111-4111-8111-111111111111"},
        ])
        assert client._batch is True
    sent = SEEN["batch"]["observations"]
    assert SEEN["authorization"] == "Bearer bsk_k"
    assert [o["source"] for o in sent] == ["triage_agent"] * 2  # the key's agent
    assert len({o["event_id"] for o in sent}) == 2  # fixed client-side, before any retry
    assert [r.status for r in results] == [201, 422]
    assert results[0].receipt.event_id == sent[0]["event_id"]
    assert results[1].detail[0]["loc"][-1] == "confidence" and not results[1].ok


def test_watch_yields_belief_changes_and_resumes(contract_url):
    with BeliefClient(contract_url, "bsk_k") as client:
        events = list(client.watch("u-1"))
        assert [e.id for e in events] == ["1", "2", "3"]
        assert events[0].event == "belief" and events[0].data["value"] == "v1"
        resumed = list(client.watch("u-1", last_event_id=events[-1].id))
    assert SEEN["last_event_id"] == "3" and [e.data["value"] for e in resumed] == [
        "v4", "v5", "v6"]

    async def run() -> list:
        async with AsyncBeliefClient(contract_url, "bsk_k") as client:
            return [e async for e in client.watch("u-2")]

    async_events = asyncio.run(run())
    assert [e.data["subject_id"] for e in async_events] == ["u-2"] * 3
