"""The client SDK and the client commands of the CLI.

Retries and typed errors the live app cannot produce (503 with Retry-After, 429, 401, 500,
dropped connections) are tested against a small HTTP server on a real loopback socket. Everything
else runs against the session's one live Serve app (``serve_url``), in msgpack and JSON.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import http.server
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from omnistage.actors.media import encode_png, encode_video, encode_wav
from omnistage.clients import (
    APIError,
    AsyncClient,
    Audio,
    AuthenticationError,
    BadRequestError,
    Client,
    NotFoundError,
    OmnistageError,
    OverloadedError,
    PayloadTooLargeError,
    RateLimitError,
    ServerError,
    UnsupportedMediaTypeError,
    Video,
)
from omnistage.clients import ConnectionError as ClientConnectionError
from omnistage.clients.cli import main
from omnistage.pipelines.demo import sample_audio, sample_image, sample_video

PNG = encode_png(sample_image())
WAV = encode_wav(*sample_audio())
MP4 = encode_video(sample_video(), fps=8)
ASK = dict(max_tokens=6, seed=0, temperature=0)


# --- a small scripted HTTP server on a real socket -----------------------------------------------


class StubServer:
    """Answers each request with the next scripted reply: ``(status, headers, body)`` (a body of
    bytes is sent as it is, anything else as JSON), or "drop" to close the connection without
    answering once the request is read. Records what it received. Made with ``listen=False``, its
    port is bound but refuses connections until :meth:`listen`."""

    def __init__(self, listen: bool = True):
        self.replies: list = []
        self.requests: list[dict] = []
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _answer(self):
                length = int(self.headers.get("content-length") or 0)
                stub.requests.append(
                    {"time": time.monotonic(), "method": self.command, "path": self.path, "headers": dict(self.headers), "body": self.rfile.read(length)}
                )
                reply = stub.replies.pop(0) if len(stub.replies) > 1 else stub.replies[0]
                if reply == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                status, headers, body = reply
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                for key, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
        self.server.server_bind()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        if listen:
            self.listen()

    def listen(self):
        self.server.server_activate()
        self.thread.start()

    def close(self):
        if self.thread.is_alive():
            self.server.shutdown()
        self.server.server_close()


MODELS = {"object": "list", "data": [{"id": "stub-model", "object": "model", "created": 1, "owned_by": "omnistage",
                                       "input_modalities": ["text", "image"], "output_modalities": ["text"]}]}


def _error(status, message, kind="invalid_request_error"):
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


@pytest.fixture()
def stub():
    server = StubServer()
    yield server
    server.close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- import cost and packaging ------------------------------------------------------------------


def test_import_loads_no_server_libraries():
    """In a fresh interpreter: importing the client, building requests with media and decoding
    responses loads none of the server stack (a client-only install has none of it), and the
    media codecs load only once a medium is encoded."""
    code = (
        "import json, sys, numpy as np\n"
        "def loaded(*names): return sorted(m for m in sys.modules if m.split('.')[0] in names)\n"
        "codecs = ('av', 'soundfile', 'PIL')\n"
        "import omnistage.clients, omnistage.clients.cli\n"
        "after_import = loaded(*codecs)\n"
        "from omnistage.clients import Client, AsyncClient\n"
        "from omnistage.clients.media import content_part, decode_media\n"
        "Client('http://127.0.0.1:1').close()\n"
        "AsyncClient('http://127.0.0.1:1')\n"
        "content_part('image', 'data:image/png;base64,AA==', binary=False)\n"
        "after_client = loaded(*codecs)\n"
        "from omnistage.actors.media import encode_wav\n"
        "content_part('image', np.zeros((4, 4, 3), np.uint8), binary=False)\n"
        "content_part('video', np.zeros((2, 4, 4, 3), np.uint8), binary=True)\n"
        "content_part('audio', (np.zeros(160, np.float32), 16000), binary=False)\n"
        "decode_media('audio', encode_wav(np.zeros(160, np.float32), 16000), 'audio/wav')\n"
        "heavy = ('torch', 'ray', 'transformers', 'diffusers', 'scipy', 'pydantic', 'yaml', 'structlog', 'fastapi')\n"
        "print(json.dumps({'after_import': after_import, 'after_client': after_client, 'server': loaded(*heavy),\n"
        "                  'with_media': sorted({m.split('.')[0] for m in loaded(*codecs)})}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"after_import": [], "after_client": [], "server": [], "with_media": ["PIL", "av", "soundfile"]}


def test_client_only_dependencies_are_the_base_install():
    import tomllib

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"])
    for heavy in ("torch", "transformers", "diffusers", "ray", "scipy"):
        assert heavy not in base
    assert any(d.startswith("torch==") for d in project["optional-dependencies"]["server"])


# --- retries, backoff and typed errors from a local server --------------------------------------


@pytest.mark.parametrize("status", [503, 429])
def test_retries_after_the_servers_retry_after(stub, status):
    stub.replies = [(status, {"Retry-After": "1"}, _error(status, "busy", "overloaded_error")), (200, {}, MODELS)]
    with Client(stub.url, max_retries=2, timeout=30) as client:
        start = time.monotonic()
        models = client.models()
        elapsed = time.monotonic() - start
    assert [m.id for m in models] == ["stub-model"] and models[0].input_modalities == ["text", "image"]
    assert len(stub.requests) == 2
    assert stub.requests[1]["time"] - stub.requests[0]["time"] >= 1.0 and elapsed >= 1.0


def test_async_client_retries_too(stub):
    stub.replies = [(503, {"Retry-After": "1"}, _error(503, "busy", "overloaded_error")), (200, {}, MODELS)]

    async def run():
        async with AsyncClient(stub.url, max_retries=1) as client:
            return await client.models()

    start = time.monotonic()
    assert asyncio.run(run())[0].id == "stub-model"
    assert time.monotonic() - start >= 1.0 and len(stub.requests) == 2


def test_on_retry_sees_each_retry_with_its_cause(stub):
    stub.replies = [
        (503, {"Retry-After": "0"}, _error(503, "busy", "overloaded_error")),
        (429, {"Retry-After": "0"}, _error(429, "slow down", "rate_limit_error")),
        (200, {}, MODELS),
    ]
    seen = []
    with Client(stub.url, max_retries=2, on_retry=seen.append) as client:
        assert client.models()[0].id == "stub-model"
    assert [(e.method, e.path, e.attempt, type(e.error), e.error.retry_after) for e in seen] == [
        ("GET", "/v1/models", 1, OverloadedError, 0.0),
        ("GET", "/v1/models", 2, RateLimitError, 0.0),
    ]
    assert all(0 <= e.delay_s <= 2 for e in seen) and len(stub.requests) == 3


def test_a_cut_stream_raises_and_a_stream_error_carries_retry_after(stub):
    started = b'data: {"choices": [{"index": 0, "delta": {"content": "hi "}}]}\n\n'
    unavailable = json.dumps({**_error(503, "a model replica became unavailable", "overloaded_error"), "retry_after": 1}).encode()
    events = {"Content-Type": "text/event-stream"}
    with Client(stub.url, transport="json", max_retries=0) as client:
        stub.replies = [(200, events, started)]
        stream = client.chat_stream("hello")
        with pytest.raises(ClientConnectionError, match=r"to end with \[DONE\], got an end after 3 characters of text"):
            list(stream)
        assert stream.text == "hi "
        stub.replies = [(200, events, started + b"data: " + unavailable + b"\n\ndata: [DONE]\n\n")]
        with pytest.raises(OverloadedError) as caught:
            list(client.chat_stream("hello"))
        assert caught.value.status_code == 503 and caught.value.retry_after == 1.0

    async def cut():
        stub.replies = [(200, events, started)]
        async with AsyncClient(stub.url, transport="json") as client:
            return [delta async for delta in client.chat_stream("hello")]

    with pytest.raises(ClientConnectionError, match=r"to end with \[DONE\]"):
        asyncio.run(cut())


def test_no_retry_on_400(stub):
    stub.replies = [(400, {}, _error(400, "expected something else")), (200, {}, MODELS)]
    with Client(stub.url, max_retries=5) as client, pytest.raises(BadRequestError) as caught:
        client.chat(prompt="hi")
    assert len(stub.requests) == 1
    assert caught.value.status_code == 400 and caught.value.message == "expected something else"
    assert caught.value.type == "invalid_request_error"


def test_overloaded_error_carries_retry_after(stub):
    stub.replies = [(503, {"Retry-After": "1"}, _error(503, "the server is at capacity", "overloaded_error"))]
    with Client(stub.url, max_retries=0) as client, pytest.raises(OverloadedError) as caught:
        client.generate_image("a cat")
    error = caught.value
    assert error.status_code == 503 and error.retry_after == 1.0 and "at capacity" in str(error)
    assert not isinstance(error, RateLimitError) and len(stub.requests) == 1


def test_retries_are_bounded_by_max_retries_and_the_timeout(stub):
    stub.replies = [(429, {"Retry-After": "0"}, _error(429, "slow down", "rate_limit_error"))]
    with Client(stub.url, max_retries=2) as client, pytest.raises(RateLimitError) as caught:
        client.models()
    assert len(stub.requests) == 3 and caught.value.retry_after == 0.0
    # A Retry-After beyond what is left of the timeout fails now instead of waiting past it.
    stub.requests.clear()
    stub.replies = [(503, {"Retry-After": "30"}, _error(503, "busy", "overloaded_error"))]
    with Client(stub.url, max_retries=3, timeout=3) as client, pytest.raises(OverloadedError) as caught:
        start = time.monotonic()
        client.models()
    assert time.monotonic() - start < 2 and len(stub.requests) == 1 and caught.value.retry_after == 30.0


def test_backoff_is_exponential_with_full_jitter():
    from omnistage.clients.sdk import _Call, _Retry

    with Client("http://127.0.0.1:1") as client:
        retry = _Retry(client._core, _Call("GET", "/v1/models"))
    for attempt in range(6):
        retry.attempt = attempt
        ceiling = min(8.0, 0.5 * 2**attempt)
        delays = [retry.backoff(None) for _ in range(300)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > 0.8 * ceiling and min(delays) < 0.2 * ceiling  # spread over the whole range
        assert all(retry.backoff(2.5) >= 2.5 for _ in range(50))


def test_connection_errors_are_retried_then_typed(stub):
    stub.replies = ["drop", (200, {}, MODELS)]
    with Client(stub.url, max_retries=1) as client:
        assert client.models()[0].id == "stub-model"
    assert len(stub.requests) == 2
    with Client(f"http://127.0.0.1:{_closed_port()}", max_retries=1, timeout=10) as client, pytest.raises(ClientConnectionError) as caught:
        client.health()
    assert isinstance(caught.value, builtins.ConnectionError) and "cannot connect" in str(caught.value)


def test_a_refused_connection_is_retried_for_every_call(monkeypatch):
    """Refused: the request never left the client, so even a chat is sent again. The port starts
    listening once the client has seen its first refusal."""
    from omnistage.clients import sdk

    stub = StubServer(listen=False)
    stub.replies = [(200, {}, CHAT)]
    refusals = []
    after = sdk._Retry.after

    def listen_after_the_first_refusal(retry, outcome):
        if isinstance(outcome, httpx.ConnectError) and not refusals:
            refusals.append(outcome)
            stub.listen()
        return after(retry, outcome)

    monkeypatch.setattr(sdk._Retry, "after", listen_after_the_first_refusal)
    try:
        with Client(stub.url, max_retries=1, timeout=30) as client:
            assert client.chat("hello").text == "hi there"
    finally:
        stub.close()
    assert len(refusals) == 1 and "refused" in str(refusals[0]).lower()
    assert [(r["method"], r["path"]) for r in stub.requests] == [("POST", "/v1/chat/completions")]


def test_a_connection_dropped_after_the_request_is_retried_for_gets_only(stub):
    """The server read the request, then closed the connection without answering: it may be
    running it, so a chat or a generation is not sent again; a GET is."""
    stub.replies = ["drop"]
    with Client(stub.url, max_retries=3, timeout=30) as client:
        for call in (lambda: client.chat("hello"), lambda: client.generate_image("a cat"), lambda: list(client.chat_stream("hello"))):
            stub.requests.clear()
            with pytest.raises(ClientConnectionError, match="the connection to .* failed") as caught:
                call()
            assert [r["method"] for r in stub.requests] == ["POST"], caught.value
        stub.requests.clear()
        stub.replies = ["drop", (200, {}, MODELS)]
        assert client.models()[0].id == "stub-model"
    assert [(r["method"], r["path"]) for r in stub.requests] == [("GET", "/v1/models")] * 2

    async def run():
        stub.requests.clear()
        stub.replies = ["drop"]
        async with AsyncClient(stub.url, max_retries=3, timeout=30) as client:
            with pytest.raises(ClientConnectionError):
                await client.chat("hello")
            posts = len(stub.requests)
            stub.replies = ["drop", (200, {}, MODELS)]
            return posts, (await client.models())[0].id

    assert asyncio.run(run()) == (1, "stub-model")
    assert [r["method"] for r in stub.requests] == ["POST", "GET", "GET"]


@pytest.mark.parametrize(
    "status,cls",
    [(401, AuthenticationError), (403, AuthenticationError), (500, ServerError), (409, APIError)],
)
def test_other_statuses_are_typed_and_not_retried(stub, status, cls):
    stub.replies = [(status, {"X-Request-ID": "req-7"}, _error(status, f"failed with {status}", "x"))]
    with Client(stub.url, api_key="sk-test", max_retries=3) as client, pytest.raises(cls) as caught:
        client.models()
    assert type(caught.value) is cls and caught.value.status_code == status
    assert caught.value.message == f"failed with {status}" and caught.value.request_id == "req-7"
    assert len(stub.requests) == 1 and stub.requests[0]["headers"]["Authorization"] == "Bearer sk-test"


def test_server_and_client_agree_on_every_status(stub):
    from omnistage.actors import errors as server
    from omnistage.clients.errors import APITimeoutError, error_class
    from omnistage.pipelines.schemas import error_body
    from omnistage.pipelines.serve import _status_of

    client_class = {
        400: BadRequestError, 401: AuthenticationError, 403: AuthenticationError, 404: NotFoundError, 408: APITimeoutError,
        413: PayloadTooLargeError, 415: UnsupportedMediaTypeError, 422: BadRequestError, 429: RateLimitError, 503: OverloadedError,
    }
    assert set(client_class) == set(server.STATUSES)
    stub.replies = [(status, {}, error_body(f"failed with {status}", status)) for status in server.STATUSES]
    with Client(stub.url, max_retries=0) as client:
        for status, meaning in server.STATUSES.items():
            with pytest.raises(APIError) as caught:
                client.models()
            assert type(caught.value) is client_class[status], status
            assert (caught.value.status_code, caught.value.type) == (status, meaning.type)
    # What the stages raise answers with a status of the table, typed by the client as its counterpart.
    counterparts = [
        (server.InvalidInputError, BadRequestError),
        (server.UnsupportedMediaError, UnsupportedMediaTypeError),
        (server.PayloadTooLargeError, PayloadTooLargeError),
        (server.OverloadedError, OverloadedError),
    ]
    for raised, typed in counterparts:
        status, _ = _status_of(raised("x"))
        assert status == raised.status_code and status in server.STATUSES and error_class(status) is typed


def test_a_dead_replica_is_a_503_however_ray_and_serve_wrap_its_death():
    """A killed replica's death reaches the ingress as raised, inside the error of a task that read
    its output, or inside Serve's error for a call whose argument it left dead (the LLM killed
    between its reply and a signal group, which the output projector is then called with): each
    is a retryable 503. An error of the code stays a 500, whatever wraps it."""
    from types import SimpleNamespace

    from ray.exceptions import ActorDiedError, ActorUnavailableError, OwnerDiedError, RayTaskError
    from ray.serve._private.common import DeploymentID
    from ray.serve._private.router import AsyncioRouter
    from ray.serve.exceptions import RayServeException

    from omnistage.pipelines.serve import _status_of

    def in_task(exc: Exception) -> Exception:
        """``exc`` as the caller of the task that raised it receives it."""
        error = RayTaskError("handle_request_with_rejection", "Traceback", exc, proctitle="ray::", pid=1, ip="127.0.0.1")
        return error.as_instanceof_cause()

    def upstream(exc: Exception) -> Exception:
        """``exc`` as Serve's router raises it for a call one of whose arguments holds it."""
        router = SimpleNamespace(deployment_id=DeploymentID(name="output_projector", app_name="chaos"))
        return AsyncioRouter._make_upstream_crash_error(router, exc)

    died = ActorDiedError()
    deaths = [died, in_task(died), upstream(died), upstream(in_task(died)), ActorUnavailableError("gone", None)]
    deaths.append(upstream(in_task(OwnerDiedError("ab" * 14, None, ""))))
    for exc in deaths:
        assert _status_of(exc)[0] == 503, repr(exc)
    bug = KeyError("x")
    for exc in (bug, in_task(bug), upstream(bug), upstream(in_task(bug)), RayServeException("x")):
        assert _status_of(exc) == (500, "internal error"), repr(exc)


