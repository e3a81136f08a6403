"""Entry point of the embedded broker's S3 store: ``localbucket``, tuned through its
public interface.

Run as ``python -m beliefstore.embedded.s3server [--host H] [--port P] DATA_ROOT`` (the
same arguments as ``localbucket``). Two things differ from ``python -m localbucket``:

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
* **An access log of errors only**: successful S3 requests are not logged, so a
  long-running durable broker does not grow an unbounded log.

The localbucket version is pinned (:data:`LOCALBUCKET_VERSION`, and in pyproject.toml);
``tests/test_services.py`` fails if either assumption above stops holding.
"""

from __future__ import annotations

import logging
import re
import sys

__all__ = ["LOCALBUCKET_VERSION", "configure", "main"]

#: The localbucket release this module was written and measured against.
LOCALBUCKET_VERSION = "1.2.1"

_OK_STATUS = re.compile(r'" [23][0-9][0-9] ')


class _ErrorsOnly(logging.Filter):
    """Drop access-log lines of successful (2xx/3xx) requests."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _OK_STATUS.search(record.getMessage())


def configure() -> type:
    """Switch Nagle's algorithm off for localbucket's connections; return its handler class.

    Returns:
        ``localbucket.S3Handler`` (a :class:`socketserver.StreamRequestHandler`) with
        ``disable_nagle_algorithm = True``.
    """
    import localbucket

    localbucket.S3Handler.disable_nagle_algorithm = True
    return localbucket.S3Handler


def main(argv: list[str] | None = None) -> None:
    """Run localbucket with :func:`configure` applied and an errors-only access log.

    Args:
        argv: localbucket's arguments (default ``sys.argv[1:]``).
    """
    import localbucket

    handler = logging.StreamHandler()
    handler.addFilter(_ErrorsOnly())
    handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s]: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    configure()
    sys.argv = ["localbucket", *(sys.argv[1:] if argv is None else argv)]
    localbucket.main()


if __name__ == "__main__":
    main()
