"""Entry point of the embedded broker's S3 store: ``localbucket``, tuned through its
public interface.

Run as ``python -m beliefstore.embedded.s3server [--host H] [--port P] DATA_ROOT`` (the
same arguments as ``localbucket``). Eight things differ from ``python -m localbucket``, all
made through public interfaces (``http.server``'s ``handle_one_request``,
``send_response`` and ``do_*`` methods, and localbucket's public functions and constants;
none of its underscored methods is overridden):

* **TCP_NODELAY on every connection.** localbucket's handler is a
  :class:`http.server.BaseHTTPRequestHandler`, which writes a response's headers and its
  body in separate ``send`` calls. On a keep-alive connection (Tansu's S3 client keeps
  one), Nagle's algorithm holds the body back until the client acknowledges the headers,
  and the client delays that acknowledgement (Linux: up to 40 ms). Measured here: every
  S3 request of the broker took about 40-45 ms, so a fetch of N record batches took
  N x 45 ms and the whole log read at about 12 records/s (1,000 one-record batches in
  81 s); with TCP_NODELAY the same 1,000 batches are read in under a second. The switch
  is the standard library's documented
  :attr:`socketserver.StreamRequestHandler.disable_nagle_algorithm`, which
  ``localbucket.S3Handler`` inherits.
* **Conditional writes** (``PUT`` with ``If-Match: "<etag>"``): localbucket 1.2.1 honours
  only ``If-None-Match: *``. Tansu keeps its producer sequences (``meta.json``) and
  each partition's high watermark (``watermark.json``) by read-modify-write with
  ``If-Match`` (object_store's ``S3ConditionalPut::ETagMatch``) and retries on 412.
  Ignored, two concurrent updates both "succeed" and one is lost: measured here, 20
  concurrent API requests over 4 partitions made Tansu answer OutOfOrderSequenceNumber
  (a lost sequence update), after which kafka-python's epoch bump failed and the
  producer refused every later send; a lost watermark update would give two record
  batches one offset. :class:`ConditionalS3Handler` checks the stored ETag (localbucket's
  own :func:`localbucket.object_etag`) and writes under a per-key lock, or answers 412
  PreconditionFailed as S3 does. (Two idempotent producers hammering four partitions
  still get an occasional OutOfOrderSequenceNumber from Tansu 0.6.0, without losing an
  acknowledged record: ``tests/test_services.py``.)
* **An access log of errors only**: successful S3 requests are not logged, so a
  long-running durable broker does not grow an unbounded log.
* **ListObjectsV2 from an in-memory index** (:class:`BucketIndex`). localbucket 1.2.1
  answers every listing by walking and sorting the whole bucket (``os.walk`` over every
  topic, then a prefix filter), and Tansu 0.6.0 lists all the objects of a partition on
  every fetch, so a fetch got slower as *any* topic grew (the access log's included).
  Here each bucket's keys are kept in a sorted list (``sortedcontainers``), built from
  the folder on first use (the server's start) and updated by every PutObject,
  CopyObject, CompleteMultipartUpload and DeleteObject that goes through this handler
  (before the response is sent, so a client that got its 200 sees its key listed); a
  page is a range of that list, scoped to the prefix, and each key's ``<Contents>``
  fragment is computed once and reused, so a page is a join; a full page (1,000 keys, no
  delimiter) is kept whole until a key in its range is written (or one in or after it
  deleted), so the pages
  before the log's tail, which Tansu lists again on every fetch, cost a lookup (before,
  a log past the 4,096 fragments kept recomputed every fragment, a stat and an MD5, on
  every listing: a 60-s run of ``bench/ingest_http.py`` with ~5,000 record batches then
  left the projector 2.5 minutes behind). Prefix, delimiter,
  start-after, continuation-token, max-keys and encoding-type are honoured exactly as
  localbucket does (the same bytes: ``tests/test_services.py`` compares both listings
  over one folder, and fails if localbucket changes); malformed listings and ListObjects
  (v1) are left to localbucket. The index assumes this server is the only writer of its
  folder while it runs (true for the embedded broker). ``BELIEFSTORE_S3_LISTING=walk``
  in the server's environment turns the index off (localbucket's own listing), for
  measuring the difference (``bench/durable_consume.py``).
* **No record batch listed past one still being written.** Tansu 0.6.0 produces in three
  steps: the producer's sequence (``meta.json``), then the partition's high watermark
  (``watermark.json``: ``high`` moves from H to H+n, which allocates offsets H..H+n-1),
  then the record batch object ``records/<H>.batch``. With several producers on one
  partition (``up`` runs one API process per core, each with its own producer) a later
  batch can be written before an earlier one; a fetch in between lists the later batch
  but not the earlier one, returns it, and the consumer's position moves past the
  earlier batch, which it then never reads. Measured here: four producers on one
  partition for 20 s, and a consumer tailing the partition missed 5 acknowledged records
  that a later read from offset 0 found. So the index notes each allocation (a
  ``watermark.json`` PUT that raises ``high``) until its batch is written, and a listing
  of that partition's ``records/`` leaves out the batches after the oldest allocation
  still unwritten (for at most :data:`BARRIER_TIMEOUT_S`, in case its producer died): a
  fetch then returns what precedes the gap and the next fetch the rest. The objects
  themselves are untouched; once no write is in flight, listings are localbucket's.

* **A GET's ETag is its bytes' ETag.** localbucket 1.2.1 opens the file, then hashes it
  by path, and caches ETags under (device, inode, size, mtime), which repeat here (ext4
  mtimes move in ~4 ms ticks; a rewrite reuses the inode freed two rewrites before). So
  a GET racing a rewrite of ``watermark.json`` answered old bytes with the new ETag,
  Tansu's ``If-Match`` update on those bytes passed, and two produces were given the
  same offsets: one batch refused (412, the produce failed and left its allocation
  unwritten, so fetches waited out :data:`BARRIER_TIMEOUT_S`), or batches overlapping,
  whose records a consumer then skipped (seen: 5 acknowledged events never in the read
  model, in a 25-s run of ``bench/ingest_http.py``). Object GETs and HEADs now hold
  the key's lock stripe (no PUT of that key in between), ``If-Match`` compares the MD5 of
  the bytes on disk, and every overwrite gets a strictly increasing nanosecond mtime, so
  no cached ETag of an older version can match it again.
* **A 412 keeps the connection**: the request's body is read first, so Tansu's retry
  does not need a new connection (and this server a new thread) per conflict.
* **Conditional GETs** (``If-None-Match: "<etag>"``): an object whose ETag is listed is
  answered ``304 Not Modified`` with its ETag and no body, as S3 does (localbucket 1.2.1
  sends the whole object). Tansu 0.6.0 reads ``meta.json`` that way, with the ETag it
  holds, on every produce and fetch, and the partition's ``watermark.json`` on every
  fetch: a 304 keeps its copy, where a 200 replaces it: a fetch's read of the version before
  a produce's update, answered after that update, could leave Tansu holding the stale
  version, whose next ``If-Match`` write then fails (412, read again, written again).

The localbucket version is pinned (:data:`LOCALBUCKET_VERSION`, and in pyproject.toml);
``tests/test_services.py`` fails if an assumption above stops holding (localbucket's
listing bytes, or Tansu's object layout and produce order).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit
from xml.sax.saxutils import escape

from cachetools import LRUCache
from sortedcontainers import SortedList

__all__ = ["BARRIER_TIMEOUT_S", "ETAG_CACHE_SIZE", "FRAGMENT_CACHE_SIZE", "LOCALBUCKET_VERSION",
           "PAGE_CACHE_SIZE", "BucketIndex", "configure", "main"]

#: The localbucket release this module was written and measured against.
LOCALBUCKET_VERSION = "1.2.1"

_OK_STATUS = re.compile(r'" [23][0-9][0-9] ')


class _ErrorsOnly(logging.Filter):
    """Drop access-log lines of successful (2xx/3xx) requests."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _OK_STATUS.search(record.getMessage())