def test_requests_are_msgpack_with_raw_bytes_or_json(stub):
    import msgpack

    stub.replies = [(400, {}, _error(400, "stop here"))]
    for transport in ("msgpack", "json"):
        with Client(stub.url + "/v1", transport=transport) as client, pytest.raises(BadRequestError):
            client.chat(prompt="what?", images=PNG, audio=(sample_audio()[0], 22050))
    packed, plain = stub.requests
    assert packed["path"] == plain["path"] == "/v1/chat/completions"
    assert packed["headers"]["Content-Type"] == "application/msgpack"
    image, audio, text = msgpack.unpackb(packed["body"])["messages"][0]["content"]
    assert image["image_url"]["url"] == PNG and audio["input_audio"]["data"] == WAV
    assert audio["input_audio"]["format"] == "wav" and text == {"type": "text", "text": "what?"}
    image, audio, _ = json.loads(plain["body"])["messages"][0]["content"]
    assert image["image_url"]["url"] == "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert base64.b64decode(audio["input_audio"]["data"]) == WAV


CHAT = {"id": "c1", "model": "stub-model", "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi there"}, "finish_reason": "stop"}]}
CHAT_EVENTS = (
    b'data: {"choices": [{"index": 0, "delta": {"content": "hi "}}]}\n\n'
    b'data: {"choices": [{"index": 0, "delta": {"content": "there"}, "finish_reason": "stop"}]}\n\n'
    b"data: [DONE]\n\n"
)


