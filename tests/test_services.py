"""Tests of the embedded default services, with real processes (no mocks)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import psycopg
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic

from beliefstore.embedded import EmbeddedKafka, EmbeddedPostgres, ServiceStartError, free_port

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers


def create_topic(bootstrap: str, name: str, partitions: int) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    try:
        admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        admin.close()


def produce(bootstrap: str, topic: str, messages: list[tuple[int, bytes]]) -> list[int]:
    """Send (partition, value) pairs with acks=all + idempotence; return their offsets."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    try:
        futures = [producer.send(topic, value, partition=p) for p, value in messages]
        producer.flush(10)
        return [f.get(10).offset for f in futures]
    finally:
        producer.close()


def consume_all(
    bootstrap: str, topic: str, partitions: list[int], expected: int, timeout: float = 15.0
) -> list[tuple[int, int, bytes]]:
    """Read (partition, offset, value) from offset 0 until ``expected`` records arrived."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        got: list[tuple[int, int, bytes]] = []
        deadline = time.monotonic() + timeout
        while len(got) < expected and time.monotonic() < deadline:
            for tp, records in consumer.poll(timeout_ms=500).items():
                got += [(tp.partition, r.offset, r.value) for r in records]
        return sorted(got)
    finally:
        consumer.close()


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    """Wait until none of ``pids`` is a live process; return those still alive."""
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [
            p for p in alive if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
        ]
        time.sleep(0.05)
    return alive


def run_owner(script: str) -> subprocess.Popen[str]:
    """Run ``script`` in a child Python that imports beliefstore from this checkout."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


@pytest.fixture
def memory_kafka() -> Iterator[EmbeddedKafka]:
    kafka = EmbeddedKafka(None)
    kafka.start()
    try:
        yield kafka
    finally:
        kafka.stop()


# --------------------------------------------------------------------------- PostgreSQL


def test_postgres_restart_keeps_data(tmp_path: Path) -> None:
    data = tmp_path / "pg"
    pg = EmbeddedPostgres(data, fast=True)
    t0 = time.monotonic()
    pg.start()
    try:
        print(f"postgres fresh start (initdb + start): {time.monotonic() - t0:.2f} s")
        assert pg.url == f"postgresql+psycopg://postgres@127.0.0.1:{pg.port}/postgres"
        with psycopg.connect(host="127.0.0.1", port=pg.port, user="postgres") as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            assert conn.execute("SHOW fsync").fetchone() == ("off",)
            conn.execute("CREATE TABLE kept (id int PRIMARY KEY, note text)")
            conn.execute("INSERT INTO kept VALUES (1, 'survives a restart')")
        assert pg.socket_dir == pg.data_dir
        assert (data / f".s.PGSQL.{pg.port}").is_socket()
    finally:
        pg.stop()
    assert not pg.running
    pg.stop()  # idempotent

    with EmbeddedPostgres(data, fast=True) as again:
        with psycopg.connect(again.conninfo) as conn:
            rows = conn.execute("SELECT id, note FROM kept").fetchall()
    assert rows == [(1, "survives a restart")]


def test_postgres_default_is_durable_and_data_dir_is_exclusive(tmp_path: Path) -> None:
    with EmbeddedPostgres(tmp_path / "pg") as pg:
        with psycopg.connect(pg.conninfo) as conn:
            assert conn.execute("SHOW fsync").fetchone() == ("on",)
            assert conn.execute("SHOW max_connections").fetchone() == ("100",)
        with pytest.raises(ServiceStartError, match="in use by another running instance"):
            EmbeddedPostgres(tmp_path / "pg").start()
        assert pg.running  # the failed second start did not touch the first server


def test_postgres_orphan_of_a_dead_owner_is_replaced(tmp_path: Path) -> None:
    data = tmp_path / "pg"
    owner = run_owner(
        f"""
        import os, psycopg
        from pathlib import Path
        from beliefstore.embedded import EmbeddedPostgres
        pg = EmbeddedPostgres(Path({str(data)!r}), fast=True).start()
        with psycopg.connect(pg.conninfo) as conn:
            conn.execute("CREATE TABLE t (x int)")
            conn.execute("INSERT INTO t VALUES (42)")
        print(pg.pid, flush=True)
        os._exit(0)  # dies without stop() or atexit: the server is orphaned
        """
    )
    out, _ = owner.communicate(timeout=30)
    assert owner.returncode == 0
    orphan = int(out.strip())
    assert psutil.pid_exists(orphan)

    with EmbeddedPostgres(data, fast=True) as pg:
        assert wait_gone([orphan]) == []
        assert pg.pid != orphan
        with psycopg.connect(pg.conninfo) as conn:
            assert conn.execute("SELECT x FROM t").fetchall() == [(42,)]


# --------------------------------------------------------------------------- Kafka


def test_kafka_memory_roundtrip(memory_kafka: EmbeddedKafka) -> None:
    bootstrap = memory_kafka.bootstrap_servers
    assert bootstrap == f"127.0.0.1:{memory_kafka.port}"
    create_topic(bootstrap, "roundtrip", partitions=2)
    sent = [(0, b"a0"), (1, b"b0"), (0, b"a1"), (1, b"b1")]
    assert produce(bootstrap, "roundtrip", sent) == [0, 0, 1, 1]
    assert consume_all(bootstrap, "roundtrip", [0, 1], expected=4) == [
        (0, 0, b"a0"),
        (0, 1, b"a1"),
        (1, 0, b"b0"),
        (1, 1, b"b1"),
    ]


def test_kafka_durable_log_survives_restart(tmp_path: Path) -> None:
    data = tmp_path / "kafka"
    t0 = time.monotonic()
    with EmbeddedKafka(data) as kafka:
        print(f"durable kafka first start: {time.monotonic() - t0:.2f} s")
        first_port = kafka.port
        create_topic(kafka.bootstrap_servers, "events", partitions=1)
        assert produce(kafka.bootstrap_servers, "events", [(0, b"e0"), (0, b"e1"), (0, b"e2")]) == [
            0,
            1,
            2,
        ]
    assert not kafka.running
    assert (data / EmbeddedKafka.BUCKET).is_dir()

    t0 = time.monotonic()
    with EmbeddedKafka(data) as kafka:
        print(f"durable kafka restart: {time.monotonic() - t0:.2f} s")
        print(f"ports: {first_port} then {kafka.port}")
        bootstrap = kafka.bootstrap_servers
        assert consume_all(bootstrap, "events", [0], expected=3) == [
            (0, 0, b"e0"),
            (0, 1, b"e1"),
            (0, 2, b"e2"),
        ]
        # The high watermark survived too: new records do not reuse offsets.
        assert produce(bootstrap, "events", [(0, b"e3")]) == [3]