#: Lock stripes for conditional writes: a PUT holds the stripe of its key.
_STRIPES = [threading.Lock() for _ in range(64)]

#: localbucket's query parameters of ListObjectsV2 (and those it ignores on any request).
def _stripe(target: Path) -> threading.Lock:
    """The lock stripe of an object's file: held by a PUT from its ``If-Match`` check
    through its response, and by a GET or HEAD while it reads the file and its ETag."""
    return _STRIPES[zlib.crc32(str(target).encode()) % len(_STRIPES)]


_V2_QUERY = frozenset({"list-type", "prefix", "delimiter", "max-keys", "start-after",
                       "continuation-token", "encoding-type"})


def _element(tag: str, text: str) -> str:
    """One XML element as ElementTree writes it: ``<T>text</T>``, or ``<T />`` if empty."""
    return f"<{tag}>{escape(text)}</{tag}>" if text else f"<{tag} />"


class BucketIndex:
    """The object keys of one bucket folder in localbucket's order, for ListObjectsV2.

    Keys are ``/``-separated paths relative to the folder, kept sorted by their UTF-8
    bytes (localbucket's order) in a :class:`sortedcontainers.SortedList`; each key's
    ``<Contents>`` fragment after its ``<Key>`` (LastModified, ETag, Size, StorageClass, as
    localbucket writes them) is computed on its first listing and reused until the key is
    written or deleted again, for the :data:`FRAGMENT_CACHE_SIZE` most recently listed
    keys (a fetch lists the tail of a partition; a replay reads it once, in order); the
    ``<Key>`` element is built per page (it is most of the fragment, and the log's keys
    are what grows). A page without delimiter is kept as it was answered, with the range
    of keys it covers, until a key in that range is written, or one in or after it
    deleted: a full one (``max_keys`` keys and more after it) is answered as kept, and
    the last one of a listing is extended by the keys written after it since (Tansu
    appends record batches after the last), for at most :data:`PAGE_CACHE_SIZE` pages (the first
    ones listed; none is evicted for a newer one, so a listing longer than the bound
    still finds its first pages). Tansu lists a partition from its first batch on every
    fetch and appends after its last, so every page but the last is answered from here,
    its fragments not recomputed when the fragment cache has evicted them, and the last
    page costs the batches written since the previous listing. A
    page with a record batch behind an unwritten allocation in its range (see
    :meth:`allocate`) is neither kept nor answered from here. Built by walking the
    folder on first use, skipping localbucket's temporary files. Thread-safe (one lock).
    Memory: about 140 bytes per key (its UTF-8 bytes in the sorted list), plus at most
    :data:`FRAGMENT_CACHE_SIZE` fragments of about 250 bytes and :data:`PAGE_CACHE_SIZE`
    pages of about 300 bytes per key.
    """

    def __init__(self, folder: Path) -> None:
        """Args:
            folder: the bucket's folder (walked on first use, not here).
        """
        self.folder = folder
        self._lock = threading.Lock()
        self._built = False
        self._keys: SortedList = SortedList()
        #: key bytes -> cached fragment after <Key> (through </Contents>), the most
        #: recently listed keys only (an index of every key is ``_keys``)
        self._fragments: LRUCache[bytes, str] = LRUCache(maxsize=FRAGMENT_CACHE_SIZE)
        #: a partition's records/ prefix -> {allocated offset without its batch: when}
        self._pending: dict[str, dict[int, float]] = {}
        #: full pages (truncated, no delimiter) as :meth:`page` returned them, by their
        #: query; each with the range of keys it covers, (lowest, last), inclusive
        self._pages: dict[tuple[str, str, bool, int, bool],
                          tuple[bytes, bytes, tuple[list[str], list[str], bool, str]]] = {}

    def allocate(self, records_prefix: str, offset: int) -> None:
        """Record that offsets from ``offset`` were allocated in the partition whose
        batches are under ``records_prefix`` (its ``watermark.json`` raised ``high``
        from ``offset``); its batch ``<offset>.batch`` is not written yet."""
        with self._lock:
            self._pending.setdefault(records_prefix, {})[offset] = time.monotonic()

    def add(self, key: str) -> None:
        """Record that ``key`` was (re)written: listed from now on, fragment recomputed."""
        with self._lock:
            self._build()
            raw = key.encode()
            if raw not in self._keys:
                self._keys.add(raw)
            self._fragments.pop(raw, None)
            self._changed(raw)
            if self._pending and (batch := _BATCH_KEY.fullmatch(key)):
                pending = self._pending.get(batch[1])
                if pending is not None:
                    pending.pop(int(batch[2]), None)
                    if not pending:
                        del self._pending[batch[1]]

    def discard(self, key: str) -> None:
        """Record that ``key`` was deleted (no error if it was not there)."""
        with self._lock:
            self._build()
            raw = key.encode()
            self._fragments.pop(raw, None)
            self._keys.discard(raw)
            self._changed(raw, deleted=True)

    def _changed(self, raw: bytes, deleted: bool = False) -> None:
        """Forget the cached pages whose range holds ``raw``, or, for a ``deleted`` key,
        that it may follow (a page's "truncated" says a key follows it; caller holds the
        lock)."""
        if self._pages:
            for query in [q for q, (low, last, _) in self._pages.items()
                          if low <= raw and (deleted or raw <= last)]:
                del self._pages[query]

    def page(self, prefix: str, delimiter: str, marker: str, marker_is_prefix: bool,
             max_keys: int, encode: Callable[[str], str] | None = None,
             ) -> tuple[list[str], list[str], bool, str]:
        """One page of a listing, exactly as localbucket's ``S3Handler._list_entries``
        selects it (1.2.1): keys under ``prefix`` after ``marker`` (by UTF-8 bytes; with
        ``marker_is_prefix``, also skipping keys under ``marker``), keys that hold
        ``delimiter`` after the prefix rolled up into common prefixes, at most
        ``max_keys`` entries.

        Args:
            encode: applied to each listed key (``encoding-type=url``); ``None``: as is.

        Returns:
            (the ``<Contents>`` XML fragments of the listed keys, the common prefixes,
            whether the page is truncated, the last entry as ``K:key`` / ``P:prefix``,
            localbucket's continuation-token payload).
        """
        contents: list[str] = []
        common_prefixes: list[str] = []
        last_entry = ""
        truncated = False
        raw_prefix, raw_marker = prefix.encode(), marker.encode()
        low = max(raw_prefix, raw_marker)
        query = (prefix, marker, marker_is_prefix, max_keys, encode is None)
        with self._lock:
            self._build()
            barriers = self._barriers()
            cached = None if delimiter else self._pages.get(query)
            start, after = low, False
            if cached is not None and not _barrier_within(low, cached[1], barriers):
                if cached[2][2]:
                    return cached[2]
                # the last page, when it was listed: only keys after it can have come
                # (a write in its range or a deletion dropped it), so it is extended
                contents, last_entry = list(cached[2][0]), cached[2][3]
                start, after = cached[1], True
            for raw in self._keys.irange(minimum=start, inclusive=(not after, True)):
                if not raw.startswith(raw_prefix):
                    break  # sorted by bytes: the keys under the prefix are contiguous
                if raw_marker and (raw <= raw_marker
                                   or (marker_is_prefix and raw.startswith(raw_marker))):
                    continue
                key = raw.decode()
                if barriers and _behind_barrier(key, barriers):
                    continue
                common = ""
                if delimiter:
                    index = key.find(delimiter, len(prefix))
                    if index >= 0:
                        common = key[: index + len(delimiter)]
                if common and common_prefixes and common_prefixes[-1] == common:
                    continue
                if len(contents) + len(common_prefixes) >= max_keys:
                    truncated = max_keys > 0
                    break
                if common:
                    common_prefixes.append(common)
                    last_entry = "P:" + common
                    continue
                tail = self._fragments.get(raw) or self._fragment(raw, key)
                if tail is None:
                    continue  # the file vanished behind our back: not listed
                contents.append("<Contents>" + _element(
                    "Key", key if encode is None else encode(key)) + tail)
                last_entry = "K:" + key
            if not delimiter and contents:
                last = last_entry[2:].encode()
                if not _barrier_within(low, last, barriers) and (
                        query in self._pages or len(self._pages) < PAGE_CACHE_SIZE):
                    self._pages[query] = (low, last, (contents, common_prefixes, truncated,
                                                      last_entry))
        return contents, common_prefixes, truncated, last_entry

    def _barriers(self) -> list[tuple[str, int]]:
        """(records/ prefix, oldest allocated offset still unwritten) of each partition,
        forgetting allocations older than BARRIER_TIMEOUT_S (caller holds the lock)."""
        if not self._pending:
            return []
        expired = time.monotonic() - BARRIER_TIMEOUT_S
        barriers = []
        for records_prefix, pending in list(self._pending.items()):
            for offset in [o for o, when in pending.items() if when < expired]:
                del pending[offset]
                logging.getLogger("localbucket").warning(
                    "offset %d of %s was allocated %.0f s ago and has no record batch: "
                    "listing the batches after it", offset, records_prefix, BARRIER_TIMEOUT_S)
            if pending:
                barriers.append((records_prefix, min(pending)))
            else:
                del self._pending[records_prefix]
        return barriers

    def _fragment(self, raw: bytes, key: str) -> str | None:
        import localbucket

        path = self.folder.joinpath(*key.split("/"))
        try:
            stat = path.stat()
            etag = localbucket.object_etag(path)
        except FileNotFoundError:
            self._fragments.pop(raw, None)
            self._keys.discard(raw)
            self._changed(raw, deleted=True)
            return None
        tail = (f"<LastModified>{localbucket.iso_timestamp(stat.st_mtime)}</LastModified>"
                f'<ETag>"{etag}"</ETag><Size>{stat.st_size}</Size>'
                "<StorageClass>STANDARD</StorageClass></Contents>")
        self._fragments[raw] = tail
        return tail

    def _build(self) -> None:
        """Walk the folder once (caller holds the lock)."""
        if self._built:
            return
        import localbucket

        keys = []
        for directory, _, files in os.walk(self.folder):
            for name in files:
                if name.startswith(localbucket.TEMP_PREFIX):
                    continue
                key = Path(directory, name).relative_to(self.folder).as_posix()
                try:
                    keys.append(key.encode())
                except UnicodeEncodeError:  # not UTF-8 on disk: localbucket fails on it too
                    continue
        self._keys = SortedList(keys)
        self._fragments.clear()
        self._pages.clear()
        self._built = True