def test_a_plain_string_first_is_the_prompt(stub):
    stub.replies = [(200, {}, CHAT)]
    with Client(stub.url, transport="json") as client:
        assert client.chat("hello", images=PNG).text == "hi there"
        client.chat(prompt="hello", images=PNG)
        with pytest.raises(ValueError, match=r"either as the first argument or as prompt=, got both"):
            client.chat("hello", prompt="hi")
        stub.replies = [(200, {"Content-Type": "text/event-stream"}, CHAT_EVENTS)]
        assert list(client.chat_stream("hello")) == ["hi ", "there"]
        list(client.chat_stream(prompt="hello"))

    async def run():
        async with AsyncClient(stub.url, transport="json") as client:
            deltas = [delta async for delta in client.chat_stream("hello")]
            stub.replies = [(200, {}, CHAT)]
            return deltas, (await client.chat("hello")).text

    assert asyncio.run(run()) == (["hi ", "there"], "hi there")
    bodies = [json.loads(request["body"]) for request in stub.requests]
    assert len(bodies) == 6  # the call with both forms was refused before it was sent
    image, text = bodies[0]["messages"][0]["content"]
    assert image["type"] == "image_url" and text == {"type": "text", "text": "hello"}
    assert bodies[0] == bodies[1]
    assert bodies[2] == bodies[3] == bodies[4]
    assert bodies[2]["messages"] == [{"role": "user", "content": "hello"}] and bodies[2]["stream"] is True
    assert bodies[5] == {"messages": [{"role": "user", "content": "hello"}]}