def test_kafka_start_error_names_the_log(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))  # bound, not listening: the broker cannot bind it
        port = taken.getsockname()[1]
        kafka = EmbeddedKafka(None, port=port, log_path=tmp_path / "broker.log")
        with pytest.raises(ServiceStartError) as raised:
            kafka.start()
    message = str(raised.value)
    assert "Kafka broker (tansu)" in message
    assert str(tmp_path / "broker.log") in message
    assert "Address in use" in message
    assert f"port {port} is taken" in message
    assert not kafka.running


def test_kafka_processes_die_with_their_owner(tmp_path: Path) -> None:
    owner = run_owner(
        f"""
        import time
        from pathlib import Path
        from beliefstore.embedded import EmbeddedKafka
        EmbeddedKafka(Path({str(tmp_path / "kafka")!r})).start()
        print("ready", flush=True)
        time.sleep(60)
        """
    )
    try:
        assert owner.stdout is not None
        assert owner.stdout.readline().strip() == "ready"
        children = [c.pid for c in psutil.Process(owner.pid).children(recursive=True)]
        assert len(children) == 2  # tansu + localbucket
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    assert wait_gone(children) == []
    # The directory lock died with the owner: the data dir is usable again.
    with EmbeddedKafka(tmp_path / "kafka") as kafka:
        assert kafka.running


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_s3_store_runs_pinned_localbucket_with_nodelay(tmp_path: Path) -> None:
    """The durable log's S3 store is localbucket at the pinned version, and our entry point
    switches Nagle's algorithm off on its connections (without it every S3 request of the
    broker waits ~40 ms for a delayed ACK). Fails if localbucket changes version or stops
    being a StreamRequestHandler that honours ``disable_nagle_algorithm``."""
    import socketserver
    import threading
    import urllib.request
    from http.server import ThreadingHTTPServer

    import localbucket

    from beliefstore.embedded import s3server

    assert localbucket.__version__ == s3server.LOCALBUCKET_VERSION
    handler = s3server.configure()
    assert issubclass(handler, localbucket.S3Handler)
    assert issubclass(handler, socketserver.StreamRequestHandler)
    seen: list[int] = []

    class Probe(handler):  # type: ignore[misc, valid-type]
        def setup(self) -> None:
            super().setup()
            seen.append(self.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    (tmp_path / "bucket").mkdir()
    Probe.data_root = tmp_path
    server = ThreadingHTTPServer(("127.0.0.1", 0), Probe)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/bucket"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(urllib.request.Request(url, method="HEAD"), timeout=5) as response:
            assert response.status == 200
    finally:
        server.shutdown()
        server.server_close()
    assert seen and all(seen), "localbucket's connections must have TCP_NODELAY set"


def test_kafka_durable_store_process_is_the_tuned_entry_point(tmp_path: Path) -> None:
    with EmbeddedKafka(tmp_path / "kafka") as kafka:
        children = psutil.Process().children(recursive=True)
        commands = [" ".join(c.cmdline()) for c in children]
        assert any("beliefstore.embedded.s3server" in c for c in commands), commands
        create_topic(kafka.bootstrap_servers, "events", partitions=1)
        assert produce(kafka.bootstrap_servers, "events", [(0, b"a"), (0, b"b")]) == [0, 1]


def _serve_s3(root: Path):  # type: ignore[no-untyped-def]
    import threading
    from http.server import ThreadingHTTPServer

    from beliefstore.embedded import s3server

    handler = s3server.configure()
    handler.data_root = root
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_s3_store_honours_if_match_on_put(tmp_path: Path) -> None:
    """Tansu's read-modify-write of meta.json / watermark.json relies on ``If-Match``
    (412 on a stale ETag); localbucket alone ignores it, so concurrent updates were lost."""
    import urllib.error
    import urllib.request

    (tmp_path / "bkt").mkdir()
    server = _serve_s3(tmp_path)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    url = f"http://127.0.0.1:{server.server_address[1]}/bkt/dir/meta.json"

    def put(body: bytes, if_match: str | None = None) -> tuple[int, str]:
        req = urllib.request.Request(url, data=body, method="PUT")
        if if_match is not None:
            req.add_header("If-Match", if_match)
        try:
            with opener.open(req, timeout=5) as r:
                return r.status, r.headers.get("ETag", "")
        except urllib.error.HTTPError as e:
            return e.code, ""

    try:
        status, first = put(b"v1")
        assert status == 200 and first
        status, second = put(b"v2", if_match=first)
        assert status == 200 and second != first
        # a writer still holding the first ETag loses: 412, and the object is unchanged
        assert put(b"stale", if_match=first)[0] == 412
        assert (tmp_path / "bkt" / "dir" / "meta.json").read_bytes() == b"v2"
        # If-Match on a missing object fails too (S3 semantics)
        url = url.replace("meta.json", "missing.json")
        assert put(b"x", if_match=second)[0] == 412
        assert not (tmp_path / "bkt" / "dir" / "missing.json").exists()
    finally:
        server.shutdown()
        server.server_close()


def test_s3_store_etags_match_the_bytes_under_concurrent_read_modify_writes(
        tmp_path: Path) -> None:
    """Tansu allocates offsets by a read-modify-write of ``watermark.json`` (GET, then PUT
    with ``If-Match`` the ETag it got). localbucket 1.2.1 opens the file and hashes it by
    path afterwards, and caches ETags under (device, inode, size, mtime), which repeat on
    ext4 (coarse mtimes, reused inodes): a GET during a rewrite answered old bytes with
    the new ETag, the If-Match update on those bytes passed, and two produces got the same
    offsets (acknowledged events then missing from the read model). Here 4 writers
    increment a counter the same way while 2 readers GET it: every increment must count,
    and every GET's ETag must be the MD5 of the bytes it came with. (Failed with the GET
    unguarded: counters short by tens, GETs with another version's ETag.)"""
    import hashlib
    import http.client
    import json
    import threading

    (tmp_path / "bkt").mkdir()
    server = _serve_s3(tmp_path)
    port = server.server_address[1]
    path = "/bkt/clusters/c/topics/t/partitions/0000000000/watermark.json"
    first = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    first.request("PUT", path, body=json.dumps({"high": 0}).encode())
    assert first.getresponse().read() is not None
    first.close()
    per_writer, mismatched, errors = 150, [], []
    stop = threading.Event()

    def get(conn: http.client.HTTPConnection) -> tuple[str, bytes]:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        etag = (response.getheader("ETag") or "").strip('"')
        if etag != hashlib.md5(body).hexdigest():
            mismatched.append(etag)
        return etag, body

    def writer() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            done = 0
            while done < per_writer:
                etag, body = get(conn)
                high = json.loads(body)["high"]
                conn.request("PUT", path, body=json.dumps({"high": high + 1}).encode(),
                             headers={"If-Match": f'"{etag}"'})
                response = conn.getresponse()
                response.read()
                if response.status == 200:
                    done += 1
                elif response.status != 412:
                    errors.append(response.status)
                    return
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))
        finally:
            conn.close()

    def reader() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            while not stop.is_set():
                get(conn)
        finally:
            conn.close()

    writers = [threading.Thread(target=writer) for _ in range(4)]
    readers = [threading.Thread(target=reader) for _ in range(2)]
    try:
        for t in [*writers, *readers]:
            t.start()
        for t in writers:
            t.join(120)
        stop.set()
        for t in readers:
            t.join(30)
        stored = json.loads((tmp_path / "bkt" / path.removeprefix("/bkt/")).read_bytes())
    finally:
        server.shutdown()
        server.server_close()
    assert not errors, errors[:5]
    assert stored["high"] == 4 * per_writer, "a read-modify-write was lost"
    assert not mismatched, f"{len(mismatched)} GETs had an ETag of other bytes"


