"""Soak: mixed load on `beliefstore up` for ten minutes; memory must stay flat, nothing may
fail, and every acknowledged observation must be visible.

Setup: `apt-get update && apt-get install -y wrk` (the HTTP load generator) and
`pip install -e ".[bench]"` (psutil). Run: `.venv/bin/python bench/soak.py [--seconds 600]`.

What runs, against one `beliefstore up` (authentication on, its first admin key, rate limit
off) on a fresh data directory:

* ingest: `wrk` POSTs observations (client-chosen unique event ids, 500 subjects) on
  2 connections for the whole run, at most 2/s (:data:`POST_DELAY_MS`);
* reads: `wrk` GETs self-models of those subjects on 2 connections, at most 10/s;
* a checker: one POST per second with a known event id (its own subject per POST, and
  every fifth one to the watched subject); at the end every one that got 201 must appear
  in its belief's trace;
* a watch: `GET /v1/subjects/soak-watched/watch` held open for the whole run (server-sent
  events, heartbeat every 5 s); a dropped stream is resumed with `Last-Event-ID` and
  counted as an error; it must deliver at least one `belief` event;
* one `beliefstore replay --switch` at the middle of the run;
* RSS of every process `up` started (up itself, the broker, its S3 store, PostgreSQL: the
  postmaster and its backends summed) every 5 s; for PostgreSQL also each process's RSS
  and Pss_Anon, its role (a backend or which auxiliary process) and, for a backend, the
  process whose connection it serves (`up`, an API worker, the replay), so a growth is
  attributed; and twice (after the warm-up and at the end) every backend's memory
  contexts as PostgreSQL reports them (``pg_log_backend_memory_contexts``).

Figures (each a ratio to its limit): RSS last/first ≤ 1.2 per process group (first = the
sample after 60 s of warm-up; for PostgreSQL, whose processes share one buffer pool that
fills up to shared_buffers as the tables grow, the summed private heap (Pss_Anon) is
judged and the summed RSS and the pool's residency (Pss_Shmem) reported beside it),
errors = 0 (non-2xx answers but the reads' 404 of a subject not yet projected, socket
errors, timeouts, a failed replay, access records `up` logged as not acknowledged,
tracebacks in its log), every 201 visible. Results go to `bench/results/soak-<date>.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import RESULTS, machine_info  # noqa: E402

CLI = str(Path(sys.executable).parent / "beliefstore")
RSS_LIMIT = 1.2
WARMUP_S = 60.0
SAMPLE_EVERY_S = 5.0
#: Pause of each wrk connection between requests (2 connections each): at most 2 POST/s
#: and 10 reads/s (each read also writes an access record to Kafka), a rate the durable
#: embedded broker (Tansu on localbucket) and its projector sustained for ten minutes on 2
#: cores shared with other work (the projector must keep up for "every 201 visible").
POST_DELAY_MS = 1000
GET_DELAY_MS = 200
REPLAY_TIMEOUT_S = 900
#: The subject the watch follows; the checker writes every fifth observation to it.
WATCHED = "soak-watched"

POST_LUA = """
counter = 0
local threads = {}
function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end
function delay()
  return POST_DELAY_MS
end
function request()
  counter = counter + 1
  local id = string.format("5041c000-%04x-4000-8000-%012x", tid, counter)
  local body = string.format('{"event_id":"%s","subject_id":"soak-%d","context":"support",'
    .. '"attribute":"mood","value":"v%d","confidence":0.7,"source":"admin"}',
    id, counter % 500, counter % 5)
  return wrk.format("POST", "/v1/observations", HEADERS, body)