def _sent_media(request: dict) -> list[bytes]:
    """The media files of a msgpack chat request, in order, as the server receives them."""
    import msgpack

    parts = msgpack.unpackb(request["body"])["messages"][0]["content"]
    return [part[part["type"]].get("url", part[part["type"]].get("data")) for part in parts if part["type"] != "text"]


def test_media_as_people_have_them(stub, tmp_path):
    """Paths (str, Path, file:// URL with an escaped space), bytes of every buffer kind, PIL
    images, arrays and (samples, rate) all reach the server as the files they are."""
    from omnistage.actors.media import decode_audio, decode_image, decode_video

    folder = tmp_path / "my media"
    folder.mkdir()
    files = {"image": folder / "cat.png", "audio": folder / "tone.wav", "video": folder / "clip.mp4"}
    for path, data in zip(files.values(), (PNG, WAV, MP4)):
        path.write_bytes(data)
    as_files = {
        modality: [path, str(path), path.as_uri(), "file://localhost" + str(path), data, bytearray(data), memoryview(data)]
        for (modality, path), data in zip(files.items(), (PNG, WAV, MP4))
    }
    samples, rate = sample_audio()
    in_memory = {
        "image": [Image.open(io.BytesIO(PNG)), sample_image(), np.asarray(Image.open(io.BytesIO(PNG)).convert("L"))],
        "audio": [(samples, rate), Audio(samples=samples, sampling_rate=rate)],
        "video": [sample_video(), list(sample_video())],
    }
    stub.replies = [(200, {}, CHAT)]
    keyword = {"image": "images", "audio": "audio", "video": "videos"}
    with Client(stub.url) as client:
        for modality, forms in as_files.items():
            client.chat("what?", **{keyword[modality]: forms})
            assert _sent_media(stub.requests[-1]) == [files[modality].read_bytes()] * len(forms), modality
        for modality, forms in in_memory.items():
            client.chat("what?", **{keyword[modality]: forms})
        # The same forms inside OpenAI-style messages.
        parts = [{"type": "image_url", "image_url": {"url": files["image"].as_uri()}}, {"type": "image_url", "image_url": str(files["image"])},
                 {"type": "input_audio", "input_audio": files["audio"].as_uri()}, {"type": "text", "text": "what?"}]
        client.chat([{"role": "user", "content": parts}])
    images, audios, videos = (_sent_media(request) for request in stub.requests[3:6])
    expected = sample_image()
    for sent in images[:2]:
        np.testing.assert_array_equal(decode_image(sent), expected)
    np.testing.assert_array_equal(decode_image(images[2])[..., 0], np.asarray(Image.open(io.BytesIO(PNG)).convert("L")))
    for sent in audios:
        np.testing.assert_allclose(decode_audio(sent).samples, samples, atol=1e-4)
    for sent in videos:
        assert decode_video(sent).shape == sample_video().shape
    assert _sent_media(stub.requests[6]) == [PNG, PNG, WAV]
    assert len(stub.requests) == 7