#: How many listed keys' ``<Contents>`` fragments a :class:`BucketIndex` keeps (LRU). A
#: fetch lists a partition from the consumer's position, so the keys listed again are the
#: log's tail; an older key's fragment is computed again (a stat and an MD5 of a batch
#: object of a few KB) when it is listed again. About 250 bytes each: ~1 MiB per bucket.
FRAGMENT_CACHE_SIZE = 4096

#: How many files' ETags localbucket keeps (LRU), instead of every file it ever hashed.
#: localbucket 1.2.1 caches each file's MD5 ETag with its stat signature in the module
#: dict ``localbucket._etag_cache``, with no bound: about 600 bytes per object, for every
#: record batch the log ever gained (the S3 store grew ×1.19 in a 10-minute soak). A
#: miss costs an MD5 of the object (record batches are a few KB); the objects hashed
#: again and again (``watermark.json``, ``meta.json``, on every produce) stay cached.
ETAG_CACHE_SIZE = 4096

#: How long a listing may leave out the record batches after an allocated offset whose
#: batch is not written yet, seconds (a produce writes it within milliseconds; longer
#: means its producer or the broker died, and the gap is permanent).
BARRIER_TIMEOUT_S = 10.0

_BATCH_KEY = re.compile(r"(.*/partitions/[^/]+/records/)([0-9]{20})\.batch")
_WATERMARK_KEY = re.compile(r"(.*/partitions/[^/]+/)watermark\.json")

