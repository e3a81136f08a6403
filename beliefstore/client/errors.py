"""Typed errors of :mod:`beliefstore.client`: one class per kind of refusal, each
carrying the API's own message (``detail``) so an agent can show or act on it.

=========================  ======  =====================================================
class                      status  meaning
=========================  ======  =====================================================
:class:`InvalidRequest`    400/422 the body or a parameter is invalid; ``detail`` names
                                   the field (FastAPI's ``[{"loc", "msg", ...}]`` list)
:class:`AuthenticationError` 401   missing, malformed, unknown or revoked API key
:class:`PermissionDenied`  403     the key's scopes do not allow it (the message says
                                   which scope to ask for)
:class:`NotFound`          404     unknown subject or belief
:class:`PayloadTooLarge`   413     body over BELIEFSTORE_MAX_BODY_BYTES
:class:`RateLimited`       429     rate limit; ``retry_after_s`` from ``Retry-After``
:class:`Unavailable`       503     the broker or the database did not answer
:class:`NotSupported`      —       the server lacks an endpoint this call needs
:class:`ConnectionFailed`  —       the API could not be reached at all
=========================  ======  =====================================================
"""

from __future__ import annotations

from typing import Any


class ClientError(Exception):
    """Base class of every error :mod:`beliefstore.client` raises."""


class APIError(ClientError):
    """The API answered with an error status.

    Attributes:
        status: the HTTP status code.
        detail: the body's ``detail`` (a message string, or FastAPI's list of field errors).
        message: ``detail`` as one readable line (field errors joined as ``loc: msg``).
        method, url: the request that failed.
    """

    def __init__(self, status: int, detail: Any, method: str = "", url: str = "",
                 retry_after_s: float | None = None):
        self.status = status
        self.detail = detail
        self.method = method
        self.url = url
        self.retry_after_s = retry_after_s
        self.message = format_detail(detail)
        super().__init__(f"{status}: {self.message}")


class InvalidRequest(APIError):
    """400 or 422: the request is invalid; :attr:`detail` names each bad field."""


class AuthenticationError(APIError):
    """401: the API key is missing, malformed, unknown or revoked."""


class PermissionDenied(APIError):
    """403: the key may not do this (read/write scope, restricted context, source)."""


class NotFound(APIError):
    """404: unknown subject or belief (among the contexts the key may read)."""


class PayloadTooLarge(APIError):
    """413: the request body is over the server's BELIEFSTORE_MAX_BODY_BYTES."""


class RateLimited(APIError):
    """429 after the retries ran out; :attr:`retry_after_s` says when to try again."""


class Unavailable(APIError):
    """503 (or another 5xx) after the retries ran out: broker or database unreachable."""


class NotSupported(ClientError):
    """The server has no such endpoint (an older beliefstore): :attr:`endpoint` names it."""

    def __init__(self, endpoint: str, hint: str = ""):
        self.endpoint = endpoint
        super().__init__(f"the server does not support {endpoint}" + (f": {hint}" if hint else ""))


class ConnectionFailed(ClientError):
    """The API could not be reached (connection refused, timeout) after the retries."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: InvalidRequest, 401: AuthenticationError, 403: PermissionDenied, 404: NotFound,
    413: PayloadTooLarge, 422: InvalidRequest, 429: RateLimited, 503: Unavailable,
}


def error_for(status: int, detail: Any, method: str = "", url: str = "",
              retry_after_s: float | None = None) -> APIError:
    """The typed error for an HTTP error status (other 5xx: :class:`Unavailable`, other
    4xx: :class:`APIError`)."""
    cls = _BY_STATUS.get(status) or (Unavailable if status >= 500 else APIError)
    return cls(status, detail, method, url, retry_after_s)


def format_detail(detail: Any) -> str:
    """A FastAPI ``detail`` as one line: a string as is; field errors as
    ``body.confidence: must be in [0, 1]; ...``."""
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc", ()))
                parts.append(f"{loc}: {item.get('msg', '')}" if loc else str(item.get("msg", "")))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    return str(detail)


__all__ = [
    "APIError",
    "AuthenticationError",
    "ClientError",
    "ConnectionFailed",
    "InvalidRequest",
    "NotFound",
    "NotSupported",
    "PayloadTooLarge",
    "PermissionDenied",
    "RateLimited",
    "Unavailable",
    "error_for",
    "format_detail",
]