def test_media_that_cannot_be_read_fail_before_sending(stub, tmp_path):
    stub.replies = [(200, {}, CHAT)]
    with Client(stub.url) as client:
        with pytest.raises(FileNotFoundError):
            client.chat("what?", images=(tmp_path / "missing.png").as_uri())
        with pytest.raises(ValueError, match=r"expected a file:// URL of a file on this machine, got one on host 'elsewhere'"):
            client.chat("what?", images="file://elsewhere/cat.png")
        with pytest.raises(ValueError, match=r"expected audio samples with their rate as \(samples, sampling_rate\), got an array"):
            client.chat("what?", audio=np.zeros(160, np.float32))
        with pytest.raises(TypeError, match="expected image as a path or file:// URL, bytes, a PIL image or an .* got dict"):
            client.chat("what?", images={"cat": 1})
    assert stub.requests == []


def test_cli_chat_takes_paths_and_file_urls(stub, tmp_path, capsys):
    path = tmp_path / "cat.png"
    path.write_bytes(PNG)
    stub.replies = [(200, {}, CHAT)]
    assert main(["chat", "What is this?", "--image", str(path), "--image", path.as_uri(), "--url", stub.url]) == 0
    assert capsys.readouterr().out == "hi there\n"
    assert _sent_media(stub.requests[0]) == [PNG, PNG]