#: ListObjectsV2 from the index (else localbucket's walk): BELIEFSTORE_S3_LISTING != "walk"
_USE_INDEX = os.environ.get("BELIEFSTORE_S3_LISTING", "index") != "walk"

#: How many full listing pages a :class:`BucketIndex` keeps (see there): a page of 1,000
#: keys is about 300 KB, so at most about 40 MB per bucket, for the first ~128,000
#: record batches of the log; pages past the bound are computed on each listing.
PAGE_CACHE_SIZE = 128


def _barrier_within(low: bytes, last: bytes, barriers: list[tuple[str, int]]) -> bool:
    """Whether a batch behind one of ``barriers`` may sort within ``low``..``last``
    (conservative: any key of the barrier's partition after its offset)."""
    for records_prefix, offset in barriers:
        raw_prefix = records_prefix.encode()
        if last > (records_prefix + f"{offset:020d}").encode() \
                and low < raw_prefix + b"\xff":
            return True
    return False


def _behind_barrier(key: str, barriers: list[tuple[str, int]]) -> bool:
    """Whether ``key`` is a record batch after an allocated offset still unwritten."""
    for records_prefix, offset in barriers:
        if key.startswith(records_prefix):
            digits = key[len(records_prefix):len(records_prefix) + 20]
            return digits.isdigit() and int(digits) > offset
    return False


