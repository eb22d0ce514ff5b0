"""``Client`` and ``AsyncClient``: the omnistage HTTP API from Python, without torch or Ray.

Both share one core (:class:`_Core`): it builds each request, parses each response, maps error
statuses to typed exceptions and decides on retries. The two clients differ only in how they
send a request and wait between tries.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import httpx
import msgpack

from omnistage.clients import errors
from omnistage.clients.media import Audio, Video, content_part, decode_media, prepare_messages

if TYPE_CHECKING:
    from PIL.Image import Image

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_MAX_RETRIES = 2
MSGPACK = "application/msgpack"
# The server answers these only for a request it did not carry out: refused at admission (a rate
# limit, a full queue) or given up when a replica died, its downstream calls cancelled. Nothing was
# returned and nothing is kept, so sending the request again cannot make it take effect twice.
RETRY_STATUSES = frozenset({429, 503})
# The connection was never made: the server cannot have seen the request, whatever its method.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout)
# The connection failed once the request was on its way: the server may have received it and be
# running it, so only an idempotent call is sent again (a chat or a generation would run twice).
_MAYBE_SENT = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
_IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

_GENERATION_PATHS = {"image": "/v1/images/generations", "video": "/v1/videos/generations", "audio": "/v1/audio/generations"}

Transport = Literal["msgpack", "json"]


# --- results ------------------------------------------------------------------------------------


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass
class ChatResult:
    """One chat answer. ``media`` holds generated media, decoded: PIL images, :class:`Audio` and
    :class:`Video` objects, in the order the server sent them. ``str(result)`` is the text."""

    text: str
    finish_reason: str | None = None
    usage: Usage | None = None
    media: list[Any] = field(default_factory=list)
    id: str | None = None
    model: str | None = None
    # A grounding model's (Kosmos-2's) phrases and their boxes: ``[{"text", "span": [start, end]
    # in text, "boxes": [[x0, y0, x1, y1], ...] in 0..1 of the image's width and height}]``; None
    # when the server's model does not ground.
    entities: list[dict[str, Any]] | None = None

    def __str__(self) -> str:
        return self.text

    @property
    def images(self) -> list[Any]:
        return [m for m in self.media if not isinstance(m, (Audio, Video))]

    @property
    def audios(self) -> list[Audio]:
        return [m for m in self.media if isinstance(m, Audio)]

    @property
    def videos(self) -> list[Video]:
        return [m for m in self.media if isinstance(m, Video)]


@dataclass
class Model:
    id: str
    created: int | None = None
    owned_by: str | None = None
    input_modalities: list[str] = field(default_factory=list)
    output_modalities: list[str] = field(default_factory=list)
    # What the model knows, for built-in presets (``description``, the shapes preset's
    # ``vocabulary``); None for a checkpoint of one's own.
    world: dict[str, Any] | None = None


@dataclass
class Health:
    """``status`` is ``ok`` or ``unavailable``; ``unavailable`` names the pools that did not answer."""

    status: str
    unavailable: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class RetryEvent:
    """What a client's ``on_retry`` callback receives before each retry of a call.

    ``error`` is why the try failed: an :class:`~omnistage.clients.OverloadedError` (503, 429) with
    the server's ``retry_after``, or a :class:`~omnistage.clients.ConnectionError`. ``attempt``
    counts retries of this call from 1; ``delay_s`` is the wait before the next try."""

    method: str
    path: str
    attempt: int
    delay_s: float
    error: errors.OmnistageError


# --- the shared core ----------------------------------------------------------------------------


@dataclass
class _Call:
    """One API call, before encoding."""

    method: str
    path: str
    body: dict[str, Any] | None = None
    stream: bool = False
    retry_statuses: frozenset[int] = RETRY_STATUSES
    ok_statuses: frozenset[int] = frozenset()  # error statuses answered as results (health: 503)

    @property
    def idempotent(self) -> bool:
        return self.method in _IDEMPOTENT_METHODS


def _parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


class _Retry:
    """Decides, after each try of one call, whether to return, raise, or wait and try again.

    Retries the statuses in ``call.retry_statuses`` (429, 503), a connection that could not be made,
    and, for idempotent calls only, a connection lost after the request was sent; at most
    ``max_retries`` times, and never past the call's deadline (``timeout`` after it started).
    The wait is exponential backoff with full jitter, and at least the server's ``Retry-After``.
    """

    def __init__(self, core: _Core, call: _Call):
        self.core, self.call = core, call
        self.deadline = time.monotonic() + core.timeout
        self.attempt = 0

    def timeout(self) -> httpx.Timeout:
        """What is left of the deadline, for this try (at least a moment, so it fails cleanly)."""
        return httpx.Timeout(max(self.deadline - time.monotonic(), 0.001))

    def backoff(self, retry_after: float | None) -> float:
        ceiling = min(self.core.backoff_max_s, self.core.backoff_base_s * 2**self.attempt)
        delay = random.uniform(0, ceiling)
        return delay if retry_after is None else max(retry_after, delay)

    def after(self, outcome: httpx.Response | Exception) -> float | None:
        """None: ``outcome`` is the answer. A number: wait that long and try again.
        Otherwise raises the typed error."""
        if isinstance(outcome, httpx.Response):
            status = outcome.status_code
            if status < 400 or status in self.call.ok_statuses:
                return None
            error: errors.OmnistageError = self.core.error(outcome)
            retryable = status in self.call.retry_statuses
            retry_after = getattr(error, "retry_after", None)
        else:
            error = self.core.transport_error(outcome)
            retryable = isinstance(outcome, _NOT_SENT) or (self.call.idempotent and isinstance(outcome, _MAYBE_SENT))
            retry_after = None
        if not retryable or self.attempt >= self.core.max_retries:
            raise error from (outcome if isinstance(outcome, Exception) else None)
        delay = self.backoff(retry_after)
        if time.monotonic() + delay >= self.deadline:
            raise error from (outcome if isinstance(outcome, Exception) else None)
        self.attempt += 1
        if self.core.on_retry is not None:
            self.core.on_retry(RetryEvent(self.call.method, self.call.path, self.attempt, delay, error))
        return delay


class _StreamState:
    """Parses a chat stream's server-sent events; collects what follows the text."""

    def __init__(self, core: _Core):
        self.core = core
        self.text = ""
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.media: list[Any] = []
        self.entities: list[dict[str, Any]] | None = None
        self.id: str | None = None
        self.done = False

    def feed(self, line: str) -> list[str]:
        """Text deltas in one line of the event stream (most lines carry one or none)."""
        if not line.startswith("data:"):
            return []
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            self.done = True
            return []
        event = json.loads(data)
        if "error" in event:
            error = event["error"] or {}
            status = error.get("code") if isinstance(error.get("code"), int) else 500
            # Headers went out before the error: its Retry-After travels in the event.
            raise self.core.api_error(status, error, body=event, retry_after=_parse_retry_after(str(event.get("retry_after") or "")))
        self.id = event.get("id", self.id)
        if event.get("usage"):
            self.usage = Usage(**event["usage"])
        deltas = []
        for choice in event.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                deltas.append(delta["content"])
            for item in delta.get("media") or []:
                self.media.append(self.core.decode_media_item(item))
            if "entities" in delta:
                self.entities = delta["entities"]
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        self.text += "".join(deltas)
        return deltas

    def check_complete(self) -> None:
        """Raises when the stream ended without ``[DONE]``: the server or the connection cut it, and
        the text so far may be partial."""
        if not self.done:
            raise errors.ConnectionError(
                f"expected the stream from {self.core.base_url} to end with [DONE], got an end after {len(self.text)} characters of text"
            )


