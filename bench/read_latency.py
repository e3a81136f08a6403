"""Handoff read latency and throughput with wrk, at 1M beliefs, auth on, and freshness.

    apt-get update && apt-get install -y wrk        # the C load generator (Debian's wrk)
    .venv/bin/python bench/read_latency.py [--quick] [--subjects N]

1. Creates a projection catalog in a fresh base schema and fills the active
   projection's ``beliefs`` table with ``COPY``: N subjects × 10 attributes in 5
   contexts (full: 100,000 × 10 = 1M beliefs), plus one ``observations`` row per subject;
   then ``VACUUM ANALYZE``.
2. Serves the API as a subprocess, ``beliefstore api --workers W`` (default: the number
   of cores), authentication on (an API key from ``KeyStore.create``), the per-key rate
   limit off (it would throttle the load generator), the access log on; and runs
   ``beliefstore projector`` on an empty topic for the freshness probes.
3. Checks a sample of answers (200, 10 beliefs), warms up with wrk, then runs **wrk**
   (C, keep-alive) against the same server, each for ``seconds`` seconds:

   * ``/healthz`` at 50 connections (2 threads): the server's own request rate limit;
   * ``GET /v1/subjects/{id}/self-model`` of uniformly random subjects (a Lua script
     picks one per request) at 50 connections: throughput, and its ratio to healthz;
   * the same at 1 connection: p50 / p99;
   * the same at a fixed ~500 requests/s: Debian has no wrk2 (``apt-cache policy wrk2``
     finds nothing) and its wrk has no ``-R``, so the rate is held by wrk's Lua
     ``delay()`` hook: 10 connections, each waiting 20 ms before every request
     (10 / 20 ms = 500 req/s, a little less by the response time; the achieved rate is
     reported). Like every closed-loop generator it does not correct for coordinated
     omission: a stall delays the following requests instead of queueing them.

   wrk's Lua ``done()`` prints the latency percentiles and error counts as JSON; any
   non-2xx answer or socket error is counted and reported.
4. Freshness, ``probes`` times, one after another: a watch (``GET .../watch``, SSE) is
   open on a stored subject; an observation with a new value is POSTed through the API;
   the time from just before the POST to (a) the first GET self-model showing the new
   value (polled every 2 ms) and (b) the watch event carrying it.

The load generator, the API processes and PostgreSQL share the machine's cores.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import common
import httpx
import psycopg

from beliefstore.projector.catalog import ProjectionCatalog

NAME = "read_latency"
TITLE = "handoff reads with wrk at 1M beliefs: healthz vs self-model, latency, fixed rate, freshness"

KEYS = [("support", "emotional_state"), ("support", "issue"), ("support", "expertise_level"),
        ("billing", "plan_status"), ("billing", "payment_method"),
        ("purchase_motivation", "primary_driver"), ("communication", "preference"),
        ("preferences", "language"), ("preferences", "contact_time"),
        ("preferences", "channel")]
VALUES = ["calm", "frustrated", "angry", "relieved", "high", "low", "medium"]
SOURCES = ["triage_agent", "billing_agent", "sales_agent", "sentiment_agent"]

HOT_SUBJECTS = 1_000
"""The hot set of the second series of figures."""

TARGETS = {"ratio_min": 0.5, "p50_1_ms": 1.0, "p99_1_ms": 3.0, "p99_fixed_ms": 10.0,
           "fresh_visible_p99_ms": 100.0, "fresh_watch_p99_ms": 100.0}

LUA_REPORT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRK_JSON {"requests":%d,"duration_us":%d,"socket_errors":%d,'
    .. '"non2xx":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""

LUA_SELF_MODEL = """
local subjects = %(subjects)d
local token = "%(token)s"
local pacing_ms = %(pacing_ms)d
local thread_no = 0
setup = function(thread)
  thread:set("seed", thread_no)
  thread_no = thread_no + 1
end
init = function(args)
  math.randomseed(1000 + seed)
end
request = function()
  local path = string.format("/v1/subjects/subject-%%06d/self-model", math.random(0, subjects - 1))
  return wrk.format("GET", path, {["Authorization"] = "Bearer " .. token})
