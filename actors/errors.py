"""Errors raised for bad input, and the HTTP status of each error class.

Each message names what was expected and what was received. ``STATUSES`` is the one table of
what an error status means: the server answers with its OpenAI ``error.type``, and the client SDK
picks its exception class by its ``kind``. This module imports nothing, so the client-only install
can use it.
"""

from __future__ import annotations

from typing import NamedTuple


class Status(NamedTuple):
    type: str  # OpenAI's error.type in the body
    kind: str  # what went wrong; the client SDK has one exception class per kind


STATUSES: dict[int, Status] = {
    400: Status("invalid_request_error", "bad_request"),
    401: Status("authentication_error", "authentication"),
    # Servers behind a gateway may refuse a key that is valid but not allowed.
    403: Status("permission_error", "authentication"),
    404: Status("not_found_error", "not_found"),
    408: Status("timeout_error", "timeout"),
    413: Status("invalid_request_error", "payload_too_large"),
    415: Status("invalid_request_error", "unsupported_media_type"),
    # FastAPI's own answer to a body it cannot validate.
    422: Status("invalid_request_error", "bad_request"),
    429: Status("rate_limit_error", "rate_limit"),
    503: Status("overloaded_error", "overloaded"),
}
# Any status outside the table: 5xx are the server's failures; other 4xx have no kind of their own.
SERVER_ERROR = Status("server_error", "server_error")
OTHER_ERROR = Status("invalid_request_error", "other")


def status_of(code: int) -> Status:
    """What an HTTP error status means, for one outside the table too."""
    return STATUSES.get(code) or (SERVER_ERROR if code >= 500 else OTHER_ERROR)


class InvalidInputError(ValueError):
    """The request's content is malformed or outside what the model accepts (HTTP 400)."""

    status_code = 400


class UnsupportedMediaError(InvalidInputError):
    """The media format or modality is not one this deployment accepts (HTTP 415)."""

    status_code = 415


class PayloadTooLargeError(InvalidInputError):
    """The media exceed a configured size limit (HTTP 413)."""

    status_code = 413


class OverloadedError(RuntimeError):
    """The stage cannot take more work now; the request may be retried (HTTP 503, Retry-After)."""

    status_code = 503
