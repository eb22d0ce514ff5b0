"""Typed errors of the client SDK.

Every error the SDK raises for a failed call is an :class:`OmnistageError`. Errors the server
answered carry its status and message (``APIError`` and subclasses, one per status); errors of
the connection itself are :class:`ConnectionError` and :class:`TimeoutError`, which are also the
builtin exceptions of the same names, so ``except OSError`` catches them too.
"""

from __future__ import annotations

import builtins
from typing import Any

from omnistage.actors.errors import status_of


class OmnistageError(Exception):
    """Base class of every error the SDK raises for a failed call."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ConnectionError(OmnistageError, builtins.ConnectionError):  # noqa: A001 - the name users expect
    """The server could not be reached, or dropped the connection (after retries)."""


class TimeoutError(OmnistageError, builtins.TimeoutError):  # noqa: A001
    """The call ran past the client's ``timeout``, or the server answered 408."""

    status_code: int | None = None


class APIError(OmnistageError):
    """The server answered with an error status.

    Attributes:
        status_code: the HTTP status.
        message: the server's ``error.message``.
        type: the server's ``error.type`` (e.g. ``invalid_request_error``).
        param, code: the server's ``error.param`` and ``error.code``.
        request_id: the ``X-Request-ID`` the server answered with (it is in the server's logs).
        body: the whole error body as parsed, or the raw text when it was not JSON.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        type: str | None = None,  # noqa: A002 - OpenAI's field name
        param: str | None = None,
        code: Any = None,
        request_id: str | None = None,
        body: Any = None,
    ):
        super().__init__(message)
        self.status_code = status_code
        self.type = type
        self.param = param
        self.code = code
        self.request_id = request_id
        self.body = body

    def __str__(self) -> str:
        return f"{self.message} (HTTP {self.status_code})"


class BadRequestError(APIError):
    """400 (and 422): the request is malformed, e.g. an image that does not decode."""


class AuthenticationError(APIError):
    """401 or 403: the API key is missing, wrong or not allowed to do this."""


class NotFoundError(APIError):
    """404: an unknown model or route, or a medium the model does not generate."""


class PayloadTooLargeError(APIError):
    """413: the request body or one of its media is over the server's limit."""


class UnsupportedMediaTypeError(APIError):
    """415: a content type, media format or modality the server does not accept."""


class OverloadedError(APIError):
    """503: the server is at capacity or a replica is down. ``retry_after`` is the server's
    ``Retry-After`` in seconds, or None when it sent none."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any):
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class RateLimitError(OverloadedError):
    """429: too many requests; also an :class:`OverloadedError`, with ``retry_after``."""


class APITimeoutError(APIError, TimeoutError):
    """408: the server gave up on the request; also a :class:`TimeoutError`."""


class ServerError(APIError):
    """500 and other 5xx except 503: the server failed."""


# The client's exception class for each kind of error status in the server's table.
_BY_KIND: dict[str, type[APIError]] = {
    "bad_request": BadRequestError,
    "authentication": AuthenticationError,
    "not_found": NotFoundError,
    "timeout": APITimeoutError,
    "payload_too_large": PayloadTooLargeError,
    "unsupported_media_type": UnsupportedMediaTypeError,
    "rate_limit": RateLimitError,
    "overloaded": OverloadedError,
    "server_error": ServerError,
    "other": APIError,
}


def error_class(status: int) -> type[APIError]:
    """The exception class for an HTTP error status."""
    return _BY_KIND[status_of(status).kind]
