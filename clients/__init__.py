"""The omnistage client: a Python SDK (``Client``, ``AsyncClient``) and the ``omnistage`` command
line, for applications that call an omnistage server over HTTP.

Importing this package loads neither torch, transformers, diffusers nor ray: ``pip install
omnistage`` (no extras) is enough to use it. See ``docs/client.md``.

    from omnistage.clients import Client

    with Client("http://127.0.0.1:8000") as client:
        print(client.caption("cat.png"))

The names below load on first use, so ``import omnistage.clients`` (and the ``omnistage``
command, which lives here) stays quick.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "omnistage.clients.errors": (
        "APIError", "APITimeoutError", "AuthenticationError", "BadRequestError", "ConnectionError", "NotFoundError",
        "OmnistageError", "OverloadedError", "PayloadTooLargeError", "RateLimitError", "ServerError", "TimeoutError",
        "UnsupportedMediaTypeError",
    ),
    "omnistage.clients.media": ("Audio", "Video"),
    "omnistage.clients.sdk": ("AsyncChatStream", "AsyncClient", "ChatResult", "ChatStream", "Client", "Health", "Model", "RetryEvent", "Usage"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:
    from omnistage.clients.errors import (
        APIError,
        APITimeoutError,
        AuthenticationError,
        BadRequestError,
        ConnectionError,
        NotFoundError,
        OmnistageError,
        OverloadedError,
        PayloadTooLargeError,
        RateLimitError,
        ServerError,
        TimeoutError,
        UnsupportedMediaTypeError,
    )
    from omnistage.clients.media import Audio, Video
    from omnistage.clients.sdk import AsyncChatStream, AsyncClient, ChatResult, ChatStream, Client, Health, Model, RetryEvent, Usage