def test_s3_store_keeps_the_connection_after_a_failed_precondition(tmp_path: Path) -> None:
    """A 412 on ``If-Match`` reads the request's body and keeps the connection, so Tansu's
    retry (a GET and a PUT at once) does not open a new connection (and a new server
    thread) per conflict."""
    import http.client

    (tmp_path / "bkt").mkdir()
    server = _serve_s3(tmp_path)
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    try:
        conn.request("PUT", "/bkt/meta.json", body=b"v1")
        assert conn.getresponse().read() == b""
        sock = conn.sock
        conn.request("PUT", "/bkt/meta.json", body=b"stale" * 1000,
                     headers={"If-Match": '"0123456789abcdef0123456789abcdef"'})
        response = conn.getresponse()
        response.read()
        assert response.status == 412
        assert conn.sock is sock, "the 412 closed the connection"
        conn.request("GET", "/bkt/meta.json")
        assert conn.getresponse().read() == b"v1"
        assert conn.sock is sock
    finally:
        conn.close()
        server.shutdown()
        server.server_close()


def test_s3_store_answers_a_get_with_a_current_if_none_match_not_modified(
        tmp_path: Path) -> None:
    """Tansu reads meta.json (every produce and fetch) and watermark.json (every fetch)
    with ``If-None-Match``, the ETag it holds: an unchanged object is a ``304`` with its ETag and no body
    (S3's conditional GET; localbucket alone sends the whole object), on the same
    connection; a changed one, or another ETag, is the object as before."""
    import hashlib
    import http.client

    (tmp_path / "bkt").mkdir()
    server = _serve_s3(tmp_path)
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    first = b'{"high":1}'
    try:
        conn.request("PUT", "/bkt/watermark.json", body=first)
        response = conn.getresponse()
        response.read()
        etag = response.getheader("ETag")
        assert etag == f'"{hashlib.md5(first).hexdigest()}"'
        sock = conn.sock
        conn.request("GET", "/bkt/watermark.json", headers={"If-None-Match": etag})
        response = conn.getresponse()
        assert (response.status, response.read(), response.getheader("ETag")) == (304, b"", etag)
        assert conn.sock is sock, "the 304 closed the connection"
        conn.request("PUT", "/bkt/watermark.json", body=b'{"high":2}')
        response = conn.getresponse()
        response.read()
        for header in (etag, '"0123456789abcdef0123456789abcdef"'):  # stale, or another
            conn.request("GET", "/bkt/watermark.json", headers={"If-None-Match": header})
            response = conn.getresponse()
            assert (response.status, response.read()) == (200, b'{"high":2}')
        conn.request("GET", "/bkt/missing.json", headers={"If-None-Match": etag})
        response = conn.getresponse()
        response.read()
        assert response.status == 404
    finally:
        conn.close()
        server.shutdown()
        server.server_close()