# --- the live app: every method, both transports -------------------------------------------------


@pytest.fixture(scope="module", params=["msgpack", "json"])
def sdk(request, serve_url):
    with Client(serve_url, transport=request.param, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def media_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("client_media")
    for name, data in {"cat.png": PNG, "tone.wav": WAV, "clip.mp4": MP4}.items():
        (folder / name).write_bytes(data)
    return folder


@pytest.mark.slow
def test_health_and_models(sdk):
    health = sdk.health()
    assert health.ok and health.unavailable == []
    (model,) = sdk.models()
    assert model.id == "omnistage-tiny" and model.output_modalities == ["text", "image", "video", "audio"]
    assert model.world["preset"] == "tiny"  # what the served preset knows, from /v1/models


@pytest.mark.slow
def test_chat_accepts_each_form_of_each_medium(sdk, media_files):
    url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    reference = sdk.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]}], **ASK)
    assert reference.usage.total_tokens == reference.usage.prompt_tokens + reference.usage.completion_tokens
    assert reference.finish_reason in ("stop", "length") and reference.model == "omnistage-tiny"
    for image in (media_files / "cat.png", str(media_files / "cat.png"), PNG, Image.open(io.BytesIO(PNG)), sample_image()):
        assert sdk.chat(prompt="What is this?", images=image, **ASK).text == reference.text, type(image)
    # Media inside OpenAI-style messages may be given the same ways.
    in_memory = [{"type": "image_url", "image_url": sample_image()}, {"type": "text", "text": "What is this?"}]
    assert sdk.chat([{"role": "user", "content": in_memory}], **ASK).text == reference.text

    audio = sdk.chat(prompt="Hear this", audio=media_files / "tone.wav", **ASK)
    assert sdk.chat(prompt="Hear this", audio=sample_audio(), **ASK).text == audio.text
    video = sdk.chat(prompt="Watch this", videos=str(media_files / "clip.mp4"), **ASK)
    assert sdk.chat(prompt="Watch this", videos=sample_video(), **ASK).text == video.text
    mixed = sdk.chat(prompt="All", images=[PNG, PNG], audio=[WAV], videos=[MP4], **ASK)
    assert mixed.usage.prompt_tokens > reference.usage.prompt_tokens