class _StreamResult:
    """What a chat stream holds once read: ``text``, ``finish_reason``, ``usage``, ``media``,
    ``entities``."""

    _state: _StreamState

    @property
    def text(self) -> str:
        return self._state.text

    @property
    def finish_reason(self) -> str | None:
        return self._state.finish_reason

    @property
    def usage(self) -> Usage | None:
        return self._state.usage

    @property
    def media(self) -> list[Any]:
        return self._state.media

    @property
    def entities(self) -> list[dict[str, Any]] | None:
        return self._state.entities

    def result(self) -> ChatResult:
        """The whole answer as a :class:`ChatResult` (after the stream is read)."""
        s = self._state
        return ChatResult(text=s.text, finish_reason=s.finish_reason, usage=s.usage, media=s.media, id=s.id, entities=s.entities)


def _as_list(value: Any, single: tuple[type, ...] = ()) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, list) or (isinstance(value, tuple) and not isinstance(value, single)):
        return list(value)
    return [value]


class _Core:
    """Request building, response parsing, errors and retry policy shared by both clients."""

    def __init__(
        self,
        base_url: str | None,
        api_key: str | None,
        timeout: float,
        max_retries: int,
        transport: Transport,
        model: str | None,
        on_retry: Callable[[RetryEvent], None] | None = None,
    ):
        if transport not in ("msgpack", "json"):
            raise ValueError(f"expected transport 'msgpack' or 'json', got {transport!r}")
        if max_retries < 0:
            raise ValueError(f"expected max_retries >= 0, got {max_retries}")
        url = (base_url or os.environ.get("OMNISTAGE_URL") or DEFAULT_URL).rstrip("/")
        # Accept the OpenAI-style base URL (".../v1") as well as the server root.
        self.base_url = url[: -len("/v1")] if url.endswith("/v1") else url
        self.api_key = api_key if api_key is not None else os.environ.get("OMNISTAGE_API_KEY")
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.binary = transport == "msgpack"
        self.model = model
        self.on_retry = on_retry
        self.backoff_base_s = 0.5
        self.backoff_max_s = 8.0

    # Requests

    def headers(self) -> dict[str, str]:
        headers = {"User-Agent": "omnistage-client"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def request(self, call: _Call, retry: _Retry) -> httpx.Request:
        headers = self.headers()
        content = None
        if call.body is not None:
            if self.binary:
                content = msgpack.packb(call.body, use_bin_type=True)
                headers["Content-Type"] = MSGPACK
            else:
                content = json.dumps(call.body).encode()
                headers["Content-Type"] = "application/json"
        headers["Accept"] = "text/event-stream" if call.stream else (MSGPACK if self.binary and call.body is not None else "application/json")
        return httpx.Request(
            call.method, self.base_url + call.path, content=content, headers=headers,
            extensions={"timeout": retry.timeout().as_dict()},
        )

    def chat_call(
        self,
        messages: str | list[dict[str, Any]] | None,
        *,
        prompt: str | None,
        images: Any,
        audio: Any,
        videos: Any,
        stream: bool,
        model: str | None,
        modalities: list[str] | None,
        **options: Any,
    ) -> _Call:
        media = [("image", v) for v in _as_list(images)]
        media += [("video", v) for v in _as_list(videos)]
        media += [("audio", v) for v in _as_list(audio, single=(tuple,))]
        if isinstance(messages, str):  # chat("hello"): a plain prompt in the first place
            if prompt is not None:
                raise ValueError("expected the prompt either as the first argument or as prompt=, got both")
            messages, prompt = None, messages
        if messages is None:
            if prompt is None:
                raise ValueError("expected messages or a prompt, got neither")
            parts = [content_part(m, v, binary=self.binary) for m, v in media]
            content: Any = [*parts, {"type": "text", "text": prompt}] if parts else prompt
            messages = [{"role": "user", "content": content}]
        else:
            if prompt is not None or media:
                raise ValueError("expected either messages or prompt/images/audio/videos, got both")
            messages = prepare_messages(messages, binary=self.binary)
        body: dict[str, Any] = {"messages": messages}
        if model or self.model:
            body["model"] = model or self.model
        if modalities:
            body["modalities"] = list(modalities)
        body.update({k: v for k, v in options.items() if v is not None})
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return _Call("POST", "/v1/chat/completions", body, stream=stream)

    def generation_call(self, modality: str, prompt: str, model: str | None, **options: Any) -> _Call:
        body = {"prompt": prompt, **{k: v for k, v in options.items() if v is not None}}
        if model or self.model:
            body["model"] = model or self.model
        return _Call("POST", _GENERATION_PATHS[modality], body)

    # Responses

    def decode(self, response: httpx.Response) -> Any:
        content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == MSGPACK:
            return msgpack.unpackb(response.content, raw=False)
        return response.json()

    def _bytes(self, value: Any) -> bytes:
        return value if isinstance(value, (bytes, bytearray)) else base64.b64decode(value)

    def decode_media_item(self, item: dict[str, Any]) -> Any:
        return decode_media(item["type"], self._bytes(item["data"]), item.get("mime_type", ""))

    def chat_result(self, response: httpx.Response) -> ChatResult:
        body = self.decode(response)
        choice = body["choices"][0]
        message = choice.get("message") or {}
        return ChatResult(
            text=message.get("content") or "",
            finish_reason=choice.get("finish_reason"),
            usage=Usage(**body["usage"]) if body.get("usage") else None,
            media=[self.decode_media_item(m) for m in message.get("media") or []],
            id=body.get("id"),
            model=body.get("model"),
            entities=message.get("entities"),
        )

    def generation_result(self, response: httpx.Response, modality: str) -> Any:
        (item,) = self.decode(response)["data"][:1]
        return decode_media(modality, self._bytes(item["b64_json"]), item.get("mime_type", ""))

    def models(self, response: httpx.Response) -> list[Model]:
        fields = Model.__dataclass_fields__
        return [Model(**{k: v for k, v in entry.items() if k in fields}) for entry in self.decode(response)["data"]]

    def health(self, response: httpx.Response) -> Health:
        try:
            body = self.decode(response)
        except ValueError:  # a proxy's 503 page rather than the server's answer
            body = {}
        status = body.get("status") or ("ok" if response.status_code < 400 else "unavailable")
        return Health(status=status, unavailable=list(body.get("unavailable") or []))

    def stream_state(self) -> _StreamState:
        return _StreamState(self)

    # Errors

    def api_error(
        self, status: int, error: dict[str, Any], *, body: Any = None, response: httpx.Response | None = None, retry_after: float | None = None
    ) -> errors.APIError:
        headers = response.headers if response is not None else {}
        kwargs: dict[str, Any] = dict(
            status_code=status,
            type=error.get("type"),
            param=error.get("param"),
            code=error.get("code"),
            request_id=headers.get("x-request-id"),
            body=body,
        )
        cls = errors.error_class(status)
        if issubclass(cls, errors.OverloadedError):
            kwargs["retry_after"] = _parse_retry_after(headers.get("retry-after")) if retry_after is None else retry_after
        message = " ".join(str(error.get("message") or f"HTTP {status}").split())  # one line
        return cls(message, **kwargs)

    def error(self, response: httpx.Response) -> errors.APIError:
        """The typed error for an error response, with the server's message."""
        try:
            body: Any = response.json()
            error = body["error"] if isinstance(body.get("error"), dict) else {"message": str(body.get("detail") or body)}
        except (ValueError, AttributeError, KeyError):
            body = response.text
            error = {"message": body[:500] or response.reason_phrase}
        return self.api_error(response.status_code, error, body=body, response=response)

    def transport_error(self, exc: Exception) -> errors.OmnistageError:
        if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
            return errors.TimeoutError(f"no answer from {self.base_url} within the client's timeout of {self.timeout:g} s")
        detail = " ".join((str(exc) or type(exc).__name__).split())
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
            return errors.ConnectionError(f"cannot connect to {self.base_url}: {detail}")
        return errors.ConnectionError(f"the connection to {self.base_url} failed: {detail}")


# --- the clients --------------------------------------------------------------------------------

_CLIENT_DOC = """

    Args:
        base_url: the server, e.g. ``http://127.0.0.1:8000`` (a trailing ``/v1`` is accepted).
            Default: ``$OMNISTAGE_URL``, else ``http://127.0.0.1:8000``.
        api_key: sent as ``Authorization: Bearer``. Default: ``$OMNISTAGE_API_KEY``, else none.
        timeout: seconds one call may take in all, retries and their waits included.
        max_retries: extra tries after a 503, a 429 or a connection that could not be made; a
            connection lost once the request was sent is retried for GETs only, never for a chat
            or a generation, which the server may be running already. Other statuses: never.
        transport: ``msgpack`` (default: media travel as raw bytes) or ``json`` (base64).
        model: the model to ask for in every call (default: the server's own).
        on_retry: called with a :class:`RetryEvent` before each retry, e.g. to count or log
            retries; it runs on the calling thread (or event loop), so it should return quickly.
"""


class Client:
    """The omnistage API, synchronous. Use as a context manager or call :meth:`close`."""

    __doc__ = (__doc__ or "") + _CLIENT_DOC

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        max_retries: int = DEFAULT_MAX_RETRIES,
        transport: Transport = "msgpack",
        model: str | None = None,
        on_retry: Callable[[RetryEvent], None] | None = None,
    ):
        self._core = _Core(base_url, api_key, timeout, max_retries, transport, model, on_retry)
        self._http = httpx.Client(timeout=timeout)

    @property
    def base_url(self) -> str:
        return self._core.base_url

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # Transport: the only part not shared with AsyncClient.

    def _send(self, call: _Call) -> httpx.Response:
        retry = _Retry(self._core, call)
        while True:
            try:
                response = self._http.send(self._core.request(call, retry), stream=call.stream)
                if call.stream and response.is_error:
                    response.read()
                    response.close()
                outcome: httpx.Response | Exception = response
            except httpx.TransportError as exc:
                outcome = exc
            delay = retry.after(outcome)
            if delay is None:
                return response
            time.sleep(delay)

    # API

    def chat(
        self,
        messages: str | list[dict[str, Any]] | None = None,
        *,
        prompt: str | None = None,
        images: Any = None,
        audio: Any = None,
        videos: Any = None,
        model: str | None = None,
        modalities: list[str] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | list[str] | None = None,
    ) -> ChatResult:
        """Ask the model. Give OpenAI-style ``messages``, or a ``prompt`` (also as a plain string
        in the first place: ``chat("hello")``) with ``images``, ``audio`` and ``videos`` (each one
        item or a list; an item is a path or ``file://`` URL, bytes, a PIL image or numpy array,
        or for audio ``(samples, sampling_rate)``). ``modalities`` such as
        ``["text", "image"]`` ask for generated media, returned decoded in ``result.media``."""
        call = self._core.chat_call(
            messages, prompt=prompt, images=images, audio=audio, videos=videos, stream=False, model=model,
            modalities=modalities, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop,
        )
        return self._core.chat_result(self._send(call))

    def chat_stream(
        self,
        messages: str | list[dict[str, Any]] | None = None,
        *,
        prompt: str | None = None,
        images: Any = None,
        audio: Any = None,
        videos: Any = None,
        model: str | None = None,
        modalities: list[str] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | list[str] | None = None,
    ) -> ChatStream:
        """Like :meth:`chat`, but yields the answer's text deltas as they are generated.
        The request is sent when iteration starts; afterwards the stream holds ``text``,
        ``finish_reason``, ``usage``, ``media`` and ``entities``."""
        call = self._core.chat_call(
            messages, prompt=prompt, images=images, audio=audio, videos=videos, stream=True, model=model,
            modalities=modalities, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop,
        )
        return ChatStream(self, call)

    def caption(self, image: Any, prompt: str = "Describe this image.", **options: Any) -> str:
        """The model's answer about one image (a path, bytes, PIL image or array)."""
        return self.chat(prompt=prompt, images=[image], **options).text

    def generate_image(self, prompt: str, *, size: str | None = None, seed: int | None = None, model: str | None = None) -> Image:
        """A generated image, as a PIL image (``size`` is ``"WIDTHxHEIGHT"``)."""
        return self._core.generation_result(self._send(self._core.generation_call("image", prompt, model, size=size, seed=seed)), "image")

    def generate_audio(self, prompt: str, *, duration_s: float | None = None, seed: int | None = None, model: str | None = None) -> Audio:
        """A generated clip: ``.samples`` (float32) and ``.sampling_rate``; ``.save(path)``."""
        call = self._core.generation_call("audio", prompt, model, duration_s=duration_s, seed=seed)
        return self._core.generation_result(self._send(call), "audio")

    def generate_video(
        self, prompt: str, *, size: str | None = None, num_frames: int | None = None, seed: int | None = None, model: str | None = None
    ) -> Video:
        """A generated video: ``.frames`` ``(T, H, W, 3)`` uint8 and ``.fps``; ``.save(path)``."""
        call = self._core.generation_call("video", prompt, model, size=size, num_frames=num_frames, seed=seed)
        return self._core.generation_result(self._send(call), "video")

    def models(self) -> list[Model]:
        """The models the server serves, with their input and output modalities."""
        return self._core.models(self._send(_Call("GET", "/v1/models")))

    def health(self) -> Health:
        """Whether every stage pool answers (a 503 from the server is a result here, not an error)."""
        return self._core.health(self._send(_Call("GET", "/healthz", retry_statuses=frozenset(), ok_statuses=frozenset({503}))))