def _content_etag(path: Path) -> str | None:
    """The MD5 ETag of the file's bytes as they are now (``None``: no such file), read
    afresh: not localbucket's cached ETag, which is keyed by (device, inode, size, mtime)
    and so can be another version's (see :func:`_unique_mtime`)."""
    try:
        return hashlib.md5(path.read_bytes()).hexdigest()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


_MTIME_LOCK = threading.Lock()
_last_mtime_ns = 0


def _unique_mtime(path: Path) -> None:
    """Give a rewritten file an mtime no earlier version of any file here had.

    localbucket caches each file's ETag under its (device, inode, size, mtime) and
    reuses it while they are unchanged. On this machine's ext4 the mtime moves in
    ~4 ms ticks and a rewrite (a temporary file renamed over the old one) reuses the
    inode freed two rewrites before (4 distinct inodes in 200 rewrites), so versions of
    ``watermark.json`` written within one tick share all four; a GET that computed one
    version's ETag while another was being written then stores it for the other, and
    the next reader is told a stale ETag. With ``If-Match`` trusting that, two of Tansu's
    producers allocated the same offsets (seen: ``PUT …/records/<offset>.batch`` refused
    412 and the produce failed, leaving an allocated offset without a batch). A
    nanosecond mtime set here, strictly increasing, makes every version's signature its
    own, so a stale entry can no longer match; ``If-Match`` itself reads the bytes
    (:func:`_content_etag`).
    """
    global _last_mtime_ns
    with _MTIME_LOCK:
        ns = max(time.time_ns(), _last_mtime_ns + 1)
        _last_mtime_ns = ns
    with contextlib.suppress(OSError):
        os.utime(path, ns=(ns, ns))