@pytest.mark.slow
def test_chat_returns_generated_media_decoded(sdk):
    result = sdk.chat(prompt="Draw and play", modalities=["text", "image", "audio"], **ASK)
    (image,) = result.images
    (audio,) = result.audios
    assert isinstance(image, Image.Image) and image.size == (64, 64) and result.videos == []
    assert audio.sampling_rate == 16000 and audio.samples.shape == (16000,) and audio.samples.dtype == np.float32


@pytest.mark.slow
def test_chat_stream_yields_the_same_text(sdk):
    plain = sdk.chat(prompt="Tell me a story.", images=PNG, max_tokens=12, seed=0, temperature=0)
    with sdk.chat_stream(prompt="Tell me a story.", images=PNG, max_tokens=12, seed=0, temperature=0) as stream:
        deltas = list(stream)
    assert len(deltas) > 1 and all(isinstance(d, str) for d in deltas)
    assert "".join(deltas) == plain.text == stream.text
    assert stream.finish_reason == plain.finish_reason and stream.usage == plain.usage


@pytest.mark.slow
def test_caption(sdk):
    caption = sdk.caption(PNG, prompt="Describe it.", **ASK)
    assert isinstance(caption, str)
    assert caption == sdk.chat(prompt="Describe it.", images=[sample_image()], **ASK).text


@pytest.mark.slow
def test_generate_image_audio_video(sdk, client):
    image = sdk.generate_image("a cat", seed=3)
    assert isinstance(image, Image.Image) and image.size == (64, 64)
    raw = client.post("/v1/images/generations", json={"prompt": "a cat", "seed": 3}).json()["data"][0]["b64_json"]
    np.testing.assert_array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(base64.b64decode(raw)))))
    audio = sdk.generate_audio("a bell", duration_s=1.0, seed=0)
    assert isinstance(audio, Audio) and audio.sampling_rate == 16000 and audio.samples.shape == (16000,)
    video = sdk.generate_video("waves", seed=0)
    assert isinstance(video, Video) and video.frames.shape[0] == 8 and video.frames.shape[-1] == 3 and video.fps > 0
    assert video.frames.dtype == np.uint8 and video.mime_type == "video/mp4"


@pytest.mark.slow
def test_async_client_every_method(serve_url):
    async def run(transport):
        async with AsyncClient(serve_url, transport=transport, timeout=120) as client:
            stream = client.chat_stream(prompt="What is this?", images=PNG, **ASK)
            streamed = "".join([d async for d in stream])
            return await asyncio.gather(
                client.health(), client.models(), client.chat(prompt="What is this?", images=PNG, **ASK),
                client.caption(PNG, prompt="What is this?", **ASK), client.generate_image("a cat", seed=3),
                client.generate_audio("a bell", seed=0), client.generate_video("waves", seed=0),
            ) + [streamed]

    with Client(serve_url) as sync:
        expected = sync.chat(prompt="What is this?", images=PNG, **ASK).text
    for transport in ("msgpack", "json"):
        health, models, chat, caption, image, audio, video, streamed = asyncio.run(run(transport))
        assert health.ok and models[0].id == "omnistage-tiny"
        assert chat.text == caption == streamed == expected
        assert image.size == (64, 64) and audio.sampling_rate == 16000 and video.frames.ndim == 4


@pytest.mark.slow
@pytest.mark.parametrize(
    "call,cls,status,fragment",
    [
        (lambda c: c.chat(prompt="?", images=b"\x89PNG bad", **ASK), BadRequestError, 400, "could not be decoded"),
        (lambda c: c.chat(prompt="?", model="gpt-9"), NotFoundError, 404, "'gpt-9' does not exist"),
        (lambda c: c.generate_image("x", model="gpt-9"), NotFoundError, 404, "'gpt-9' does not exist"),
        (lambda c: c.chat(prompt="?", images=b"\x89PNG" + bytes(2_000_001)), PayloadTooLargeError, 413, "2000000"),
        (lambda c: c.chat(prompt="?", modalities=["text", "smell"]), UnsupportedMediaTypeError, 415, "smell"),
        (lambda c: c.generate_image("x", size="1024x1024"), BadRequestError, 400, "64x64"),
    ],
    ids=["undecodable", "unknown-model", "unknown-model-generation", "too-large", "modality", "size"],
)
def test_typed_errors_from_the_live_server(sdk, call, cls, status, fragment):
    with pytest.raises(cls) as caught:
        call(sdk)
    error = caught.value
    assert type(error) is cls and error.status_code == status and error.code == status
    assert fragment in error.message and error.request_id