end
if pacing_ms > 0 then
  delay = function() return pacing_ms end
end
"""


def params(quick: bool) -> dict[str, Any]:
    return {"subjects": 10_000 if quick else 100_000, "seconds": 5 if quick else 15,
            "probes": 50 if quick else 200, "workers": os.cpu_count() or 1}


def fill(conninfo: str, schema: str, subjects: int) -> float:
    """COPY ``subjects`` × 10 beliefs and one observation per subject; return seconds."""
    rng = random.Random(1)
    now = datetime.now(UTC)
    started = time.perf_counter()
    with psycopg.connect(conninfo, options=f"-csearch_path={schema}") as conn:
        with conn.cursor() as cur, cur.copy(
                "COPY beliefs (subject_id, context, attribute, value, confidence, score, "
                "alternatives, support, sources, source_count, last_observed_at, updated_at) "
                "FROM STDIN") as copy, common.progress() as bar:
            task = bar.add_task("COPY beliefs", total=subjects * len(KEYS))
            for i in range(subjects):
                subject = f"subject-{i:06d}"
                for context, attribute in KEYS:
                    value, alt = rng.sample(VALUES, 2)
                    confidence = round(rng.uniform(0.5, 0.99), 6)
                    sources = rng.sample(SOURCES, 2)
                    copy.write_row((
                        subject, context, attribute, value, confidence, 1.5,
                        json.dumps({alt: round(1 - confidence, 6)}),
                        json.dumps([str(uuid.UUID(int=rng.getrandbits(128), version=4))
                                    for _ in range(2)]),
                        json.dumps(sorted(sources)), 2, now, now))
                if i % 1000 == 999:
                    bar.advance(task, 1000 * len(KEYS))
        with conn.cursor() as cur, cur.copy(
                "COPY observations (event_id, subject_id, context, attribute, value, confidence, "
                "source, occurred_at, kafka_topic, kafka_partition, kafka_offset, "
                "writer_fingerprint) FROM STDIN") as copy:
            for i in range(subjects):
                copy.write_row((str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                                f"subject-{i:06d}", "support", "emotional_state", "calm", 0.8,
                                "triage_agent", now, "bench", i % 4, i // 4, "0" * 16))
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE beliefs")
        conn.execute("VACUUM ANALYZE observations")
    return time.perf_counter() - started


def wrk(url: str, script: str, connections: int, threads: int, seconds: int,
        work: Path) -> dict[str, Any]:
    """Run Debian's wrk with a Lua script; return its WRK_JSON figures (ms, req/s)."""
    exe = shutil.which("wrk")
    if exe is None:
        raise RuntimeError("wrk is not installed: apt-get update && apt-get install -y wrk")
    path = work / f"wrk-{uuid.uuid4().hex[:6]}.lua"
    path.write_text(script + LUA_REPORT)
    done = subprocess.run([exe, "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s",
                           "--timeout", "10s", "-s", str(path), url], capture_output=True,
                          text=True, timeout=seconds + 60)
    line = next((x for x in done.stdout.splitlines() if x.startswith("WRK_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout[-2000:]} "
                           f"{done.stderr[-2000:]}")
    raw = json.loads(line.split(" ", 1)[1])
    seconds_run = raw["duration_us"] / 1e6
    return {"connections": connections, "threads": threads, "seconds": round(seconds_run, 2),
            "requests": raw["requests"],
            "requests_per_second": round(raw["requests"] / seconds_run, 1),
            "p50_ms": raw["p50_us"] / 1000, "p90_ms": raw["p90_us"] / 1000,
            "p99_ms": raw["p99_us"] / 1000, "max_ms": raw["max_us"] / 1000,
            "socket_errors": raw["socket_errors"], "non2xx": raw["non2xx"]}


def _show(label: str, r: dict[str, Any]) -> None:
    errors = r["socket_errors"] + r["non2xx"]
    common.console.print(
        f"  {label}: {r['requests_per_second']:,.0f} req/s, p50 {r['p50_ms']:.2f} ms, p99 "
        f"{r['p99_ms']:.2f} ms" + (f"; [red]{errors} errors/non-2xx[/]" if errors else ""))


def freshness(url: str, token: str, probes: int, subjects: int) -> dict[str, Any]:
    """POST an observation with a new value, time (a) the first GET showing it and (b) the
    watch event carrying it; ``probes`` times, one after another."""
    from httpx_sse import connect_sse

    headers = {"Authorization": f"Bearer {token}"}
    visible: list[float] = []
    pushed: list[float] = []
    missing = 0
    rng = random.Random(7)
    with httpx.Client(base_url=url, headers=headers, timeout=10) as client:
        for number in range(probes):
            subject = f"subject-{rng.randrange(subjects):06d}"
            value = f"probe-{number}-{uuid.uuid4().hex[:6]}"
            arrived: dict[str, float] = {}
            ready = threading.Event()

            def watch(subject: str = subject, value: str = value,
                      arrived: dict[str, float] = arrived, ready: threading.Event = ready) -> None:
                with httpx.Client(base_url=url, headers=headers,
                                  timeout=httpx.Timeout(10, read=15)) as watcher, \
                        connect_sse(watcher, "GET", f"/v1/subjects/{subject}/watch") as source:
                    for sse in source.iter_sse():
                        if sse.event == "ready":
                            ready.set()
                        elif sse.event == "belief" and json.loads(sse.data)["value"] == value:
                            arrived["t"] = time.perf_counter()
                            return

            thread = threading.Thread(target=watch, daemon=True)
            thread.start()
            if not ready.wait(10):
                raise RuntimeError(f"the watch of {subject} did not start")
            t0 = time.perf_counter()
            posted = client.post("/v1/observations", json={
                "subject_id": subject, "context": "support", "attribute": "issue",
                "value": value, "confidence": 0.99, "source": "bench_agent"})
            if posted.status_code != 201:
                raise RuntimeError(f"POST: {posted.status_code} {posted.text[:300]}")
            seen = None
            deadline = t0 + 10
            while time.perf_counter() < deadline:
                body = client.get(f"/v1/subjects/{subject}/self-model").json()
                if any(b["value"] == value for b in body["contexts"].get("support", [])):
                    seen = time.perf_counter()
                    break
                time.sleep(0.002)
            thread.join(10)
            if seen is None or "t" not in arrived:
                missing += 1
                continue
            visible.append(seen - t0)
            pushed.append(arrived["t"] - t0)
    out: dict[str, Any] = {"probes": probes, "missing": missing}
    for label, values in (("visible", visible), ("watch", pushed)):
        if values:
            out[f"{label}_p50_ms"] = round(common.percentile(values, 50) * 1000, 1)
            out[f"{label}_p99_ms"] = round(common.percentile(values, 99) * 1000, 1)
            out[f"{label}_max_ms"] = round(max(values) * 1000, 1)
    return out


def run(ctx: common.Context, *, subjects: int, seconds: int, probes: int,
        workers: int) -> dict[str, Any]:
    base = ctx.name("rl")
    topic = ctx.new_topic("reads")
    settings = ctx.settings(db_schema=base, topic=topic)
    catalog = ProjectionCatalog.from_settings(settings)
    conninfo = common.psycopg_conninfo(ctx.database_url)
    home = Path(tempfile.mkdtemp(prefix="bench-read-"))
    log = home / "api.log"
    out: dict[str, Any] = {"beliefs": subjects * len(KEYS), "subjects": subjects,
                           "api_workers": workers, "wrk_seconds": seconds,
                           "load_generator": "wrk " + _wrk_version()}
    try:
        catalog.ensure()
        schema = catalog.active().schema
        out["fill_seconds"] = round(fill(conninfo, schema, subjects), 1)
        common.console.print(f"  filled {subjects * len(KEYS):,} beliefs in "
                             f"{out['fill_seconds']:.0f} s")
        token = common.api_headers(catalog)["Authorization"].split(" ", 1)[1]
        port = common.free_port()
        env = ctx.cli_env(settings, home)
        with common.cli_process(["api", "--host", "127.0.0.1", "--port", str(port),
                                 "--workers", str(workers)], env, log) as proc, \
                common.cli_process(["projector"], env, home / "projector.log"):
            url = f"http://127.0.0.1:{port}"
            common.wait_http(f"{url}/healthz", proc, log)
            headers = {"Authorization": f"Bearer {token}"}
            for i in range(20):  # every answer is whole before we count them
                r = httpx.get(f"{url}/v1/subjects/subject-{i * 7 % subjects:06d}/self-model",
                              headers=headers, timeout=10)
                if r.status_code != 200 or r.json()["belief_count"] != len(KEYS):
                    raise RuntimeError(f"bad answer: {r.status_code} {r.text[:300]}")
            lua = LUA_SELF_MODEL % {"subjects": subjects, "token": token, "pacing_ms": 0}
            paced = LUA_SELF_MODEL % {"subjects": subjects, "token": token, "pacing_ms": 20}
            wrk(url, lua, 50, 2, seconds, home)  # warm-up: connections, pools, caches
            out["healthz_50"] = wrk(f"{url}/healthz", "", 50, 2, seconds, home)
            _show("/healthz, 50 connections", out["healthz_50"])
            out["self_model_50"] = wrk(url, lua, 50, 2, seconds, home)
            _show("self-model, 50 connections", out["self_model_50"])
            out["ratio_self_model_over_healthz"] = round(
                out["self_model_50"]["requests_per_second"]
                / out["healthz_50"]["requests_per_second"], 3)
            common.console.print(f"  ratio self-model / healthz: "
                                 f"{out['ratio_self_model_over_healthz']:.1%}")
            out["self_model_1"] = wrk(url, lua, 1, 1, seconds, home)
            _show("self-model, 1 connection", out["self_model_1"])
            out["self_model_fixed_500"] = wrk(url, paced, 10, 1, seconds, home)
            _show("self-model, ~500 req/s (10 connections, 20 ms pacing)",
                  out["self_model_fixed_500"])
            # The same three figures on a hot set of 1,000 subjects (the people in
            # conversations right now): after the warm-up nearly every read is a cache hit.
            hot = min(HOT_SUBJECTS, subjects)
            hot_lua = LUA_SELF_MODEL % {"subjects": hot, "token": token, "pacing_ms": 0}
            hot_paced = LUA_SELF_MODEL % {"subjects": hot, "token": token, "pacing_ms": 20}
            wrk(url, hot_lua, 50, 2, 5, home)  # warm-up of the hot set
            out["self_model_50_hot"] = wrk(url, hot_lua, 50, 2, seconds, home)
            _show(f"self-model, {hot:,} hot subjects, 50 connections", out["self_model_50_hot"])
            out["ratio_hot_self_model_over_healthz"] = round(
                out["self_model_50_hot"]["requests_per_second"]
                / out["healthz_50"]["requests_per_second"], 3)
            common.console.print(f"  ratio hot self-model / healthz: "
                                 f"{out['ratio_hot_self_model_over_healthz']:.1%}")
            out["self_model_1_hot"] = wrk(url, hot_lua, 1, 1, seconds, home)
            _show(f"self-model, {hot:,} hot subjects, 1 connection", out["self_model_1_hot"])
            out["self_model_fixed_500_hot"] = wrk(url, hot_paced, 10, 1, seconds, home)
            _show(f"self-model, {hot:,} hot subjects, ~500 req/s", out["self_model_fixed_500_hot"])
            out["freshness"] = freshness(url, token, probes, subjects)
            f = out["freshness"]
            common.console.print(
                f"  freshness over {probes} probes: POST → visible p50 "
                f"{f.get('visible_p50_ms')} ms, p99 {f.get('visible_p99_ms')} ms; POST → watch "
                f"event p50 {f.get('watch_p50_ms')} ms, p99 {f.get('watch_p99_ms')} ms"
                + (f"; {f['missing']} missing" if f["missing"] else ""))
    except BaseException:
        for name in ("api.log", "projector.log"):  # what the servers said, before it is gone
            if (home / name).exists():
                tail = (home / name).read_text(errors="replace").splitlines()[-40:]
                common.console.print(f"--- last lines of {name} ---", *tail, sep="\n",
                                     markup=False, highlight=False)
        raise
    finally:
        catalog.dispose()
        ctx.drop_schemas(catalog.schema_for("self_model"), base)
        shutil.rmtree(home, ignore_errors=True)
    out["targets"] = TARGETS
    out["met"] = _met(out)
    out["met_hot"] = _met_hot(out)
    return out


def _wrk_version() -> str:
    exe = shutil.which("wrk")
    if exe is None:
        return "(not installed)"
    done = subprocess.run([exe, "-v"], capture_output=True, text=True)
    return (done.stdout or done.stderr).split("\n")[0].strip()


def _met(r: dict[str, Any]) -> dict[str, bool]:
    f = r["freshness"]
    return {
        "ratio": r["ratio_self_model_over_healthz"] >= TARGETS["ratio_min"],
        "p50_1": r["self_model_1"]["p50_ms"] <= TARGETS["p50_1_ms"],
        "p99_1": r["self_model_1"]["p99_ms"] <= TARGETS["p99_1_ms"],
        "p99_fixed": r["self_model_fixed_500"]["p99_ms"] <= TARGETS["p99_fixed_ms"],
        "fresh_visible": f.get("visible_p99_ms", 1e9) <= TARGETS["fresh_visible_p99_ms"]
        and not f["missing"],
        "fresh_watch": f.get("watch_p99_ms", 1e9) <= TARGETS["fresh_watch_p99_ms"]
        and not f["missing"],
    }


def _met_hot(r: dict[str, Any]) -> dict[str, bool]:
    return {
        "ratio": r["ratio_hot_self_model_over_healthz"] >= TARGETS["ratio_min"],
        "p50_1": r["self_model_1_hot"]["p50_ms"] <= TARGETS["p50_1_ms"],
        "p99_1": r["self_model_1_hot"]["p99_ms"] <= TARGETS["p99_1_ms"],
        "p99_fixed": r["self_model_fixed_500_hot"]["p99_ms"] <= TARGETS["p99_fixed_ms"],
    }


def summary(result: dict) -> list[str]:
    h, m, one, fixed, f = (result["healthz_50"], result["self_model_50"], result["self_model_1"],
                           result["self_model_fixed_500"], result["freshness"])
    met = result["met"]

    def ok(name: str) -> str:
        return "met" if met[name] else "missed"

    return [
        f"{result['beliefs']:,} beliefs, {result['api_workers']} API process(es), wrk "
        f"{result['wrk_seconds']} s per figure",
        f"50 connections: self-model {m['requests_per_second']:,.0f} req/s / healthz "
        f"{h['requests_per_second']:,.0f} req/s = {result['ratio_self_model_over_healthz']:.1%} "
        f"(target ≥ 50%: {ok('ratio')})",
        f"1 connection: p50 {one['p50_ms']:.2f} ms ({ok('p50_1')}, ≤ 1 ms), p99 "
        f"{one['p99_ms']:.2f} ms ({ok('p99_1')}, ≤ 3 ms)",
        f"fixed {fixed['requests_per_second']:,.0f} req/s: p99 {fixed['p99_ms']:.2f} ms "
        f"({ok('p99_fixed')}, ≤ 10 ms)",
        f"hot set of {HOT_SUBJECTS:,}: ratio {result['ratio_hot_self_model_over_healthz']:.1%}, "
        f"1 connection p50 {result['self_model_1_hot']['p50_ms']:.2f} ms / p99 "
        f"{result['self_model_1_hot']['p99_ms']:.2f} ms, fixed "
        f"{result['self_model_fixed_500_hot']['requests_per_second']:,.0f} req/s p99 "
        f"{result['self_model_fixed_500_hot']['p99_ms']:.2f} ms",
        f"freshness: POST → visible p99 {f.get('visible_p99_ms')} ms ({ok('fresh_visible')}), "
        f"POST → watch event p99 {f.get('watch_p99_ms')} ms ({ok('fresh_watch')}), ≤ 100 ms",
    ]


if __name__ == "__main__":
    sys.exit(common.standalone(sys.modules[__name__]))
