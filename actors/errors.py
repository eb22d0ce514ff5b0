"""Errors raised for bad input. Each message names what was expected and what was received."""


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