@pytest.mark.slow
def test_stream_errors_are_typed(sdk):
    with pytest.raises(BadRequestError, match="could not be decoded"):
        list(sdk.chat_stream(prompt="?", images=b"\x89PNG bad"))


# --- the command line ----------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_chat_plain_and_streamed(serve_url, media_files, capsys):
    with Client(serve_url) as client:
        expected = client.chat(prompt="What is this?", images=PNG, audio=WAV, **ASK).text
    args = ["chat", "What is this?", "--image", str(media_files / "cat.png"), "--audio", str(media_files / "tone.wav"),
            "--url", serve_url, "--max-tokens", "6", "--seed", "0", "--temperature", "0"]
    assert main(args) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert main([*args, "--stream", "--json"]) == 0
    assert capsys.readouterr().out == expected + "\n"


@pytest.mark.slow
def test_cli_generate_writes_decodable_files(serve_url, tmp_path, capsys):
    assert main(["generate", "image", "a cat", "-o", str(tmp_path / "cat.png"), "--seed", "3", "--url", serve_url]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'cat.png'}"
    with Client(serve_url) as client:
        expected = np.asarray(client.generate_image("a cat", seed=3))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "cat.png").convert("RGB")), expected)
    assert main(["generate", "audio", "a bell", "-o", str(tmp_path / "bell.flac"), "--url", serve_url]) == 0
    samples, rate = sf.read(tmp_path / "bell.flac")
    assert rate == 16000 and samples.shape == (16000,)
    assert main(["generate", "video", "waves", "-o", str(tmp_path / "waves.gif"), "--url", serve_url]) == 0
    assert Image.open(tmp_path / "waves.gif").n_frames == 8


@pytest.mark.slow
def test_cli_models_lists_the_servers_models(serve_url):
    # The installed console script, in its own process.
    script = Path(sys.executable).parent / "omnistage"
    result = subprocess.run([str(script), "models", "--url", serve_url], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("omnistage-tiny\tinput: text,image,video,audio\toutput: text,image,video,audio")


@pytest.mark.slow
def test_cli_failure_is_one_line_on_stderr(serve_url, tmp_path):
    """The installed console script, in its own process: one line on stderr, exit status 1."""
    cases = [
        (["chat", "?", "--model", "gpt-9"], "'gpt-9' does not exist"),
        (["chat", "?", "--image", str(tmp_path / "missing.png")], "No such file"),
        (["generate", "image", "x", "-o", str(tmp_path / "out.png"), "--size", "3x3"], "expected size 64x64"),
        (["models", "--url", f"http://127.0.0.1:{_closed_port()}"], "cannot connect"),
    ]
    for args, fragment in cases:
        result = subprocess.run(
            [str(Path(sys.executable).parent / "omnistage"), *args, "--timeout", "10"],
            capture_output=True, text=True, timeout=60, env={**os.environ, "OMNISTAGE_URL": serve_url},
        )
        assert result.returncode == 1 and result.stdout == "", (args, result.stdout)
        (line,) = result.stderr.splitlines()
        assert line.startswith("omnistage: error: ") and fragment in line, line
    assert not (tmp_path / "out.png").exists()


# --- the official openai package, pointed at /v1 ------------------------------------------------


@pytest.mark.slow
def test_openai_package_snippets(serve_url):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{serve_url}/v1", api_key="unused")
    # Chat with an image, as a data URL.
    url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    response = client.chat.completions.create(
        model="omnistage-tiny",
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]}],
        **ASK,
    )
    with Client(serve_url) as sdk:
        expected = sdk.chat(prompt="What is this?", images=PNG, **ASK).text
    assert response.choices[0].message.content == expected
    # Streaming.
    stream = client.chat.completions.create(
        model="omnistage-tiny",
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]}],
        stream=True, **ASK,
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == expected
    # Image generation.
    image = client.images.generate(model="omnistage-tiny", prompt="a red circle", response_format="b64_json")
    assert Image.open(io.BytesIO(base64.b64decode(image.data[0].b64_json))).size == (64, 64)
    # Its errors carry the same status.
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])


def test_errors_are_one_family():
    for cls in (BadRequestError, NotFoundError, PayloadTooLargeError, UnsupportedMediaTypeError, OverloadedError, ServerError, AuthenticationError):
        assert issubclass(cls, APIError) and issubclass(cls, OmnistageError)
    assert issubclass(ClientConnectionError, OmnistageError) and issubclass(RateLimitError, OverloadedError)