class ChatStream(_StreamResult):
    """Text deltas of a streamed chat answer; iterate once. Use ``with`` (or :meth:`close`) to
    stop early and free the connection."""

    def __init__(self, client: Client, call: _Call):
        self._client, self._call = client, call
        self._state = client._core.stream_state()
        self._deltas = self._iterate()

    def _iterate(self) -> Iterator[str]:
        response = self._client._send(self._call)
        try:
            for line in response.iter_lines():
                yield from self._state.feed(line)
            self._state.check_complete()
        except httpx.TransportError as exc:
            raise self._client._core.transport_error(exc) from exc
        finally:
            response.close()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._deltas)

    def close(self) -> None:
        self._deltas.close()

    def __enter__(self) -> ChatStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncClient:
    """The omnistage API for asyncio: the same methods as :class:`Client`, awaited.
    ``chat_stream`` returns an async iterator. Use ``async with`` or call :meth:`aclose`."""

    __doc__ = (__doc__ or "") + _CLIENT_DOC

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        max_retries: int = DEFAULT_MAX_RETRIES,
        transport: Transport = "msgpack",
        model: str | None = None,
        on_retry: Callable[[RetryEvent], None] | None = None,
    ):
        self._core = _Core(base_url, api_key, timeout, max_retries, transport, model, on_retry)
        self._http = httpx.AsyncClient(timeout=timeout)

    @property
    def base_url(self) -> str:
        return self._core.base_url

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    # Transport: the only part not shared with Client.

    async def _send(self, call: _Call) -> httpx.Response:
        retry = _Retry(self._core, call)
        while True:
            try:
                response = await self._http.send(self._core.request(call, retry), stream=call.stream)
                if call.stream and response.is_error:
                    await response.aread()
                    await response.aclose()
                outcome: httpx.Response | Exception = response
            except httpx.TransportError as exc:
                outcome = exc
            delay = retry.after(outcome)
            if delay is None:
                return response
            await asyncio.sleep(delay)

    # API

    async def chat(
        self,
        messages: str | list[dict[str, Any]] | None = None,
        *,
        prompt: str | None = None,
        images: Any = None,
        audio: Any = None,
        videos: Any = None,
        model: str | None = None,
        modalities: list[str] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | list[str] | None = None,
    ) -> ChatResult:
        """See :meth:`Client.chat`."""
        call = self._core.chat_call(
            messages, prompt=prompt, images=images, audio=audio, videos=videos, stream=False, model=model,
            modalities=modalities, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop,
        )
        return self._core.chat_result(await self._send(call))

    def chat_stream(
        self,
        messages: str | list[dict[str, Any]] | None = None,
        *,
        prompt: str | None = None,
        images: Any = None,
        audio: Any = None,
        videos: Any = None,
        model: str | None = None,
        modalities: list[str] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | list[str] | None = None,
    ) -> AsyncChatStream:
        """See :meth:`Client.chat_stream`; iterate with ``async for`` (no ``await`` on the call)."""
        call = self._core.chat_call(
            messages, prompt=prompt, images=images, audio=audio, videos=videos, stream=True, model=model,
            modalities=modalities, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop,
        )
        return AsyncChatStream(self, call)

    async def caption(self, image: Any, prompt: str = "Describe this image.", **options: Any) -> str:
        """See :meth:`Client.caption`."""
        return (await self.chat(prompt=prompt, images=[image], **options)).text

    async def generate_image(self, prompt: str, *, size: str | None = None, seed: int | None = None, model: str | None = None) -> Image:
        """See :meth:`Client.generate_image`."""
        call = self._core.generation_call("image", prompt, model, size=size, seed=seed)
        return self._core.generation_result(await self._send(call), "image")

    async def generate_audio(self, prompt: str, *, duration_s: float | None = None, seed: int | None = None, model: str | None = None) -> Audio:
        """See :meth:`Client.generate_audio`."""
        call = self._core.generation_call("audio", prompt, model, duration_s=duration_s, seed=seed)
        return self._core.generation_result(await self._send(call), "audio")

    async def generate_video(
        self, prompt: str, *, size: str | None = None, num_frames: int | None = None, seed: int | None = None, model: str | None = None
    ) -> Video:
        """See :meth:`Client.generate_video`."""
        call = self._core.generation_call("video", prompt, model, size=size, num_frames=num_frames, seed=seed)
        return self._core.generation_result(await self._send(call), "video")

    async def models(self) -> list[Model]:
        """See :meth:`Client.models`."""
        return self._core.models(await self._send(_Call("GET", "/v1/models")))

    async def health(self) -> Health:
        """See :meth:`Client.health`."""
        return self._core.health(await self._send(_Call("GET", "/healthz", retry_statuses=frozenset(), ok_statuses=frozenset({503}))))


class AsyncChatStream(_StreamResult):
    """Text deltas of a streamed chat answer, for ``async for``; :meth:`aclose` stops early."""

    def __init__(self, client: AsyncClient, call: _Call):
        self._client, self._call = client, call
        self._state = client._core.stream_state()
        self._deltas = self._iterate()

    async def _iterate(self) -> AsyncIterator[str]:
        response = await self._client._send(self._call)
        try:
            async for line in response.aiter_lines():
                for delta in self._state.feed(line):
                    yield delta
            self._state.check_complete()
        except httpx.TransportError as exc:
            raise self._client._core.transport_error(exc) from exc
        finally:
            await response.aclose()

    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def __anext__(self) -> str:
        return await self._deltas.__anext__()

    async def aclose(self) -> None:
        await self._deltas.aclose()

    async def __aenter__(self) -> AsyncChatStream:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()