def _high(path: Path) -> int:
    """The ``high`` of a Tansu ``watermark.json`` (0 if absent or unreadable)."""
    try:
        high = json.loads(path.read_bytes()).get("high")
    except (OSError, ValueError, AttributeError):
        return 0
    return high if isinstance(high, int) else 0


_INDEXES: dict[Path, BucketIndex] = {}
_INDEXES_LOCK = threading.Lock()


def _index(folder: Path) -> BucketIndex:
    """The :class:`BucketIndex` of a bucket folder (one per folder and process)."""
    with _INDEXES_LOCK:
        index = _INDEXES.get(folder)
        if index is None:
            index = _INDEXES[folder] = BucketIndex(folder)
        return index


def _forget_index(folder: Path) -> None:
    with _INDEXES_LOCK:
        _INDEXES.pop(folder, None)


def _handler_class() -> type:
    import localbucket

    class ConditionalS3Handler(localbucket.S3Handler):  # type: ignore[misc, name-defined]
        """localbucket's handler, plus ``If-Match`` on PutObject, ``If-None-Match`` on
        GetObject and ListObjectsV2 from a :class:`BucketIndex` (see the module doc)."""

        #: the index change the current request makes if it succeeds: (op, bucket, key)
        _change: tuple[str, str, str] | None = None
        #: a watermark.json PUT: (records/ prefix, high before it), else None
        _watermark: tuple[str, int] | None = None

        #: the file an object PUT (under its key's stripe) is writing, else None
        _rewritten: Path | None = None

        def handle_one_request(self) -> None:
            self._change = self._watermark = self._rewritten = None
            super().handle_one_request()

        def send_response(self, code: int, message: str | None = None) -> None:
            change, self._change = self._change, None
            rewritten, self._rewritten = self._rewritten, None
            if rewritten is not None and 200 <= code < 300 and not _BATCH_KEY.fullmatch(
                    rewritten.as_posix()):
                _unique_mtime(rewritten)  # written, still under its key's stripe
            if change is not None and 200 <= code < 300:
                op, bucket, key = change
                folder = Path(self.data_root, bucket)
                if op == "add":
                    _index(folder).add(key)
                    if self._watermark is not None:  # written, under its key's stripe
                        records_prefix, before = self._watermark
                        if _high(folder.joinpath(*key.split("/"))) > before:
                            _index(folder).allocate(records_prefix, before)
                elif op == "discard":
                    _index(folder).discard(key)
                else:  # a deleted bucket: a new one of that name starts empty
                    _forget_index(folder)
            super().send_response(code, message)

        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            # The access log keeps errors only (_ErrorsOnly); a success is not even
            # formatted (5 % of this server's CPU under bench/ingest_http.py's load).
            if not (isinstance(code, int) and 200 <= code < 400):
                super().log_request(code, size)

        def do_GET(self) -> None:
            if (target := self._target()) is not None:
                # GetObject: under its key's stripe, so no PUT replaces the file between
                # localbucket opening it and computing the ETag it sends with it (1.2.1
                # opens first and hashes by path after: a rewrite in between sent the old
                # bytes with the new version's ETag, and Tansu's If-Match update of a
                # watermark then passed on stale data and lost an allocation).
                with _stripe(target):
                    if not self._not_modified(target):
                        super().do_GET()
            elif not _USE_INDEX or not self._list_from_index():
                super().do_GET()

        def do_HEAD(self) -> None:
            if (target := self._target()) is not None:
                with _stripe(target):
                    super().do_HEAD()
            else:
                super().do_HEAD()

        def do_POST(self) -> None:
            bucket, key, query = self._split()
            if bucket and key and "uploadId" in query:  # CompleteMultipartUpload
                self._change = ("add", bucket, key)
            super().do_POST()

        def do_DELETE(self) -> None:
            bucket, key, query = self._split()
            if bucket and key and not query:  # DeleteObject
                self._change = ("discard", bucket, key)
            elif bucket and not key and not query:  # DeleteBucket
                self._change = ("forget", bucket, "")
            super().do_DELETE()

        def do_PUT(self) -> None:
            bucket, key, query = self._split()
            if bucket and key and not query:  # PutObject or CopyObject
                self._change = ("add", bucket, key)
            target = self._target()
            if target is None:  # not an object PUT we can check: localbucket decides
                super().do_PUT()
                return
            with _stripe(target):
                if watermark := _WATERMARK_KEY.fullmatch(key):
                    self._watermark = (watermark[1] + "records/", _high(target))
                if_match = self.headers.get("If-Match")
                if if_match is not None:
                    current = _content_etag(target)
                    if current is None or not localbucket.etag_matches(if_match, current):
                        self._precondition_failed()
                        return
                self._rewritten = target
                super().do_PUT()

        def _not_modified(self, target: Path) -> bool:
            """Answer a GetObject whose ``If-None-Match`` lists the object's current ETag
            with ``304 Not Modified`` (no body), as S3 does; ``False`` (nothing sent) for
            any other request (caller holds the key's stripe)."""
            if_none_match = self.headers.get("If-None-Match")
            if if_none_match is None:
                return False
            current = _content_etag(target)
            if current is None or not localbucket.etag_matches(if_none_match, current):
                return False
            self.send_response(304)
            self.send_header("x-amz-request-id", uuid.uuid4().hex.upper()[:16])
            self.send_header("ETag", f'"{current}"')
            self.end_headers()
            return True

        def _split(self) -> tuple[str, str, dict[str, str]]:
            """(bucket, key, query) of the request, parsed as localbucket parses them."""
            parts = urlsplit(self.path)
            bucket, _, key = unquote(parts.path).lstrip("/").partition("/")
            parsed = parse_qs(parts.query, keep_blank_values=True)
            return bucket, key, {name: values[0] for name, values in parsed.items()}

        def _list_from_index(self) -> bool:
            """Answer a well-formed ListObjectsV2 from the bucket's index; ``False``
            (nothing sent) for anything else, which localbucket then answers (errors
            included)."""
            bucket, key, query = self._split()
            if (not bucket or key or query.get("list-type") != "2"
                    or set(query) - localbucket.ALWAYS_ALLOWED_QUERY - _V2_QUERY):
                return False
            folder = Path(self.data_root, bucket)
            if not localbucket.BUCKET_NAME_RE.match(bucket) or not folder.is_dir():
                return False
            try:
                max_keys = min(int(query.get("max-keys", localbucket.MAX_KEYS_LIMIT)),
                               localbucket.MAX_KEYS_LIMIT)
            except ValueError:
                return False
            if max_keys < 0:
                return False
            prefix = query.get("prefix", "")
            delimiter = query.get("delimiter", "")
            start_after = query.get("start-after", "")
            token = query.get("continuation-token")
            marker, marker_is_prefix = start_after, False
            if token is not None:
                try:
                    decoded = base64.urlsafe_b64decode(token.encode()).decode()
                except ValueError:
                    return False
                if decoded[:2] not in ("K:", "P:"):
                    return False
                marker, marker_is_prefix = decoded[2:], decoded.startswith("P:")
            url = query.get("encoding-type") == "url"
            encode: Callable[[str], str] = ((lambda text: quote(text, safe="/")) if url
                                            else (lambda text: text))
            contents, common_prefixes, truncated, last_entry = _index(folder).page(
                prefix, delimiter, marker, marker_is_prefix, max_keys,
                encode if url else None)
            head = [_element("Name", bucket), _element("Prefix", encode(prefix))]
            if delimiter:
                head.append(_element("Delimiter", encode(delimiter)))
            head.append(_element("MaxKeys", str(max_keys)))
            head.append(_element("KeyCount", str(len(contents) + len(common_prefixes))))
            head.append(_element("IsTruncated", "true" if truncated else "false"))
            if token is not None:
                head.append(_element("ContinuationToken", token))
            if truncated:
                head.append(_element("NextContinuationToken",
                                     base64.urlsafe_b64encode(last_entry.encode()).decode()))
            if start_after:
                head.append(_element("StartAfter", encode(start_after)))
            if url:
                head.append(_element("EncodingType", "url"))
            tail = ["<CommonPrefixes>" + _element("Prefix", encode(common)) + "</CommonPrefixes>"
                    for common in common_prefixes]
            body = "".join([
                "<?xml version='1.0' encoding='UTF-8'?>\n",
                f'<ListBucketResult xmlns="{localbucket.S3_NAMESPACE}">',
                *head, *contents, *tail, "</ListBucketResult>"]).encode()
            # the headers localbucket's S3Handler._send_headers writes
            self.send_response(200)
            self.send_header("x-amz-request-id", uuid.uuid4().hex.upper()[:16])
            self.send_header("Content-Length", str(len(body)))
            origin = self.headers.get("Origin")
            if origin:
                self.send_header("Access-Control-Allow-Origin", origin)
                self.send_header("Access-Control-Expose-Headers",
                                 localbucket.CORS_EXPOSE_HEADERS)
                self.send_header("Vary", "Origin")
            self.send_header("Content-Type", "application/xml")
            self.end_headers()
            self.wfile.write(body)
            return True

        def _target(self) -> Path | None:
            """The file of a path-style ``PUT /bucket/key`` (no query), else ``None``."""
            parts = urlsplit(self.path)
            if parts.query:
                return None
            bucket, _, key = unquote(parts.path).lstrip("/").partition("/")
            pieces = key.split("/")
            if not bucket or not key or any(p in ("", ".", "..") for p in pieces):
                return None
            return Path(self.data_root, bucket, *pieces)

        def _precondition_failed(self) -> None:
            body = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>PreconditionFailed'
                    b"</Code><Message>At least one of the pre-conditions you specified did not "
                    b"hold</Message></Error>")
            # Read the request body first, so the connection can carry the client's next
            # request (Tansu re-reads and retries at once; a closed connection cost it a
            # new one, and this server a new thread, per conflict).
            drained = self._drain_body()
            if not drained:
                self.close_connection = True
            self.send_response(412)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            if not drained:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def _drain_body(self) -> bool:
            """Read and drop the request's body; whether the connection may be reused
            (a ``Content-Length`` or chunked body read whole)."""
            try:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    localbucket.read_chunked(self.rfile)
                    return True
                length = self.headers.get("Content-Length")
                if length is None:
                    return False
                remaining = int(length)
                while remaining > 0:
                    chunk = self.rfile.read(min(remaining, 1 << 16))
                    if not chunk:
                        return False
                    remaining -= len(chunk)
                return True
            except (OSError, ValueError, localbucket.S3Error):
                return False

    return ConditionalS3Handler


