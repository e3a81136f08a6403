"""Hostile input, fuzzed: control characters, NUL, overlong values and non-UTF-8 bytes in
the path, the query, the headers and the body of every operation. No 5xx, ever; every
identifier is refused with a 4xx before it reaches PostgreSQL.

Two generators, both hypothesis:

* schemathesis cases of every operation (positive and negative, from the OpenAPI
  document), each with one path parameter, query parameter, header or body field replaced
  by a hostile string (:data:`HOSTILE_TEXT`), sent by schemathesis;
* raw requests built from arbitrary bytes (percent-encoded into the path and query, raw
  in headers and bodies), which schemathesis cannot send: invalid UTF-8, lone surrogates
  in JSON escapes.

``BELIEFSTORE_FUZZ_EXAMPLES`` sets the examples per operation and per raw location (default
15 and 60, about 15 s); bench/README.md records the ≥ 10,000-case run.
"""

from __future__ import annotations

import json
import os
import urllib.parse

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st
from schemathesis.generation import GenerationMode

from tests.test_openapi_fuzz import live_api  # noqa: F401  (the fixture)

pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")

EXAMPLES = int(os.environ.get("BELIEFSTORE_FUZZ_EXAMPLES", "15"))
RAW_EXAMPLES = int(os.environ.get("BELIEFSTORE_FUZZ_RAW_EXAMPLES", str(EXAMPLES * 4)))

CONTROL = st.sampled_from([chr(c) for c in range(0x20)] + ["\x7f"])
HOSTILE_TEXT = st.one_of(
    st.just("\x00"),
    st.text(CONTROL, min_size=1, max_size=4),
    st.text(st.one_of(CONTROL, st.characters(codec="utf-8")), min_size=1, max_size=24),
    st.builds(lambda n, c: c * n, st.integers(129, 5000), st.sampled_from(["a", "\x00", "é"])),
    st.builds(lambda a, b: a + "\x00" + b, st.text(max_size=8), st.text(max_size=8)),
)
"""Strings PostgreSQL cannot store (NUL), control characters, overlong and mixed text."""


def hostile(case, data):
    """Replace one path parameter, query parameter, header or body field of ``case``."""
    spots = [("path", k) for k in case.path_parameters or {}]
    spots += [("query", k) for k in case.query or {}] + [("query", "context"), ("query", "as_of")]
    spots += [("header", "X-Request-Id")]
    if isinstance(case.body, dict):
        spots += [("body", k) for k in case.body]
    where, name = data.draw(st.sampled_from(spots))
    value = data.draw(HOSTILE_TEXT)
    if where == "path":
        case.path_parameters[name] = value
    elif where == "query":
        case.query = {**(case.query or {}), name: value}
    elif where == "header":
        case.headers = {**(case.headers or {}), name: value}
    else:
        case.body[name] = value
    return case


def test_every_operation_survives_hostile_text(live_api, key_store):  # noqa: F811
    key = key_store.create("fuzz_agent", "*", "*", admin=True).token
    headers = {"Authorization": f"Bearer {key}"}
    schema = schemathesis.openapi.from_url(f"{live_api}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    statuses: dict[int, int] = {}
    sent = 0
    for operation in operations:
        strategy = st.one_of(operation.as_strategy(),
                             operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))

        @settings(max_examples=EXAMPLES, deadline=None, phases=[Phase.generate],
                  database=None, derandomize=True, suppress_health_check=list(HealthCheck))
        @given(case=strategy, data=st.data())
        def run(case, data) -> None:
            nonlocal sent
            case = hostile(case, data)
            try:
                response = case.call(base_url=live_api, headers=headers)
            except (requests.exceptions.InvalidHeader, ValueError, UnicodeError):
                assume(False)  # the client itself refuses to send it: not an HTTP request
            sent += 1
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert response.status_code < 500, (case.method, case.formatted_path, case.query,
                                                case.body, response.text[:500])

        run()
    print(f"\nhostile text: {sent} requests over {len(operations)} operations, statuses "
          f"{dict(sorted(statuses.items()))}")
    assert sent >= EXAMPLES * len(operations) // 2, (sent, statuses)
    assert 422 in statuses, statuses  # the hostile identifiers were refused, not served


PATHS = ["/v1/subjects/{s}/self-model", "/v1/subjects/{s}/beliefs",
         "/v1/subjects/{s}/beliefs/{c}/{a}/trace", "/v1/subjects/{s}/beliefs/{c}/{a}/history"]
RAW = st.binary(min_size=1, max_size=40)


def test_raw_bytes_in_path_query_headers_and_body_are_never_a_5xx(live_api, key_store):  # noqa: F811
    key = key_store.create("fuzz_raw", "*", "*", admin=True).token
    auth = {"Authorization": f"Bearer {key}"}
    statuses: dict[int, int] = {}

    @settings(max_examples=RAW_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate])
    @given(where=st.sampled_from(["path", "query", "header", "body", "json"]), raw=RAW,
           template=st.sampled_from(PATHS), slot=st.sampled_from(["s", "c", "a"]))
    def run(where, raw, template, slot) -> None:
        encoded = urllib.parse.quote_from_bytes(raw, safe="")
        parts = {"s": "user-1", "c": "support", "a": "emotional_state"}
        with httpx.Client(base_url=live_api, timeout=30) as client:
            if where == "path":
                parts[slot] = encoded
                response = client.get(template.format(**parts), headers=auth)
            elif where == "query":
                response = client.get(f"{template.format(**parts)}?context={encoded}"
                                      f"&as_of={encoded}", headers=auth)
            elif where == "header":
                value = raw.replace(b"\r", b"").replace(b"\n", b"").strip() or b"x"
                try:
                    response = client.get(template.format(**parts), headers={
                        "Authorization": b"Bearer " + value, "X-Request-Id": value})
                except (httpx.LocalProtocolError, ValueError):
                    assume(False)  # not sendable as an HTTP header
            elif where == "body":
                response = client.post("/v1/observations", content=raw, headers={
                    **auth, "content-type": "application/json"})
            else:  # JSON with the bytes as (maybe surrogate-escaped) text in every field
                text = raw.decode("utf-8", "surrogateescape").replace("\udc80", "\ud800")
                body = {"subject_id": text, "context": "support", "attribute": "mood",
                        "value": text, "confidence": 0.5, "source": "fuzz_raw",
                        "evidence": text, "metadata": {"k": text}}
                response = client.post("/v1/observations", headers={
                    **auth, "content-type": "application/json"},
                    content=json.dumps(body).encode())
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code < 500, (where, raw, response.text[:500])

    run()
    print(f"\nraw bytes: {sum(statuses.values())} requests, statuses "
          f"{dict(sorted(statuses.items()))}")
    assert 422 in statuses, statuses