def _raw(port: int, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request over a fresh connection: (status, headers but the per-request ones, body)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        kept = {k: v for k, v in response.getheaders() if k not in ("Date", "x-amz-request-id")}
        return response.status, kept, data
    finally:
        conn.close()


#: keys that exercise ordering by UTF-8 bytes, nesting, XML escaping and URL encoding
_LISTING_KEYS = [
    "a-b", "a0", "a/b.x", "a/b/c", "a/b/d.batch", "a/c", "a b/x", "a+b&c<d>.txt",
    "é/1", "é/2", "z%20y", "ü", "clusters/c1/topics/t/partitions/0/records/"
    "00000000000000000000.batch", "clusters/c1/topics/t/partitions/0/records/"
    "00000000000000000003.batch", "clusters/c1/topics/t/partitions/0/watermark.json",
    "clusters/c1/topics/t/partitions/1/records/00000000000000000000.batch",
    "clusters/c1/topics/u/partitions/0/records/00000000000000000000.batch",
]


def _listing_queries() -> list[str]:
    from urllib.parse import urlencode

    queries = []
    for prefix in ["", "a", "a/", "a/b/", "é", "clusters/c1/topics/t/partitions/0/records/",
                   "clusters/c1/topics/", "zzz"]:
        for delimiter in ["", "/", "-"]:
            for max_keys in [None, "0", "1", "2", "1000", "5000"]:
                for start_after in ["", "a/b", "clusters/c1/topics/t/", "é"]:
                    params = {"list-type": "2", "prefix": prefix, "delimiter": delimiter,
                              "start-after": start_after}
                    if max_keys is not None:
                        params["max-keys"] = max_keys
                    queries.append(urlencode({k: v for k, v in params.items() if v}))
    queries += [q + "&encoding-type=url" for q in queries[::7]]
    # malformed or unsupported: the index must answer exactly what localbucket answers
    queries += ["list-type=2&max-keys=abc", "list-type=2&max-keys=-1",
                "list-type=2&continuation-token=bm9wZQ==", "list-type=2&continuation-token=%25",
                "list-type=2&fetch-owner=true", "prefix=a&delimiter=/"]
    return queries


def _same_listings(tmp_path: Path, ours: int, theirs: int, bucket: str = "bkt") -> int:
    """Compare every listing query (following continuation tokens) on both servers;
    return how many requests were compared."""
    import re
    from urllib.parse import quote

    compared = 0
    for query in _listing_queries():
        path = f"/{bucket}?{query}"
        for _ in range(40):  # pages
            mine, reference = _raw(ours, "GET", path), _raw(theirs, "GET", path)
            assert mine == reference, (path, mine, reference)
            compared += 1
            token = re.search(rb"<NextContinuationToken>([^<]*)<", reference[2])
            if token is None:
                break
            path = f"/{bucket}?{query}&continuation-token={quote(token[1].decode())}"
    return compared


def test_s3_store_lists_from_its_index_exactly_as_localbucket(tmp_path: Path) -> None:
    """The S3 store answers ListObjectsV2 from an in-memory index instead of walking the
    whole bucket per request (Tansu lists a partition on every fetch). Its answers must be
    byte-for-byte localbucket's own over the same folder, for prefixes, delimiters,
    start-after, max-keys, continuation tokens, URL encoding and errors, and stay so after
    writes, overwrites, copies and deletes made through it. Fails if localbucket 1.2.1's
    listing changes."""
    import threading
    from http.server import ThreadingHTTPServer

    import localbucket

    from beliefstore.embedded import s3server

    assert localbucket.__version__ == s3server.LOCALBUCKET_VERSION
    bucket = tmp_path / "bkt"
    for key in _LISTING_KEYS:
        path = bucket.joinpath(*key.split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(key.encode() * 3)
    (bucket / "a" / f"{localbucket.TEMP_PREFIX}half-written").write_bytes(b"x")
    (bucket / "empty" / "dir").mkdir(parents=True)

    class Reference(localbucket.S3Handler):  # type: ignore[misc, name-defined]
        data_root = tmp_path

    servers = [_serve_s3(tmp_path), ThreadingHTTPServer(("127.0.0.1", 0), Reference)]
    threading.Thread(target=servers[1].serve_forever, daemon=True).start()
    ours, theirs = (int(s.server_address[1]) for s in servers)
    try:
        assert _same_listings(tmp_path, ours, theirs) > 900
        # the answers come from the index, not the folder: a file written behind the
        # server's back (which the embedded broker never does) is not listed by ours
        (bucket / "a" / "behind").write_bytes(b"x")
        assert b"<Key>a/behind</Key>" in _raw(theirs, "GET", "/bkt?list-type=2")[2]
        assert b"<Key>a/behind</Key>" not in _raw(ours, "GET", "/bkt?list-type=2")[2]
        (bucket / "a" / "behind").unlink()
        # the index must learn every write made through our server, before its answer
        assert _raw(ours, "PUT", "/bkt/a/b/new.batch", b"new")[0] == 200
        assert _raw(ours, "PUT", "/bkt/a0", b"longer than before")[0] == 200
        assert _raw(ours, "PUT", "/bkt/%C3%A9/copy", b"",
                    {"x-amz-copy-source": "/bkt/a-b"})[0] == 200
        assert _raw(ours, "DELETE", "/bkt/a/c")[0] == 204
        assert _raw(ours, "DELETE", "/bkt/clusters/c1/topics/u/partitions/0/records/"
                    "00000000000000000000.batch")[0] == 204
        status, _, listing = _raw(ours, "GET", "/bkt?list-type=2&prefix=a/")
        assert status == 200 and b"<Key>a/b/new.batch</Key>" in listing
        assert b"<Key>a/c</Key>" not in listing
        assert _same_listings(tmp_path, ours, theirs) > 900
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()



def test_s3_store_lists_no_record_batch_past_one_still_being_written(tmp_path: Path) -> None:
    """Tansu 0.6.0 allocates a batch's offsets (watermark.json ``high``) before it writes
    the batch object; with concurrent producers a later batch can land first, and a fetch
    that lists it skips the earlier one for good. The S3 store leaves the batches after
    an allocated, unwritten offset out of the partition's listing until it is written."""
    import json as _json

    (tmp_path / "bkt").mkdir()
    server = _serve_s3(tmp_path)
    port = int(server.server_address[1])
    part = "clusters/c/topics/t/partitions/0000000000"
    records = f"/bkt?list-type=2&prefix={part}/records/"

    def watermark(high: int) -> None:
        body = _json.dumps({"low": None, "high": high, "timestamps": None}).encode()
        assert _raw(port, "PUT", f"/bkt/{part}/watermark.json", body)[0] == 200

    def batch(offset: int) -> None:
        assert _raw(port, "PUT", f"/bkt/{part}/records/{offset:020d}.batch", b"b",
                    {"If-None-Match": "*"})[0] == 200

    def listed() -> list[int]:
        import re

        body = _raw(port, "GET", records)[2].decode()
        return [int(o) for o in re.findall(r"records/([0-9]{20})\.batch</Key>", body)]

    try:
        watermark(3)    # producer A: offsets 0..2
        batch(0)
        assert listed() == [0]
        watermark(5)    # producer B: offsets 3..4
        watermark(9)    # producer C: offsets 5..8
        batch(5)        # C's batch lands before B's
        assert listed() == [0], "a batch after an unwritten allocation must not be listed"
        assert (tmp_path / "bkt" / part / "records" / f"{5:020d}.batch").exists()
        batch(3)        # B's batch: the gap is filled
        assert listed() == [0, 3, 5]
        # other prefixes are unaffected while an allocation is pending
        watermark(10)
        assert _raw(port, "PUT", f"/bkt/{part}/records/{10:020d}.batch", b"b")[0] == 200
        assert listed() == [0, 3, 5]
        status, _, body = _raw(port, "GET", "/bkt?list-type=2&prefix=clusters/c/topics/t/")
        assert status == 200 and b"watermark.json" in body
        batch(9)
        assert listed() == [0, 3, 5, 9, 10]
    finally:
        server.shutdown()
        server.server_close()


def test_tailing_consumer_misses_nothing_with_concurrent_producers(tmp_path: Path) -> None:
    """Four idempotent producers on one partition of the durable broker (``up`` runs one
    producer per API process) while a consumer tails it: every acknowledged record the
    log holds afterwards was also seen by the tailing consumer (before the S3 store's
    barrier, a batch written out of order was skipped: 5 of 3,620 records in 20 s)."""
    import threading

    from kafka.errors import KafkaError

    with EmbeddedKafka(tmp_path / "kafka") as kafka:
        bootstrap = kafka.bootstrap_servers
        create_topic(bootstrap, "gap", partitions=1)
        stop = time.monotonic() + 8
        acked: dict[bytes, int] = {}  # value -> acknowledged offset
        unconfirmed: set[bytes] = set()  # acknowledged without an offset: see below
        seen: dict[int, bytes] = {}  # offset -> value, as the tailing consumer read them
        done = threading.Event()

        def produce_loop(i: int) -> None:
            producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all",
                                     enable_idempotence=True, linger_ms=2,
                                     max_in_flight_requests_per_connection=1)
            try:
                n = 0
                while time.monotonic() < stop:
                    values = [f"{i}-{n}-{j}".encode() for j in range(5)]
                    futures = [producer.send("gap", v, partition=0) for v in values]
                    for value, future in zip(values, futures, strict=True):
                        try:
                            offset = future.get(30).offset
                        except KafkaError:
                            pass  # Tansu's occasional OutOfOrderSequenceNumber: not acked
                        else:
                            # offset -1: DuplicateSequenceNumber, which kafka-python counts
                            # as acknowledged; Tansu 0.6.0 can answer so for a batch it never
                            # wrote, so BeliefProducer sends such records again (tested in
                            # test_pipeline.py); here they are not counted as in the log
                            if offset >= 0:
                                acked[value] = offset
                            else:
                                unconfirmed.add(value)
                    n += 1
            finally:
                producer.close(timeout=5)

        def tail() -> None:
            consumer = KafkaConsumer(bootstrap_servers=bootstrap, fetch_max_wait_ms=100)
            tp = TopicPartition("gap", 0)
            consumer.assign([tp])
            consumer.seek(tp, 0)
            try:
                while not done.is_set():
                    for records in consumer.poll(200).values():
                        seen.update((r.offset, r.value) for r in records)
            finally:
                consumer.close()

        tailer = threading.Thread(target=tail)
        tailer.start()
        producers = [threading.Thread(target=produce_loop, args=(i,)) for i in range(4)]
        for t in producers:
            t.start()
        for t in producers:
            t.join()
        deadline = time.monotonic() + 15
        def missing() -> list[bytes]:
            read = set(seen.values())
            return [v for v in list(acked) if v not in read]

        while missing() and time.monotonic() < deadline:
            time.sleep(0.2)
        done.set()
        tailer.join()
        assert len(acked) > 100
        # the barrier relies on Tansu 0.6.0's layout of a partition's objects
        from beliefstore.embedded import s3server

        keys = [f.relative_to(tmp_path / "kafka").as_posix()
                for f in (tmp_path / "kafka").rglob("*") if f.is_file()]
        assert any(s3server._WATERMARK_KEY.fullmatch(k) and "/gap/" in k for k in keys), keys
        assert sum(bool(s3server._BATCH_KEY.fullmatch(k)) for k in keys) > 20, keys[:20]
        missed = sorted((acked[v], v) for v in missing())
        assert not missed, f"the tailing consumer skipped acknowledged records {missed[:10]}"
        # and each acknowledged offset holds the record it was acknowledged for
        wrong = [(o, v) for v, o in acked.items() if seen.get(o) != v]
        assert not wrong, f"acknowledged offsets holding other records: {wrong[:10]}"


def test_durable_broker_concurrent_idempotent_producers_lose_nothing(tmp_path: Path) -> None:
    """Several idempotent producers and threads writing to several partitions of the durable
    broker at once: every acknowledged record is in the log, at its own offset (lost
    read-modify-write updates used to give OutOfOrderSequenceNumber or shared offsets)."""
    import threading

    with EmbeddedKafka(tmp_path / "kafka") as kafka:
        bootstrap = kafka.bootstrap_servers
        create_topic(bootstrap, "events", partitions=4)
        producers = [KafkaProducer(bootstrap_servers=bootstrap, acks="all",
                                   enable_idempotence=True, linger_ms=2,
                                   max_in_flight_requests_per_connection=1) for _ in range(2)]
        acked: list[tuple[int, int]] = []
        errors: list[str] = []
        lock = threading.Lock()

        def agent(n: int) -> None:
            producer = producers[n % 2]
            for i in range(15):
                try:
                    md = producer.send("events", key=f"k{n}-{i}".encode(),
                                       value=f"{n}-{i}".encode()).get(30)
                except Exception as exc:  # noqa: BLE001 - recorded and asserted below
                    errors.append(repr(exc))
                    return
                with lock:
                    acked.append((md.partition, md.offset))

        threads = [threading.Thread(target=agent, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for p in producers:
            p.close()
        # Tansu 0.6.0 still answers OutOfOrderSequenceNumber now and then under this load
        # (and cannot bump a non-transactional producer's epoch), so a producer may fail;
        # what must hold is that nothing it acknowledged is lost or shares an offset.
        assert all("OutOfOrderSequence" in e or "InitProducerId" in e for e in errors), errors
        assert len(acked) >= 60 and len(set(acked)) == len(acked)
        expected = 120 if not errors else len(acked)  # unacknowledged sends may be stored
        records = consume_all(bootstrap, "events", [0, 1, 2, 3], expected=expected,
                              timeout=15 if not errors else 5)
        stored = [(p, o) for p, o, _ in records]
        assert len(set(stored)) == len(stored)
        assert set(acked) <= set(stored)
        if not errors:
            assert sorted(stored) == sorted(acked)


def test_durable_broker_separate_producers_on_one_partition_exactly_once(tmp_path: Path) -> None:
    """Four separate idempotent producers (``acks=all``, as the API processes have) on one
    partition of the durable broker: every acknowledged record is read back exactly once
    at its acknowledged offset, the offsets increase strictly (a produce that failed after
    its offsets were allocated leaves a gap), and the partition's stored
    ``watermark.json`` is past the last (its conditional writes lost no update: two
    batches never share an offset and the log end never goes back on disk). A producer
    that Tansu 0.6.0 answers OutOfOrderSequenceNumber is replaced by a new one, as an API
    process would; what it did not acknowledge may or may not be stored, but once at most."""
    import json
    import threading

    from kafka.errors import KafkaError

    with EmbeddedKafka(tmp_path / "kafka") as kafka:
        bootstrap = kafka.bootstrap_servers
        create_topic(bootstrap, "one", partitions=1)
        stop = time.monotonic() + 6
        acked: dict[str, int] = {}
        failed: set[str] = set()
        unconfirmed: set[str] = set()

        def produce_loop(i: int) -> None:
            n = 0
            while time.monotonic() < stop:
                producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all",
                                         enable_idempotence=True, linger_ms=2,
                                         max_in_flight_requests_per_connection=1)
                try:
                    while time.monotonic() < stop:
                        values = [f"{i}-{n}-{j}" for j in range(3)]
                        futures = [producer.send("one", v.encode(), partition=0) for v in values]
                        n += 1
                        broken = False
                        for value, future in zip(values, futures, strict=True):
                            try:
                                offset = future.get(30).offset
                            except KafkaError:
                                failed.add(value)
                                broken = True
                                continue
                            # offset -1 (DuplicateSequenceNumber): maybe written, maybe not
                            # (see the tailing test); BeliefProducer sends such records again
                            if offset >= 0:
                                acked[value] = offset
                            else:
                                unconfirmed.add(value)
                        if broken:
                            break
                finally:
                    producer.close(timeout=5)

        threads = [threading.Thread(target=produce_loop, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(acked) > 100
        consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        tp = TopicPartition("one", 0)
        consumer.assign([tp])
        consumer.seek(tp, 0)
        got: list[tuple[int, str]] = []
        deadline = time.monotonic() + 20
        try:
            while time.monotonic() < deadline:
                polled = consumer.poll(timeout_ms=500)
                for records in polled.values():
                    got += [(r.offset, r.value.decode()) for r in records]
                end = consumer.highwater(tp)
                if not polled and end is not None and got and got[-1][0] + 1 >= end \
                        and set(acked) <= {v for _, v in got}:
                    break
        finally:
            consumer.close()
        offsets = [o for o, _ in got]
        # strictly increasing; not always contiguous: a produce that failed after Tansu
        # allocated its offsets (and recorded the producer's sequence) leaves them empty,
        # and its retry is answered as a duplicate (offset -1, counted as unconfirmed)
        assert offsets == sorted(set(offsets)), "an offset is read twice or out of order"
        values = [v for _, v in got]
        assert len(set(values)) == len(values), "a record is stored twice"
        at = dict((v, o) for o, v in got)
        assert {v: at.get(v) for v in acked} == acked, "an acknowledged record is missing"
        assert set(values) <= set(acked) | failed | unconfirmed
        watermarks = list((tmp_path / "kafka").rglob("topics/one/partitions/*/watermark.json"))
        assert len(watermarks) == 1
        assert json.loads(watermarks[0].read_bytes())["high"] >= got[-1][0] + 1


def _start_up(home: Path, port: int) -> tuple[subprocess.Popen[str], list[str]]:
    import threading

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BELIEFSTORE_", "KAFKA_", "DATABASE_URL"))}
    env.update(BELIEFSTORE_HOME=str(home / ".beliefstore"), BELIEFSTORE_API_PORT=str(port),
               BELIEFSTORE_RATE_LIMIT="0", COLUMNS="250", NO_COLOR="1")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("beliefstore")), "up"],
                            env=env, cwd=home, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    lines: list[str] = []

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    threading.Thread(target=reader, daemon=True).start()
    deadline = time.monotonic() + 120
    try:
        while not any("Press Ctrl-C" in line for line in lines):
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)
    except BaseException:
        _stop_up(proc)  # a start that failed or timed out leaves nothing running
        raise
    return proc, lines


def _stop_up(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_up_keeps_the_event_log_across_a_restart(tmp_path: Path) -> None:
    """`up` on the embedded default (durable Tansu on localbucket, embedded PostgreSQL):
    events accepted before a restart are still in the log and the read model after it,
    and the log goes on at the next offsets (not reset)."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc, lines = _start_up(tmp_path, port)
    try:
        [token] = [w.split("=", 1)[1] for w in "".join(lines).split()
                   if w.startswith("BELIEFSTORE_API_KEY=")]
        auth = {"Authorization": f"Bearer {token}"}
        items = [{"subject_id": f"durable-{i}", "context": "support", "attribute": "mood",
                  "value": "calm", "confidence": 0.9, "source": "admin"} for i in range(3)]
        r = httpx.post(f"{url}/v1/observations:batch", json={"observations": items},
                       headers=auth, timeout=60)
        assert r.status_code == 200 and r.json()["accepted"] == 3, r.text
        before = [x["receipt"] for x in r.json()["results"]]
    finally:
        _stop_up(proc)
    assert proc.returncode in (0, 128 + signal.SIGINT, -signal.SIGINT), "".join(lines)

    proc, lines = _start_up(tmp_path, port)
    try:
        assert "first start" not in "".join(lines)  # same home: the key store survived
        deadline = time.monotonic() + 60
        for i in range(3):
            while True:
                r = httpx.get(f"{url}/v1/subjects/durable-{i}/self-model", headers=auth,
                              timeout=10)
                if r.status_code == 200 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert r.status_code == 200, r.text
            assert r.json()["contexts"]["support"][0]["value"] == "calm"
        after = httpx.post(f"{url}/v1/observations", json={**items[0], "value": "angry"},
                           headers=auth, timeout=60)
        assert after.status_code == 201, after.text
        receipt = after.json()
        same = [b["offset"] for b in before if b["partition"] == receipt["partition"]]
        assert same and receipt["offset"] > max(same)
        state = (tmp_path / ".beliefstore" / "services.json").read_text()
        import json

        bootstrap = json.loads(state)["kafka_bootstrap_servers"]
        stored = consume_all(bootstrap, receipt["topic"], [receipt["partition"]],
                             expected=receipt["offset"] + 1)
        offsets = {o for _, o, _ in stored}
        assert {b["offset"] for b in before if b["partition"] == receipt["partition"]} <= offsets
    finally:
        _stop_up(proc)


def test_s3_store_bounds_its_etag_and_listing_caches(tmp_path: Path) -> None:
    """The S3 store keeps at most ETAG_CACHE_SIZE ETags (localbucket 1.2.1 keeps every
    file's it ever hashed, in ``localbucket._etag_cache``) and FRAGMENT_CACHE_SIZE listing
    fragments per bucket, so its memory does not grow with every record batch the log
    gains; the objects past the bounds still answer with their right ETag and are listed
    byte-for-byte as localbucket lists them. Fails if localbucket stops keeping its ETags
    in ``_etag_cache`` (another version) or the bounds stop holding."""
    import hashlib
    import re
    import threading
    from http.server import ThreadingHTTPServer
    from urllib.parse import quote

    import localbucket

    from beliefstore.embedded import s3server

    server = _serve_s3(tmp_path)  # configure() bounds localbucket's cache
    assert isinstance(localbucket._etag_cache, s3server.LRUCache)
    assert localbucket._etag_cache.maxsize == s3server.ETAG_CACHE_SIZE
    (tmp_path / "bkt").mkdir()
    port = int(server.server_address[1])
    count = s3server.ETAG_CACHE_SIZE + 300
    prefix = "clusters/c/topics/t/partitions/0000000000/records/"

    class Reference(localbucket.S3Handler):  # type: ignore[misc, name-defined]
        data_root = tmp_path

    reference = ThreadingHTTPServer(("127.0.0.1", 0), Reference)
    threading.Thread(target=reference.serve_forever, daemon=True).start()
    try:
        for offset in range(count):
            body = f"batch {offset}".encode()
            status, headers, _ = _raw(port, "PUT", f"/bkt/{prefix}{offset:020d}.batch", body)
            assert status == 200
        assert len(localbucket._etag_cache) <= s3server.ETAG_CACHE_SIZE
        # localbucket fills it (the test fails if 1.2.x stops using this cache)
        path = tmp_path / "bkt" / "lone"
        path.write_bytes(b"lone")
        assert localbucket.object_etag(path) == hashlib.md5(b"lone").hexdigest()
        assert str(path) in localbucket._etag_cache
        path.unlink()
        # listing all of them fills at most FRAGMENT_CACHE_SIZE fragments, and the pages
        # (evicted fragments recomputed) are still localbucket's own bytes
        listing = f"/bkt?list-type=2&prefix={prefix}&max-keys=1000"
        for _ in range(2):
            path_ = listing
            while True:
                mine = _raw(port, "GET", path_)
                theirs = _raw(int(reference.server_address[1]), "GET", path_)
                assert mine == theirs
                token = re.search(rb"<NextContinuationToken>([^<]*)<", theirs[2])
                if token is None:
                    break
                path_ = f"{listing}&continuation-token={quote(token[1].decode())}"
        index = s3server._index(tmp_path / "bkt")
        assert len(index._fragments) <= s3server.FRAGMENT_CACHE_SIZE
        first = f"/bkt/{prefix}{0:020d}.batch"
        status, headers, body = _raw(port, "GET", first)
        assert status == 200 and body == b"batch 0"
        assert hashlib.md5(b"batch 0").hexdigest() in str(headers)
    finally:
        for s in (server, reference):
            s.shutdown()
            s.server_close()


def test_s3_store_answers_full_pages_of_a_long_partition_from_its_page_cache(
        tmp_path: Path) -> None:
    """Tansu 0.6.0 lists a partition from its first record batch on every fetch. Past
    FRAGMENT_CACHE_SIZE batches the fragment cache was evicted by each listing and every
    fragment recomputed (a stat and an MD5 per batch, per fetch): the projector fell
    minutes behind. Full pages are now kept until a key in their range changes: a second
    listing computes no fragment, answers localbucket's bytes, and a page is not answered
    from the cache once it is stale (a write in its range, a deletion after it) or holds
    a batch behind an unwritten allocation."""
    import json as _json
    import re
    import threading
    from http.server import ThreadingHTTPServer
    from urllib.parse import quote

    import localbucket

    from beliefstore.embedded import s3server

    (tmp_path / "bkt").mkdir()
    server = _serve_s3(tmp_path)
    port = int(server.server_address[1])
    part = "clusters/c/topics/t/partitions/0000000000/"
    count = s3server.FRAGMENT_CACHE_SIZE + 1500

    class Reference(localbucket.S3Handler):  # type: ignore[misc, name-defined]
        data_root = tmp_path

    reference = ThreadingHTTPServer(("127.0.0.1", 0), Reference)
    threading.Thread(target=reference.serve_forever, daemon=True).start()
    index = s3server._index(tmp_path / "bkt")
    computed = 0
    fragment = index._fragment

    def counting(raw: bytes, key: str) -> str | None:
        nonlocal computed
        computed += 1
        return fragment(raw, key)

    index._fragment = counting  # type: ignore[method-assign]

    def listed() -> list[int]:
        """Every batch offset of the partition's listing, page by page (as Tansu lists),
        each page compared with localbucket's."""
        offsets: list[int] = []
        query = f"/bkt?list-type=2&prefix={part}records/"
        path = query
        while True:
            mine = _raw(port, "GET", path)
            offsets += [int(o) for o in re.findall(rb"records/([0-9]{20})\.batch</Key>",
                                                   mine[2])]
            token = re.search(rb"<NextContinuationToken>([^<]*)<", mine[2])
            if token is None:
                return offsets
            path = f"{query}&continuation-token={quote(token[1].decode())}"

    def same_as_localbucket() -> None:
        query = f"/bkt?list-type=2&prefix={part}records/"
        path = query
        while True:
            mine = _raw(port, "GET", path)
            assert mine == _raw(int(reference.server_address[1]), "GET", path)
            token = re.search(rb"<NextContinuationToken>([^<]*)<", mine[2])
            if token is None:
                return
            path = f"{query}&continuation-token={quote(token[1].decode())}"

    try:
        for offset in range(count):
            assert _raw(port, "PUT", f"/bkt/{part}records/{offset:020d}.batch",
                        f"batch {offset}".encode())[0] == 200
        assert listed() == list(range(count))
        first = computed
        assert first >= count
        assert listed() == list(range(count))
        assert computed - first <= 1000, "full pages must not recompute their fragments"
        same_as_localbucket()
        # a batch appended after the last page: listed (that page is extended), once
        before = computed
        assert _raw(port, "PUT", f"/bkt/{part}records/{count:020d}.batch", b"tail")[0] == 200
        count += 1
        assert listed() == list(range(count))
        assert computed - before == 1
        same_as_localbucket()
        # a rewrite inside a cached page: that page is answered afresh, as localbucket's
        assert _raw(port, "PUT", f"/bkt/{part}records/{5:020d}.batch", b"longer batch 5")[0] \
            == 200
        same_as_localbucket()
        # a deletion after every full page flips the last full page's "truncated" no more
        # than localbucket's: compared again after deleting the tail
        for offset in range(count - 1, (count // 1000) * 1000 - 1, -1):
            assert _raw(port, "DELETE", f"/bkt/{part}records/{offset:020d}.batch")[0] == 204
        same_as_localbucket()
        kept = (count // 1000) * 1000
        # an allocation below cached pages (offset 0 re-allocated: high 0 -> n): the
        # batches after it are not listed, cached or not, until its batch is written
        body = _json.dumps({"low": None, "high": kept, "timestamps": None}).encode()
        assert _raw(port, "PUT", f"/bkt/{part}watermark.json", body)[0] == 200
        assert listed() == [0]
        assert _raw(port, "PUT", f"/bkt/{part}records/{0:020d}.batch", b"batch 0")[0] == 200
        assert listed() == list(range(kept))
        same_as_localbucket()
    finally:
        for s in (server, reference):
            s.shutdown()
            s.server_close()


@pytest.mark.parametrize("idempotent", [True, False], ids=["idempotent", "not-idempotent"])
def test_api_producer_pipelined_groups_on_the_durable_broker_exactly_once(
        tmp_path: Path, settings, catalog, idempotent: bool) -> None:  # noqa: ANN001
    """The API's producers (``BeliefProducer.send``: group commit, the next group prepared
    while the previous one waits, sealing on), two of them as under ``up``'s two API
    processes, under 20 concurrent callers on the durable broker, idempotent or not (``up``
    turns idempotence off there): every acknowledged event is on the log at its
    acknowledged offset, the offsets are contiguous from 0 (no two produces given the same
    offsets), and after the projector folds the log each acknowledged event is in the
    read model exactly once (one observation row and one belief per event; a retried
    group could store an event twice on the log, which the fold counts once)."""
    import dataclasses
    import threading
    import uuid

    import sqlalchemy as sa

    from beliefstore.errors import ProduceError
    from beliefstore.events.producer import BeliefProducer
    from beliefstore.events.serde import AvroSerde
    from beliefstore.events.topics import ensure_topics
    from beliefstore.projector.replay import read_beliefs
    from beliefstore.projector.tables import observations
    from beliefstore.projector.worker import ProjectorWorker

    with EmbeddedKafka(tmp_path / "kafka") as kafka:
        durable = dataclasses.replace(settings, kafka_bootstrap_servers=kafka.bootstrap_servers,
                                      partitions=1, idempotent_producer=idempotent)
        ensure_topics(kafka.bootstrap_servers, {durable.topic: 1, durable.dlq_topic: 1})
        acked: dict[str, tuple[int, int]] = {}
        refused: list[str] = []
        stop = time.monotonic() + 5
        with BeliefProducer.from_settings(durable) as first, \
                BeliefProducer.from_settings(durable) as second:
            assert first.serde.sealer is not None
            assert first._config["enable_idempotence"] is idempotent

            def agent(i: int) -> None:
                producer = (first, second)[i % 2]
                while time.monotonic() < stop:
                    subject = f"agent{i}-{uuid.uuid4().hex[:8]}"
                    try:
                        r = producer.observe(subject, "support", "mood", "calm", 0.8,
                                             source="triage_agent")
                        acked[r.event_id] = (r.partition, r.offset)
                    except ProduceError as exc:
                        refused.append(str(exc))

            threads = [threading.Thread(target=agent, args=(i,)) for i in range(20)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        assert len(acked) > 100, refused[:3]
        consumer = KafkaConsumer(bootstrap_servers=kafka.bootstrap_servers,
                                 enable_auto_commit=False)
        tp = TopicPartition(durable.topic, 0)
        consumer.assign([tp])
        consumer.seek(tp, 0)
        serde = AvroSerde.for_settings(durable)
        at: dict[int, str] = {}
        deadline = time.monotonic() + 30
        try:
            while time.monotonic() < deadline and not set(acked) <= set(at.values()):
                for records in consumer.poll(timeout_ms=500).values():
                    at.update((r.offset, serde.decode(r.value).event.event_id) for r in records)
        finally:
            consumer.close()
        assert {e: at.get(o) for e, (_, o) in acked.items()} == {e: e for e in acked}, \
            "an acknowledged event is not at its acknowledged offset"
        assert sorted(at) == list(range(len(at))), "offsets not contiguous from 0"
        engine = catalog.engine(catalog.active().schema)
        with ProjectorWorker(durable, engine) as worker:
            worker.run(until_caught_up=True)
        with engine.connect() as conn:
            rows = conn.execute(sa.select(observations.c.event_id)).scalars().all()
        assert len(rows) == len(set(rows)) and {str(r) for r in rows} >= set(acked)
        assert len(read_beliefs(engine)) == len({str(r) for r in rows})


def test_producer_idempotence_setting_reaches_up_and_its_api_workers(
        tmp_path: Path, settings, monkeypatch) -> None:  # noqa: ANN001 - conftest fixtures
    """BELIEFSTORE_IDEMPOTENT_PRODUCER: ``on`` by default, also on `up`'s durable embedded
    broker (Kafka's default; off there, ingest was faster on a quiet machine but the
    freshness tail far longer on a loaded one: bench/README.md, section 8, fourth stop);
    the user's ``off`` reaches the API worker processes through their environment;
    anything else is refused with the setting named."""
    import contextlib
    import dataclasses

    from beliefstore.runtime import serve
    from beliefstore.runtime.startup import start_missing_services
    from beliefstore.settings import Settings, SettingsError

    monkeypatch.delenv("BELIEFSTORE_IDEMPOTENT_PRODUCER", raising=False)
    assert Settings.from_env({}, use_running=False).idempotent_producer is True
    off = Settings.from_env({"BELIEFSTORE_IDEMPOTENT_PRODUCER": "off"}, use_running=False)
    assert off.idempotent_producer is False
    assert serve._producer_env(off) == [("BELIEFSTORE_IDEMPOTENT_PRODUCER", "off")]
    with pytest.raises(SettingsError, match="BELIEFSTORE_IDEMPOTENT_PRODUCER"):
        Settings.from_env({"BELIEFSTORE_IDEMPOTENT_PRODUCER": "maybe"}, use_running=False)
    own = dataclasses.replace(settings, home=tmp_path / "home", kafka_bootstrap_servers=None)
    with contextlib.ExitStack() as stack:
        started = start_missing_services(own, stack, durable=True)
        assert started.kafka_bootstrap_servers and started.idempotent_producer is True
        assert serve._producer_env(started) == []


def test_s3_store_logs_failed_requests_only(tmp_path: Path) -> None:
    """Successful S3 requests are not logged at all (a long-running broker's log stays
    small, and the server does not format a line per request); failures still are."""
    import threading
    from http.server import ThreadingHTTPServer

    from beliefstore.embedded import s3server

    lines: list[str] = []

    class Recording(s3server.configure()):  # type: ignore[misc]
        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            lines.append(format % args)

    Recording.data_root = tmp_path
    (tmp_path / "bkt").mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recording)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        assert _raw(port, "PUT", "/bkt/a.json", b"{}")[0] == 200
        assert _raw(port, "GET", "/bkt/a.json")[0] == 200
        assert _raw(port, "GET", "/bkt?list-type=2")[0] == 200
        assert not lines, lines
        assert _raw(port, "GET", "/bkt/missing.json")[0] == 404
        assert len(lines) == 1 and " 404 " in lines[0], lines
    finally:
        server.shutdown()
        server.server_close()