def configure() -> Any:
    """Switch Nagle's algorithm off for localbucket's connections and return the handler
    class that also honours ``If-Match`` on PutObject and answers ListObjectsV2 from a
    :class:`BucketIndex` per bucket.

    Returns:
        a subclass of ``localbucket.S3Handler`` (a
        :class:`socketserver.StreamRequestHandler`); ``disable_nagle_algorithm`` is set
        on ``localbucket.S3Handler`` itself.
    """
    import localbucket

    localbucket.S3Handler.disable_nagle_algorithm = True
    _bound_etag_cache(localbucket)
    return _handler_class()


def _bound_etag_cache(localbucket: Any) -> None:
    """Replace localbucket's unbounded ETag cache by an LRU of :data:`ETAG_CACHE_SIZE`
    entries (see there), keeping what it holds. The one private name of localbucket this
    module touches: 1.2.1 reads and writes ``_etag_cache`` only with ``get`` and item
    assignment under ``_etag_lock``, which :class:`cachetools.LRUCache` supports;
    ``tests/test_services.py`` fails if that changes.

    Raises:
        RuntimeError: localbucket has no ``_etag_cache`` mapping (another version).
    """
    current = getattr(localbucket, "_etag_cache", None)
    if isinstance(current, LRUCache):
        return
    if not isinstance(current, dict):
        raise RuntimeError(f"localbucket {localbucket.__version__} has no _etag_cache dict; "
                           f"beliefstore's S3 store is written for {LOCALBUCKET_VERSION}")
    bounded: LRUCache[str, Any] = LRUCache(maxsize=ETAG_CACHE_SIZE)
    with localbucket._etag_lock:
        bounded.update(list(current.items())[-ETAG_CACHE_SIZE:])
        localbucket._etag_cache = bounded


def main(argv: list[str] | None = None) -> None:
    """Serve ``DATA_ROOT`` like ``localbucket [--host H] [--port P] DATA_ROOT`` does, with
    the handler of :func:`configure` and an errors-only access log.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).
    """
    import argparse
    from http.server import ThreadingHTTPServer

    import localbucket

    parser = argparse.ArgumentParser(prog="beliefstore-s3", description=main.__doc__)
    parser.add_argument("data_root", type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.addFilter(_ErrorsOnly())
    handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s]: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    data_root = args.data_root.resolve()
    data_root.mkdir(parents=True, exist_ok=True)
    handler_class = configure()
    handler_class.data_root = data_root
    for folder in localbucket.bucket_dirs(data_root):  # walk each bucket once, now
        _index(folder).page("", "", "", False, 0)
    server = ThreadingHTTPServer((args.host, args.port), handler_class)
    logging.getLogger("localbucket").info("serving %s on http://%s:%d", data_root, args.host,
                                          args.port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