end
function done(summary, latency, requests)
  io.write(string.format('WRK {"requests":%d,"status_errors":%d,"connect":%d,"read":%d,'
    .. '"write":%d,"timeout":%d,"p50_ms":%.2f,"p99_ms":%.2f}\\n', summary.requests,
    summary.errors.status, summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.timeout, latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
"""

GET_LUA = """
counter = 0
function delay()
  return GET_DELAY_MS
end
function request()
  counter = counter + 1
  return wrk.format("GET", "/v1/subjects/soak-" .. (counter % 500) .. "/self-model", HEADERS)
end
function done(summary, latency, requests)
  io.write(string.format('WRK {"requests":%d,"status_errors":%d,"connect":%d,"read":%d,'
    .. '"write":%d,"timeout":%d,"p50_ms":%.2f,"p99_ms":%.2f}\\n', summary.requests,
    summary.errors.status, summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.timeout, latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
"""


def lua(script: str, key: str, folder: Path, name: str) -> Path:
    headers = ('HEADERS = {["Content-Type"] = "application/json", '
               f'["Authorization"] = "Bearer {key}"}}\n'
               f"POST_DELAY_MS = {POST_DELAY_MS}\nGET_DELAY_MS = {GET_DELAY_MS}\n")
    path = folder / name
    path.write_text(headers + script)
    return path


def wrk(url: str, script: Path, seconds: int, log: Path) -> subprocess.Popen:
    return subprocess.Popen(["wrk", "-t1", "-c2", f"-d{seconds}s", "--timeout", "30s",
                             "-s", str(script), url], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)


def wrk_summary(log: Path) -> dict:
    for line in log.read_text().splitlines():
        if line.startswith("WRK "):
            return json.loads(line[4:])
    raise RuntimeError(f"wrk printed no summary: {log.read_text()[-2000:]}")


def processes(up: psutil.Process, home: Path) -> dict[str, list[psutil.Process]]:
    """up, broker, S3 store and PostgreSQL (postmaster + backends), by name."""
    groups: dict[str, list[psutil.Process]] = {"up": [up]}
    for child in up.children(recursive=True):
        cmd = " ".join(child.cmdline())
        name = ("broker (tansu)" if "tansu" in child.name() else
                "s3 store (localbucket)" if "localbucket" in cmd or "s3server" in cmd else
                "api (supervisor)" if " api" in cmd else
                "api (workers)" if "multiprocessing" in cmd else child.name())
        groups.setdefault(name, []).append(child)
    pid_file = home / "postgres" / "postmaster.pid"
    if pid_file.exists():
        postmaster = psutil.Process(int(pid_file.read_text().split()[0]))
        groups["postgres (all processes)"] = [postmaster, *postmaster.children(recursive=True)]
    return groups


def smaps_mib(procs: list[psutil.Process], field: str) -> float:
    """Summed ``field`` of ``/proc/PID/smaps_rollup`` (Linux) over ``procs``, MiB: e.g.
    ``Pss_Anon`` (private and copy-on-write heap, shared pages split among their
    processes) or ``Pss_Shmem`` (shared memory such as PostgreSQL's buffer pool)."""
    total_kib = 0
    for p in procs:
        try:
            for line in Path(f"/proc/{p.pid}/smaps_rollup").read_text().splitlines():
                if line.startswith(field + ":"):
                    total_kib += int(line.split()[1])
        except OSError:
            pass
    return round(total_kib / 1024, 1)


def rss_mib(procs: list[psutil.Process], kind: str = "rss") -> float:
    """Summed resident memory of ``procs`` in MiB: ``rss`` (each process's resident set)
    or ``pss`` (proportional set size: a page shared by k processes counts 1/k in each,
    so the sum over a process group counts shared memory once; Linux smaps)."""
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss if kind == "rss" else p.memory_full_info().pss
        except psutil.Error:
            pass
    return round(total / 2**20, 1)


def client_owners(groups: dict[str, list[psutil.Process]]) -> dict[int, str]:
    """Local TCP port → the name of the process that owns the socket: each of ``up``'s
    processes (an API worker by its pid), a ``beliefstore replay``, this soak, "other".
    A PostgreSQL backend's ``ps`` title names its client's address and port, so this maps
    every backend to the process whose connection it serves."""
    names: dict[int, str] = {}
    for name, procs in groups.items():
        if name.startswith("postgres"):
            continue
        for p in procs:
            names[p.pid] = f"{name} {p.pid}" if name == "api (workers)" else name
    owners: dict[int, str] = {}
    for conn in psutil.net_connections(kind="tcp"):
        if conn.pid is None or not conn.laddr:
            continue
        name = names.get(conn.pid)
        if name is None:
            try:
                cmd = " ".join(psutil.Process(conn.pid).cmdline())
            except psutil.Error:
                continue
            name = ("replay" if " replay" in cmd else "soak" if conn.pid == os.getpid()
                    else "other")
        owners[conn.laddr.port] = name
    return owners


_BACKEND = re.compile(r"^postgres: (?:\S+ ){2}[\d.:a-f\[\]]+\((\d+)\)")


def postgres_detail(procs: list[psutil.Process], owners: dict[int, str]) -> list[dict]:
    """One row per PostgreSQL process: pid, role (``postmaster``, ``checkpointer``,
    ``io worker 0``, ... or ``backend``), its client (the process whose connection a backend
    serves, see :func:`client_owners`), its ``ps`` state, RSS and Pss_Anon (MiB)."""
    rows = []
    for i, p in enumerate(procs):
        try:
            title = " ".join(p.cmdline()).strip()
            rss = p.memory_info().rss
        except psutil.Error:
            continue
        anon = smaps_mib([p], "Pss_Anon")
        m = _BACKEND.match(title)
        if i == 0:
            role, client, state = "postmaster", "", ""
        elif m:
            role, client = "backend", owners.get(int(m.group(1)), "?")
            state = title[m.end():].strip()
        else:
            role, client, state = title.removeprefix("postgres:").strip(), "", ""
        rows.append({"pid": p.pid, "role": role, "client": client, "state": state,
                     "rss_mib": round(rss / 2**20, 1), "pss_anon_mib": anon})
    return rows


class Watcher(threading.Thread):
    """Holds ``GET /v1/subjects/{id}/watch`` open; counts ``belief`` events and drops.

    A stream that ends or fails before :attr:`stop` is set is a drop (an error); the
    watcher then resumes with ``Last-Event-ID`` as a handoff agent would.
    """

    def __init__(self, url: str, headers: dict[str, str], subject: str,
                 stop: threading.Event):
        super().__init__(daemon=True)
        self.url, self.headers, self.subject, self.stop = url, headers, subject, stop
        self.events = 0
        self.heartbeats = 0
        self.errors: list[str] = []
        self.last_id: str | None = None

    def run(self) -> None:
        timeout = httpx.Timeout(10, read=30)
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout) as client:
            while not self.stop.is_set():
                headers = {"Last-Event-ID": self.last_id} if self.last_id else {}
                try:
                    with client.stream("GET", f"/v1/subjects/{self.subject}/watch",
                                       params={"heartbeat_s": 5}, headers=headers) as r:
                        if r.status_code == 404 and self.last_id is None and not self.events:
                            self.stop.wait(1.0)  # the watched subject is not projected yet
                            continue
                        if r.status_code != 200:
                            self.errors.append(f"watch {r.status_code}: {r.read()[:200]!r}")
                            self.stop.wait(1.0)
                            continue
                        event = None
                        for line in r.iter_lines():
                            if self.stop.is_set():
                                return
                            if line.startswith(":"):
                                self.heartbeats += 1
                            elif line.startswith("event:"):
                                event = line[6:].strip()
                            elif line.startswith("id:"):
                                self.last_id = line[3:].strip()
                            elif line == "":
                                if event == "belief":
                                    self.events += 1
                                event = None
                except httpx.HTTPError as exc:
                    if self.stop.is_set():
                        return
                    self.errors.append(f"watch dropped: {exc!r}")
                    continue
                if not self.stop.is_set():
                    self.errors.append("watch stream ended by the server")


class Checker(threading.Thread):
    """One POST a second with a known event id; remembers which got 201."""

    def __init__(self, url: str, headers: dict[str, str], stop: threading.Event):
        super().__init__(daemon=True)
        self.url, self.headers, self.stop = url, headers, stop
        self.acked: list[tuple[str, str]] = []
        self.errors: list[str] = []

    def run(self) -> None:
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=60) as client:
            n = 0
            while not self.stop.wait(1.0):
                n += 1
                event_id, subject = str(uuid.uuid4()), f"check-{uuid.uuid4().hex[:10]}"
                if n % 5 == 0:
                    subject = WATCHED
                try:
                    r = client.post("/v1/observations", json={
                        "event_id": event_id, "subject_id": subject, "context": "support",
                        "attribute": "mood", "value": f"checked-{n}", "confidence": 0.9,
                        "source": "admin"})
                except httpx.HTTPError as exc:
                    self.errors.append(f"POST: {exc!r}")
                    continue
                if r.status_code == 201:
                    self.acked.append((subject, event_id))
                else:
                    self.errors.append(f"POST {r.status_code}: {r.text[:200]}")

    def invisible(self, timeout_s: float = 300) -> list[str]:
        """The acknowledged event ids not in their belief's trace (after up to
        ``timeout_s`` seconds for the projector to catch up)."""
        missing = list(self.acked)
        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=30) as client:
            while missing and time.monotonic() < deadline:
                still = []
                for subject, event_id in missing:
                    r = client.get(f"/v1/subjects/{subject}/beliefs/support/mood/trace")
                    if r.status_code != 200 or event_id not in {
                            e["event_id"] for e in r.json()["events"]}:
                        still.append((subject, event_id))
                missing = still
                if missing:
                    time.sleep(2)
        return [e for _, e in missing]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=600, help="Duration of the load (600).")
    parser.add_argument("--out", type=Path, default=None,
                        help="Results file (default bench/results/soak-<date>.json).")
    args = parser.parse_args(argv)
    seconds = args.seconds

    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt  # SIGTERM too: the finally below stops `up`

    signal.signal(signal.SIGTERM, interrupted)
    started = datetime.now(UTC)
    work = Path(tempfile.mkdtemp(prefix="beliefstore-soak-"))
    home = work / ".beliefstore"
    port = _free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL")
           and not k.startswith("BELIEFSTORE_")}
    env.update(BELIEFSTORE_HOME=str(home), BELIEFSTORE_API_PORT=str(port),
               BELIEFSTORE_RATE_LIMIT="0", COLUMNS="300")
    up_log = work / "up.log"
    up = subprocess.Popen([CLI, "up"], env=env, cwd=work, stdout=open(up_log, "w"),
                          stderr=subprocess.STDOUT)
    result: dict = {}
    posts = reads = None
    try:
        deadline = time.monotonic() + 120
        while "Press Ctrl-C" not in up_log.read_text():
            if up.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"up did not start: {up_log.read_text()[-3000:]}")
            time.sleep(0.2)
        key = re.search(r"BELIEFSTORE_API_KEY=(\S+)", up_log.read_text()).group(1)
        url = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {key}"}
        # seed the subjects the readers read
        with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
            for i in range(501):
                client.post("/v1/observations", json={
                    "subject_id": f"soak-{i}" if i < 500 else WATCHED,
                    "context": "support", "attribute": "mood",
                    "value": "seed", "confidence": 0.5, "source": "admin"}).raise_for_status()
        stop = threading.Event()
        checker = Checker(url, headers, stop)
        checker.start()
        watcher = Watcher(url, headers, WATCHED, stop)
        watcher.start()
        posts = wrk(url, lua(POST_LUA, key, work, "post.lua"), seconds, work / "wrk-post.log")
        reads = wrk(url, lua(GET_LUA, key, work, "get.lua"), seconds, work / "wrk-get.log")
        t0 = time.monotonic()
        samples: list[dict] = []
        replay: dict = {}
        replayer: threading.Thread | None = None
        contexts_first: dict[str, dict] = {}

        def run_replay(at_s: float) -> None:
            r0 = time.monotonic()
            try:
                done = subprocess.run([CLI, "replay", "--switch"], env=env, cwd=work,
                                      capture_output=True, text=True, timeout=REPLAY_TIMEOUT_S)
            except subprocess.TimeoutExpired as exc:
                replay.update(at_s=round(at_s, 1), exit_code=None, duration_s=REPLAY_TIMEOUT_S,
                              output_tail=f"timed out after {REPLAY_TIMEOUT_S} s: "
                              f"{str(exc.stdout or '')[-1000:]}")
                return
            replay.update(at_s=round(at_s, 1), exit_code=done.returncode,
                          duration_s=round(time.monotonic() - r0, 1),
                          output_tail=(done.stdout + done.stderr)[-1500:])

        up_proc = psutil.Process(up.pid)
        while time.monotonic() - t0 < seconds:
            groups = processes(up_proc, home)
            pg = postgres_detail(groups.get("postgres (all processes)", []),
                                 client_owners(groups))
            samples.append({"t_s": round(time.monotonic() - t0, 1),
                            **{name: rss_mib(ps) for name, ps in groups.items()},
                            **{f"{name} {field}": smaps_mib(ps, field)
                               for name, ps in groups.items() if name.startswith("postgres")
                               for field in ("Pss_Anon", "Pss_Shmem")},
                            "postgres backends": sum(r["role"] == "backend" for r in pg),
                            "postgres processes": pg})
            if not contexts_first and samples[-1]["t_s"] >= WARMUP_S:
                contexts_first = memory_contexts(home, client_owners(groups))
            if replayer is None and time.monotonic() - t0 >= seconds / 2:
                replayer = threading.Thread(target=run_replay, args=(time.monotonic() - t0,),
                                            daemon=True)
                replayer.start()
            time.sleep(SAMPLE_EVERY_S)
        contexts_last = memory_contexts(home, client_owners(processes(up_proc, home)))
        posts.wait(120)
        reads.wait(120)
        if replayer is not None:
            replayer.join(REPLAY_TIMEOUT_S + 60)
        stop.set()
        checker.join(120)
        watcher.join(60)
        invisible = checker.invisible()
        post_summary = wrk_summary(work / "wrk-post.log")
        get_summary = wrk_summary(work / "wrk-get.log")
        first = next((s for s in samples if s["t_s"] >= WARMUP_S), samples[0])
        last = samples[-1]
        rss = {name: {"first_mib": first[name], "last_mib": last.get(name),
                      "ratio": round(last.get(name, 0) / first[name], 3) if first[name] else None}
               for name in first
               if name not in ("t_s", "postgres backends", "postgres processes")}
        # PostgreSQL's processes share its buffer pool (shared_buffers: a quarter of the
        # memory, 128 MiB to 1 GiB): it is a cache that becomes resident page by page as
        # the tables grow (and as the replay
        # writes a second copy of the read model), up to its fixed size, and summed RSS
        # counts each of its pages once per process that touched it. A leak shows in the
        # processes' own heap: PostgreSQL's flatness is judged on its summed Pss_Anon;
        # its RSS and its buffer pool's residency (Pss_Shmem) are reported beside.
        judged = {name: v for name, v in rss.items()
                  if not name.startswith("postgres") or name.endswith("Pss_Anon")}
        socket_errors = sum(s[k] for s in (post_summary, get_summary)
                            for k in ("connect", "read", "write", "timeout"))
        errors = {
            "post_non_2xx": post_summary["status_errors"],
            "get_non_2xx": get_summary["status_errors"],
            "socket_errors_and_timeouts": socket_errors,
            "checker": len(checker.errors),
            "watch": len(watcher.errors) + int(watcher.events == 0),
            "replay_failed": int(replay.get("exit_code", 1) != 0),
            # failures inside up that no client sees: access records lost, tracebacks
            "up_log_not_acknowledged": up_log.read_text().count("not acknowledged"),
            "up_log_tracebacks": up_log.read_text().count("Traceback"),
        }
        result = {
            "seconds": seconds,
            "watch": {"subject": WATCHED, "belief_events": watcher.events,
                      "heartbeats": watcher.heartbeats, "errors": watcher.errors[:20]},
            "wrk_post": post_summary,
            "wrk_get": get_summary,
            "checker": {"acknowledged": len(checker.acked), "invisible": invisible,
                        "errors": checker.errors[:20]},
            "replay": replay,
            "rss": rss,
            "rss_limit_ratio": RSS_LIMIT,
            "postgres_by_client": {"first": by_client(first), "last": by_client(last)},
            "postgres_memory_contexts": {"first": contexts_first, "last": contexts_last},
            "postgres_backends": [(s["t_s"], s["postgres backends"]) for s in samples],
            "rss_samples": samples,
            "errors": errors,
            "errors_total": sum(errors.values()),
            "rss_judged": sorted(judged),
            "ok": (all(v["ratio"] is not None and v["ratio"] <= RSS_LIMIT
                       for v in judged.values())
                   and sum(errors.values()) == 0 and not invisible),
        }
    finally:
        for load in (posts, reads):
            if load is not None and load.poll() is None:
                load.terminate()
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(120)
        except subprocess.TimeoutExpired:
            up.kill()
        result["up_exit_code"] = up.returncode
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = args.out or RESULTS / f"soak-{started.date().isoformat()}.json"
    path.write_text(json.dumps({"benchmark": "soak", "started": started.isoformat(
        timespec="seconds"), "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(), **result}, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rss_samples"}, indent=2))
    print(f"results: {path}")
    return 0 if result.get("ok") else 1


