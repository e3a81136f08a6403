"""Entry point of the embedded broker's S3 store: ``localbucket``, tuned through its
public interface.

Run as ``python -m beliefstore.embedded.s3server [--host H] [--port P] DATA_ROOT`` (the
same arguments as ``localbucket``). Three things differ from ``python -m localbucket``:

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

The localbucket version is pinned (:data:`LOCALBUCKET_VERSION`, and in pyproject.toml);
``tests/test_services.py`` fails if either assumption above stops holding.
"""

from __future__ import annotations

import logging
import re
import threading
import zlib
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = ["LOCALBUCKET_VERSION", "configure", "main"]

#: The localbucket release this module was written and measured against.
LOCALBUCKET_VERSION = "1.2.1"

_OK_STATUS = re.compile(r'" [23][0-9][0-9] ')


class _ErrorsOnly(logging.Filter):
    """Drop access-log lines of successful (2xx/3xx) requests."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _OK_STATUS.search(record.getMessage())


#: Lock stripes for conditional writes: a PUT holds the stripe of its key.
_STRIPES = [threading.Lock() for _ in range(64)]


def _handler_class() -> type:
    import localbucket

    class ConditionalS3Handler(localbucket.S3Handler):  # type: ignore[misc, name-defined]
        """localbucket's handler, plus ``If-Match`` on PutObject (see the module doc)."""

        def do_PUT(self) -> None:
            target = self._target()
            if target is None:  # not an object PUT we can check: localbucket decides
                super().do_PUT()
                return
            with _STRIPES[zlib.crc32(str(target).encode()) % len(_STRIPES)]:
                if_match = self.headers.get("If-Match")
                if if_match is not None:
                    current = localbucket.object_etag(target) if target.is_file() else None
                    if current is None or not localbucket.etag_matches(if_match, current):
                        self._precondition_failed()
                        return
                super().do_PUT()

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
            # the request body is left unread, so the connection cannot be reused
            self.close_connection = True
            self.send_response(412)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

    return ConditionalS3Handler


def configure() -> Any:
    """Switch Nagle's algorithm off for localbucket's connections and return the handler
    class that also honours ``If-Match`` on PutObject.

    Returns:
        a subclass of ``localbucket.S3Handler`` (a
        :class:`socketserver.StreamRequestHandler`); ``disable_nagle_algorithm`` is set
        on ``localbucket.S3Handler`` itself.
    """
    import localbucket

    localbucket.S3Handler.disable_nagle_algorithm = True
    return _handler_class()


def main(argv: list[str] | None = None) -> None:
    """Serve ``DATA_ROOT`` like ``localbucket [--host H] [--port P] DATA_ROOT`` does, with
    the handler of :func:`configure` and an errors-only access log.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).
    """
    import argparse
    from http.server import ThreadingHTTPServer

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