_CONTEXT = re.compile(r"\[(\d+)\].*?(?:level: \d+; ([^:]+): (\d+) total"
                      r"|(\d+) more child contexts containing (\d+) total"
                      r"|Grand total: (\d+) bytes)")


def memory_contexts(home: Path, owners: dict[int, str]) -> dict[str, dict]:
    """Every client backend's memory contexts, by PostgreSQL itself: each is asked to
    write them to the server log (``pg_log_backend_memory_contexts(pid)``, superuser),
    which is then read back. Per backend: its client, the grand total and the biggest
    contexts summed by name (e.g. ``CacheMemoryContext``: the relation and catalog
    caches; ``CachedPlan``/``CachedPlanSource``: prepared statements), KiB."""
    import psycopg

    data = home / "postgres"
    port = int((data / "postmaster.pid").read_text().splitlines()[3])
    log_path = data / "postgres.log"
    start = log_path.stat().st_size
    with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres",
                         autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid, client_port, pg_log_backend_memory_contexts(pid) FROM "
            "pg_stat_activity WHERE backend_type = 'client backend' "
            "AND pid <> pg_backend_pid()").fetchall()
    time.sleep(2.0)  # each backend logs at its next interrupt check
    with open(log_path, "rb") as f:
        f.seek(start)
        text = f.read().decode(errors="replace")
    out: dict[str, dict] = {str(pid): {"client": owners.get(port_ or -1, "?"),
                                       "total_kib": None, "contexts_kib": {}}
                            for pid, port_, _ in rows}
    for m in _CONTEXT.finditer(text):
        entry = out.get(m.group(1))
        if entry is None:
            continue
        if m.group(6):
            entry["total_kib"] = round(int(m.group(6)) / 1024)
            continue
        name = m.group(2) or "(more child contexts)"
        total = int(m.group(3) or m.group(5))
        entry["contexts_kib"][name] = entry["contexts_kib"].get(name, 0) + total
    for entry in out.values():
        top = sorted(entry["contexts_kib"].items(), key=lambda kv: -kv[1])[:8]
        entry["contexts_kib"] = {k: round(v / 1024) for k, v in top}
    return out


def by_client(sample: dict) -> dict[str, dict]:
    """A sample's PostgreSQL processes grouped by role and client: count, summed RSS and
    Pss_Anon (MiB) and the pids, e.g. ``{"backend of up": {"count": 3, ...}}``."""
    out: dict[str, dict] = {}
    for row in sample["postgres processes"]:
        client = re.sub(r" \d+$", "", row["client"])  # the API workers together
        key = f"backend of {client}" if row["role"] == "backend" else row["role"]
        group = out.setdefault(key, {"count": 0, "rss_mib": 0.0, "pss_anon_mib": 0.0,
                                     "pids": []})
        group["count"] += 1
        group["rss_mib"] = round(group["rss_mib"] + row["rss_mib"], 1)
        group["pss_anon_mib"] = round(group["pss_anon_mib"] + row["pss_anon_mib"], 1)
        group["pids"].append(row["pid"])
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    raise SystemExit(main())
