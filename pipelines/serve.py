"""The online Serve application: a deployment per stage pool, and an HTTP ingress that
validates and routes (media are decoded in the encoder pools).

The ingress hands each stage's output to the next stage's handle as an object ref, so features
travel replica to replica through Ray's object store and never through the ingress. Each pool has
its own autoscaling, resources and queue limits from the config.
"""

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import structlog
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from omnistage.actors.errors import InvalidInputError, OverloadedError, PayloadTooLargeError, UnsupportedMediaError
from omnistage.actors.payloads import LLMRequest
from omnistage.cluster.config import LLMConfig, OmnistageConfig, PoolConfig
from omnistage.pipelines.deployments import GeneratorServer, InputProjectorServer, LLMReply, LLMServer, StageServer
from omnistage.pipelines.graph import Graph
from omnistage.pipelines.logs import configure_logging
from omnistage.pipelines.messages import RemoteMedia, parse_messages
from omnistage.pipelines.playground import describe_world
from omnistage.pipelines.playground import router as playground_router
from omnistage.pipelines.schemas import ChatCompletionRequest, MediaGenerationRequest, describe_validation_error, error_body

log = structlog.get_logger(__name__)

APP_NAME = "omnistage"
MSGPACK = "application/msgpack"
# A request id from a client is echoed into logs and headers, so only a safe alphabet is kept.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_RETRY_AFTER_S = "1"

api = FastAPI(title="omnistage", docs_url=None, redoc_url=None)
# The browser playground at / and the sample media its examples attach.
api.include_router(playground_router)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Unknown routes and methods answer in OpenAI's error shape too.
    return JSONResponse(error_body(str(exc.detail), exc.status_code), status_code=exc.status_code)


async def _ready(response: Any) -> Any:
    """The ref of a stage's output once it exists, without fetching it here.

    Serve checks a pool's ``max_queued_requests`` when the call is made but counts the call as
    queued only once its arguments exist, so a call made with a pending upstream response skips the
    bound: a burst would queue without limit behind a slow pool. Calling the next pool only with
    outputs that exist keeps every pool's queue bound real.
    """
    try:
        return await (await response._to_object_ref())._ready()
    except asyncio.CancelledError:
        # A deadline or a client that went away: the upstream stage stops too.
        response.cancel()
        raise


def _request_id(request: Request) -> str:
    # Serve's proxy puts the request id (the client's X-Request-ID, or a new one) in this header
    # and returns it on the response.
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.match(given) else uuid.uuid4().hex


def _array_bytes(value: Any) -> int:
    """Bytes of numpy arrays anywhere inside ``value``."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(_array_bytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, (list, tuple)):
        return sum(_array_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_array_bytes(v) for v in value.values())
    return 0


def _unpack_msgpack(body: bytes) -> Any:
    """One msgpack object, never unpickled: extension types stay opaque and fail validation later.
    The buffer limit is the body itself, so a declared length can never exceed what was sent."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=max(len(body), 1))
    try:
        unpacker.feed(body)
        data = unpacker.unpack()
    except Exception as exc:  # msgpack raises several unrelated types for malformed input
        raise InvalidInputError(f"expected a msgpack body, got {len(body)} bytes that do not parse ({type(exc).__name__})") from None
    if unpacker.tell() != len(body):
        raise InvalidInputError(f"expected one msgpack object, got {len(body) - unpacker.tell()} bytes after it")
    return data


def _refuse_constant(name: str) -> Any:
    raise InvalidInputError(f"expected JSON numbers, got {name}, which JSON does not have")


# A \uD800-\uDFFF escape: valid JSON syntax, but alone it is half a character, which the
# tokenizer and every encoder downstream refuse.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _parse_json(body: bytes) -> Any:
    """One JSON document, strictly: no NaN or Infinity, and text that is Unicode throughout.
    Nesting too deep for the parser is refused like any other malformed body."""
    try:
        data = json.loads(body, parse_constant=_refuse_constant)
        if _SURROGATE_ESCAPE.search(body):
            json.dumps(data, ensure_ascii=False).encode()  # a pair became one character; one alone fails
    except InvalidInputError:
        raise
    except (ValueError, RecursionError) as exc:  # UnicodeError is a ValueError
        reason = "nest too deeply" if isinstance(exc, RecursionError) else "do not parse as UTF-8 JSON"
        raise InvalidInputError(f"expected a JSON body, got {len(body)} bytes that {reason}") from None
    return data


class _PoolRecovering(Exception):
    """The deadline passed while a pool of this app had a replica being replaced: the request
    waited on a dead replica's pool, not on a hung stage, so it may be retried."""


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it stands for, outermost first."""
    from ray.serve.exceptions import RayServeException

    while exc is not None:
        exc = getattr(exc, "cause", None) or exc  # a RayTaskError carries the stage's own exception
        yield exc
        # Serve raises a bare RayServeException from an ActorDiedError when an actor upstream of
        # the call died: an LLM killed between its reply and a signal group leaves that group's
        # ref holding its death, and the output projector is called with it.
        exc = exc.__cause__ if isinstance(exc, RayServeException) else None


def _status_of(exc: BaseException) -> tuple[int, str]:
    """HTTP status and client-facing message for an exception from any stage."""
    import ray.exceptions as ray_errors
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

    for cause in _causes(exc):
        if isinstance(cause, InvalidInputError):
            return cause.status_code, str(cause)
        if isinstance(cause, ValidationError):
            return InvalidInputError.status_code, f"invalid request: {describe_validation_error(cause)}"
        if isinstance(cause, (BackPressureError, OverloadedError)):
            return OverloadedError.status_code, "the server is at capacity; retry after the Retry-After delay"
        if isinstance(
            cause,
            (
                ray_errors.RayActorError,
                ray_errors.OwnerDiedError,
                ray_errors.ObjectLostError,
                ray_errors.WorkerCrashedError,
                ray_errors.NodeDiedError,
                ReplicaUnavailableError,
                DeploymentUnavailableError,
                _PoolRecovering,
            ),
        ):
            return 503, "a model replica became unavailable while serving this request; retry it"
        if isinstance(cause, (asyncio.TimeoutError, ray_errors.GetTimeoutError)):
            return 408, "the request timed out"
    return 500, "internal error"


def _media_json(media: list, binary: bool) -> list[dict[str, Any]]:
    return [
        {"type": m.modality, "mime_type": m.mime_type, "data": m.data if binary else base64.b64encode(m.data).decode()}
        for m in media
    ]


class _RouteError(Exception):
    status = 500


class _NotFound(_RouteError):
    """An unknown model or an absent capability."""

    status = 404


class _Unauthorized(_RouteError):
    """A missing or wrong API key. The message says nothing about the system."""

    status = 401

    def __init__(self) -> None:
        super().__init__("invalid or missing API key")


def api_key_hashes(config: OmnistageConfig) -> list[str]:
    """SHA-256 hex digests of the accepted API keys: ``OMNISTAGE_API_KEYS`` (comma-separated keys)
    plus ``server.api_key_hashes_file`` (one digest per line, ``#`` comments). Empty: no keys needed."""
    import os

    hashes = [hashlib.sha256(key.strip().encode()).hexdigest() for key in os.environ.get("OMNISTAGE_API_KEYS", "").split(",") if key.strip()]
    if config.server.api_key_hashes_file:
        for line in Path(config.server.api_key_hashes_file).read_text().splitlines():
            line = line.split("#", 1)[0].strip().lower()
            if line:
                if not re.fullmatch(r"[0-9a-f]{64}", line):
                    raise ValueError(f"expected SHA-256 hex digests in {config.server.api_key_hashes_file}, got a line of {len(line)} characters")
                hashes.append(line)
    return hashes


def _usage(reply: LLMReply) -> dict[str, int]:
    return {
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "total_tokens": reply.prompt_tokens + reply.completion_tokens,
    }


# Defined after every module-level helper it uses: Serve captures the class when decorating it.
@serve.deployment
@serve.ingress(api)
class Ingress:
    """HTTP front: OpenAI-style routes over the stage pools, whose handles it receives."""

    def __init__(self, config: dict[str, Any], key_hashes: list[str], **handles: Any):
        configure_logging()
        self.config = OmnistageConfig.model_validate(config)
        self.key_hashes = [bytes.fromhex(h) for h in key_hashes]
        self.model_id = self.config.name
        self.created = int(time.time())
        self.handles = handles
        stages = self.config.stages
        self.encoders = {m: handles[f"{m}_encoder"] for m in stages.input_modalities()}
        self.generators = {m: handles[f"{m}_generator"] for m in stages.output_modalities()}
        # None where each encoder pool projects its own features (input_projector.placement).
        self.input_projector = handles.get("input_projector")
        self.output_projector = handles.get("output_projector")
        self.llm = handles["llm"]
        self.remote_media = RemoteMedia(allowed_hosts=tuple(self.config.server.remote_media_hosts))
        # Feature arrays must never reach the ingress; counting what arrives here proves it.
        self.array_bytes_received = 0

    # Routes

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """200 when every pool answers a ping, 503 naming those that do not."""

        async def ping(handle: Any) -> None:
            response = handle.ping.remote()
            try:
                await asyncio.wait_for(asyncio.ensure_future(response), timeout=5)
            except BaseException:
                response.cancel()
                raise

        results = await asyncio.gather(*(ping(h) for h in self.handles.values()), return_exceptions=True)
        down = [name for name, result in zip(self.handles, results) if isinstance(result, BaseException)]
        return JSONResponse({"status": "unavailable" if down else "ok", "unavailable": down}, status_code=503 if down else 200)

    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        try:
            self._authorize(request)
        except _RouteError as exc:
            return self._error(exc, _request_id(request))
        stages = self.config.stages
        entry = {
            "id": self.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "omnistage",
            "input_modalities": ["text", *stages.input_modalities()],
            "output_modalities": ["text", *stages.output_modalities()],
            # What the model knows, for the playground and other people choosing what to ask.
            "world": describe_world(self.config),
        }
        return JSONResponse({"object": "list", "data": [entry]})

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        rid = _request_id(request)
        try:
            # Past the deadline the awaits below are cancelled, and Serve cancels the calls
            # still running downstream: a hung stage costs a 408, not a stuck request.
            async with asyncio.timeout(self.config.server.request_timeout_s):
                # 1. Read and check the request
                self._authorize(request)
                body, binary = await self._read(request)
                req = ChatCompletionRequest.model_validate(body)
                self._check_model(req.model)
                wanted = self._output_modalities(req.modalities)
                # 2. Check the messages and the media headers (off the event loop); the encoder
                #    pools decode the media
                chat = await asyncio.to_thread(
                    parse_messages, req.messages, list(self.encoders), self.remote_media, self.config.server.limits
                )
                # 3. Route: encoder -> input projector -> the LLM call, each output as a ref
                embeds = await asyncio.gather(
                    *(self._embed(m, item, text, rid) for (m, item), text in zip(chat.media, chat.instructions))
                )
                llm_request = LLMRequest(
                    messages=chat.messages,
                    max_tokens=req.max_completion_tokens or req.max_tokens,
                    temperature=req.temperature,
                    top_p=req.top_p,
                    seed=req.seed,
                    stop=req.stop_list(),
                    force_modalities=wanted,
                )
                if req.stream:
                    return await self._stream_chat(llm_request, embeds, req, rid)
                reply, signal_refs = await self._answer(llm_request, embeds, rid)
                # 4. Signal groups -> output projector -> generators
                media = await self._generate(signal_refs, req.seed, rid)
        except Exception as exc:
            return self._error(await self._cause_of_timeout(exc), rid)
        message = {"role": "assistant", "content": reply.text}
        if reply.entities is not None:
            message["entities"] = reply.entities
        if media:
            message["media"] = _media_json(media, binary)
        log.info("chat_done", request_id=rid, media_in=[m for m, _ in chat.media], media_out=[m.modality for m in media])
        return self._respond(
            {
                "id": f"chatcmpl-{rid}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.model_id,
                "choices": [{"index": 0, "message": message, "finish_reason": reply.finish_reason}],
                "usage": _usage(reply),
            },
            binary,
        )

    @api.post("/v1/images/generations")
    async def image_generations(self, request: Request) -> Response:
        return await self._media_generation(request, "image")

    @api.post("/v1/videos/generations")
    async def video_generations(self, request: Request) -> Response:
        return await self._media_generation(request, "video")

    @api.post("/v1/audio/generations")
    async def audio_generations(self, request: Request) -> Response:
        return await self._media_generation(request, "audio")

    def stats(self) -> dict[str, Any]:
        """Called through the deployment handle (not HTTP): what this replica has received, and the
        media files it decoded (none: encoder pools decode them)."""
        from omnistage.actors.media import decoded_counts

        return {"array_bytes_received": self.array_bytes_received, "decoded_media": decoded_counts()}

    # Steps

    def _authorize(self, request: Request) -> None:
        if not self.key_hashes:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        digest = hashlib.sha256(key.strip().encode()).digest()
        # Compared against every digest in constant time, so timing says nothing about the keys.
        valid = [hmac.compare_digest(digest, h) for h in self.key_hashes]
        if scheme.lower() != "bearer" or not any(valid):
            raise _Unauthorized()

    async def _read(self, request: Request) -> tuple[dict[str, Any], bool]:
        """The body as a dict, and whether the answer goes back as msgpack."""
        limit = self.config.server.max_request_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise PayloadTooLargeError(f"expected a request body of at most {limit} bytes, got {declared}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise PayloadTooLargeError(f"expected a request body of at most {limit} bytes, got more")
        content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if content_type == MSGPACK:
            data = _unpack_msgpack(bytes(body))
        elif content_type == "application/json":
            data = _parse_json(bytes(body))
        else:
            raise UnsupportedMediaError(f"expected Content-Type application/json or {MSGPACK}, got {content_type!r}")
        if not isinstance(data, dict):
            raise InvalidInputError(f"expected the body to be an object, got {type(data).__name__}")
        accept = request.headers.get("accept", "")
        binary = MSGPACK in accept or (content_type == MSGPACK and accept in ("", "*/*"))
        return data, binary

    def _check_model(self, model: str | None) -> None:
        if model not in (None, self.model_id):
            raise _NotFound(f"model {model!r} does not exist; this server serves {self.model_id!r}")

    def _output_modalities(self, modalities: list[str] | None) -> list[str]:
        wanted = [m for m in (modalities or []) if m != "text"]
        unknown = [m for m in wanted if m not in self.generators]
        if unknown:
            raise UnsupportedMediaError(f"expected modalities among {['text', *self.generators]}, got {unknown}")
        return wanted

    async def _embed(self, modality: str, item: Any, instruction: str, rid: str) -> Any:
        """One medium -> its encoder -> the input projector, with the text the medium came with
        (``Features.instruction``, which InstructBLIP's projector reads); the projected features' ref."""
        features = await _ready(self.encoders[modality].remote(item, request_id=rid))
        if self.input_projector is None:
            # Projected in the encoder's replica; the graph's check refuses this placement for a
            # projector that reads the instruction.
            return features
        return await _ready(self.input_projector.remote(features, request_id=rid, instruction=instruction))

    async def _generate(self, signal_refs: list[tuple[str, Any]], seed: int | None, rid: str) -> list:
        """Each signal group (still in the object store) -> output projector -> its generator."""

        async def one(index: int, modality: str, ref: Any) -> Any:
            conditioning = await _ready(self.output_projector.remote(ref, request_id=rid))
            seeded = None if seed is None else seed + index
            return self._received(await self.generators[modality].remote(conditioning, seed=seeded, request_id=rid))

        return await asyncio.gather(
            *(one(index, modality, ref) for index, (modality, ref) in enumerate(signal_refs) if modality in self.generators)
        )

    async def _llm_steps(self, llm_request: LLMRequest, embeds: list, rid: str, deltas: bool = True):
        """The LLM's stream: yields each text delta (with ``deltas``), then ``(reply, signal_refs)``.

        The LLM yields its signal groups after its reply, and the caller of a stream owns what it
        yields: once yielded, a group outlives the LLM replica. Only their refs are taken here,
        never their hidden states, for the output projector to read.
        """
        response = self.llm.options(stream=True).stream.remote(llm_request, *embeds, request_id=rid, deltas=deltas)
        try:
            refs = await response._to_object_ref_gen()
            while not isinstance(item := self._received(await (await refs.__anext__())), LLMReply):
                yield item
            yield item, [(modality, await refs.__anext__()) for modality in item.signals]
        finally:
            # Done, or the caller went away (a disconnect, the deadline): the LLM frees its sequence.
            response.cancel()

    async def _answer(self, llm_request: LLMRequest, embeds: list, rid: str) -> tuple[LLMReply, list]:
        """The LLM's whole answer: ``(reply, signal_refs)``."""
        # Without its text deltas: each would be one more object in the store to fetch here.
        [answer] = [step async for step in self._llm_steps(llm_request, embeds, rid, deltas=False)]
        return answer

    async def _stream_chat(self, llm_request: LLMRequest, embeds: list, req: ChatCompletionRequest, rid: str) -> Response:
        steps = self._llm_steps(llm_request, embeds, rid)
        # The first step surfaces bad input as a status code, before any byte is sent.
        first = await steps.__anext__()
        base = {"id": f"chatcmpl-{rid}", "object": "chat.completion.chunk", "created": int(time.time()), "model": self.model_id}

        def event(delta: dict[str, Any] | None, finish_reason: str | None = None, **extra: Any) -> str:
            choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
            return f"data: {json.dumps({**base, 'choices': choices, **extra})}\n\n"

        async def events():
            yield event({"role": "assistant", "content": ""})
            item = first
            try:
                while isinstance(item, str):
                    if item:
                        yield event({"content": item})
                    item = await steps.__anext__()
                reply, signal_refs = item
                if reply.entities is not None:
                    yield event({"entities": reply.entities})
                media = await self._generate(signal_refs, req.seed, rid)
                if media:
                    yield event({"media": _media_json(media, binary=False)})
                yield event({}, reply.finish_reason)
                if req.stream_options and req.stream_options.include_usage:
                    yield event(None, usage=_usage(reply))
            except Exception as exc:
                # Headers are sent: the error travels as an event, in OpenAI's error shape, and a
                # retryable one carries its Retry-After there (the SDK reads it).
                status, message = self._log_error(exc, rid)
                body = error_body(message, status)
                if status in (429, 503):
                    body["retry_after"] = int(_RETRY_AFTER_S)
                yield f"data: {json.dumps(body)}\n\n"
            finally:
                # A client that went away stops the stream here: the LLM frees its sequence.
                await steps.aclose()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def _media_generation(self, request: Request, modality: str) -> Response:
        rid = _request_id(request)
        try:
            async with asyncio.timeout(self.config.server.request_timeout_s):
                return await self._generate_media(request, modality, rid)
        except Exception as exc:
            return self._error(await self._cause_of_timeout(exc), rid)

    async def _generate_media(self, request: Request, modality: str, rid: str) -> Response:
        self._authorize(request)
        body, binary = await self._read(request)
        req = MediaGenerationRequest.model_validate(body)
        self._check_model(req.model)
        if modality not in self.generators:
            raise _NotFound(f"this model does not generate {modality}; it generates {list(self.generators) or 'text only'}")
        self._check_generation_size(modality, req)
        llm_request = LLMRequest(
            messages=[{"role": "user", "content": req.prompt}],
            max_tokens=self.config.stages.llm.defaults.generation_max_tokens,
            # The text before the forced signal tokens shapes their hidden states: greedy, so a
            # prompt draws the same way every time (the seed varies the generator only).
            temperature=0.0,
            force_modalities=[modality],
        )
        answers = await asyncio.gather(*(self._answer(llm_request, [], rid) for _ in range(req.n)))
        media = await asyncio.gather(
            *(
                self._generate(
                    [ref for ref in signal_refs if ref[0] == modality][:1], None if req.seed is None else req.seed + i, rid
                )
                for i, (_, signal_refs) in enumerate(answers)
            )
        )
        replies = [reply for reply, _ in answers]
        data = [
            {
                "b64_json": items[0].data if binary else base64.b64encode(items[0].data).decode(),
                "mime_type": items[0].mime_type,
                "revised_prompt": reply.text,
            }
            for items, reply in zip(media, replies)
        ]
        return self._respond({"created": int(time.time()), "data": data}, binary)

    def _check_generation_size(self, modality: str, req: MediaGenerationRequest) -> None:
        """Each generator pool renders one configured size; say which when asked for another."""
        gen = getattr(self.config.stages, f"{modality}_generator")
        if req.size is not None and modality in ("image", "video"):
            configured = f"{gen.width}x{gen.height}" if gen.width and gen.height else None
            if req.size != configured:
                raise InvalidInputError(f"expected size {configured or 'unset (the model default)'}, got {req.size!r}")
        if req.num_frames is not None and modality == "video" and req.num_frames != gen.num_frames:
            raise InvalidInputError(f"expected num_frames {gen.num_frames}, got {req.num_frames}")
        if req.duration_s is not None and modality == "audio" and req.duration_s != gen.audio_length_s:
            raise InvalidInputError(f"expected duration_s {gen.audio_length_s}, got {req.duration_s}")

    async def _cause_of_timeout(self, exc: Exception) -> Exception:
        """A deadline that passed while some pool of this app was replacing a replica (killed, or
        failing its health checks) is that replica's death, a retryable 503: the request waited
        for its pool to come back. Otherwise ``exc`` as it is (a timeout stays a 408: a hang)."""
        if not isinstance(exc, TimeoutError):
            return exc
        try:
            app = serve.get_replica_context().app_name
            deployments = (await asyncio.to_thread(serve.status)).applications[app].deployments
        except Exception:
            # The controller cannot say (busy, restarting): answer for the timeout as it is.
            log.warning("deadline_cause_unknown", exc_info=True)
            return exc
        recovering = sorted(name for name, d in deployments.items() if d.status != "HEALTHY")
        if recovering:
            log.info("deadline_while_recovering", pools=recovering)
            return _PoolRecovering(f"expected every pool to be running, got {recovering} replacing a replica")
        return exc

    # Responses

    def _received(self, value: Any) -> Any:
        self.array_bytes_received += _array_bytes(value)
        return value

    def _respond(self, body: dict[str, Any], binary: bool) -> Response:
        if binary:
            return Response(msgpack.packb(body, use_bin_type=True), media_type=MSGPACK)
        return JSONResponse(body)

    def _log_error(self, exc: BaseException, rid: str) -> tuple[int, str]:
        status, message = (exc.status, str(exc)) if isinstance(exc, _RouteError) else _status_of(exc)
        # The exception type only: messages of library errors may quote request bytes.
        log.log(40 if status >= 500 else 20, "request_failed", request_id=rid, status=status, error=type(exc).__name__)
        return status, message

    def _error(self, exc: BaseException, rid: str) -> JSONResponse:
        status, message = self._log_error(exc, rid)
        headers = {"Retry-After": _RETRY_AFTER_S} if status in (429, 503) else {}
        if status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse(error_body(message, status), status_code=status, headers=headers)


# Building the application

_SERVER_CLASSES = {
    "input_projector": InputProjectorServer,
    "llm": LLMServer,
    "image_generator": GeneratorServer,
    "video_generator": GeneratorServer,
    "audio_generator": GeneratorServer,
}


def deployment_options(pool: PoolConfig, name: str) -> dict[str, Any]:
    """Serve options of one pool from its config section."""
    scaling, resources, queue, health = pool.scaling, pool.resources, pool.queue, pool.health
    policy = {}
    if scaling.policy == "utilisation":
        policy["policy"] = {
            "policy_function": "omnistage.pipelines.autoscaling:UtilisationPolicy",
            "policy_kwargs": {"target_utilisation": scaling.target_utilisation},
        }
    actor = {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus, "resources": dict(resources.custom)}
    if isinstance(pool, LLMConfig) and pool.engine.backend == "vllm" and pool.engine.vllm.python is not None:
        # The vLLM pool runs under its own interpreter (vLLM pins older transformers and fastapi);
        # Ray starts its replicas with it. The same Ray release must be installed there. Made
        # absolute without resolving links: a virtual environment's python is a link that only
        # finds its packages when started under the environment's own path.
        actor["runtime_env"] = {"py_executable": str(Path(pool.engine.vllm.python).absolute())}
    return {
        "name": name,
        "autoscaling_config": {
            **policy,
            "min_replicas": scaling.min_replicas,
            "initial_replicas": max(scaling.min_replicas, 1),
            "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests,
            "upscale_delay_s": scaling.upscale_delay_s,
            "downscale_delay_s": scaling.downscale_delay_s,
            "metrics_interval_s": scaling.metrics_interval_s,
            "look_back_period_s": scaling.look_back_period_s,
        },
        "ray_actor_options": actor,
        "max_ongoing_requests": queue.max_ongoing_requests,
        "max_queued_requests": queue.max_queued_requests,
        "health_check_period_s": health.period_s,
        "health_check_timeout_s": health.timeout_s,
    }


def build_app(config: OmnistageConfig) -> serve.Application:
    """The Serve application: one deployment per stage of the config's graph, bound into the ingress."""
    pools = {}
    for name, (_, *fused) in Graph.of(config).pools.items():
        stage_config = getattr(config.stages, name)
        server = serve.deployment(_SERVER_CLASSES.get(name, StageServer))
        pools[name] = server.options(**deployment_options(stage_config, name)).bind(
            name,
            stage_config.model_dump(mode="json"),
            config.cache.model_dump(mode="json"),
            **({"fused": {f: getattr(config.stages, f).model_dump(mode="json") for f in fused}} if fused else {}),
        )
    ingress = Ingress.options(**deployment_options(config.server.ingress, "ingress"))
    return ingress.bind(config.model_dump(mode="json"), api_key_hashes(config), **pools)


def prepare_models(config: OmnistageConfig) -> None:
    """Build the built-in presets a config uses once, here, rather than in every replica at once."""
    from omnistage.actors.builtin import ensure_presets

    ensure_presets(getattr(config.stages, name).model for name in Graph.of(config).stages)


def deploy(config: OmnistageConfig, *, name: str = APP_NAME, route_prefix: str = "/") -> Any:
    """Deploy as app ``name`` on the Ray cluster this process is connected to (Serve must be
    started), and check that each pool's stage fits the next: an app whose stages do not fit is
    deleted again and ``ValueError`` names both shapes."""
    prepare_models(config)
    ingress = serve.run(build_app(config), name=name, route_prefix=route_prefix)
    graph = Graph.of(config)
    try:
        graph.check(
            {
                stage: stage_ports
                for pool in graph.pools
                for stage, stage_ports in serve.get_deployment_handle(pool, name).ports.remote().result(timeout_s=120).items()
            }
        )
    except ValueError:
        serve.delete(name)
        raise
    return ingress


def metrics_url() -> str:
    """The Prometheus endpoint of the node this process runs on (Ray's metrics agent serves it)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


def free_metrics_port(port: int) -> int | None:
    """``port`` if nothing listens on it, else None (Ray then picks one) with a warning: Ray's
    node start times out, saying nothing of the port, when its metrics port is taken."""
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("", port))
        except OSError:
            print(
                f"omnistage: server.metrics_port {port} is in use; Prometheus metrics go to a port Ray picks "
                f"(printed below). Set server.metrics_port to a free port to keep it fixed.",
                flush=True,
            )
            return None
    return port


def serving_message(name: str, host: str, port: int, metrics: str) -> str:
    # Browsers refuse to open the wildcard address; the server is reachable on loopback too.
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    return f"omnistage: serving {name!r}: playground at {url}/, API at {url}/v1, Prometheus metrics at {metrics} (Ctrl-C to stop)"


def run_server(config: OmnistageConfig, host: str | None = None, port: int | None = None, address: str | None = None) -> None:
    """Start (or join, with ``address``) a Ray cluster, deploy, serve until interrupted, clean up."""
    import signal
    import threading

    import ray

    host = host or config.server.host
    port = port or config.server.port
    # The dashboard runs code for whoever reaches it; a local server does without it. "local"
    # starts a new instance rather than joining whatever cluster another process left running.
    # A fixed metrics port, so a Prometheus scrape config written once keeps working; a joined
    # cluster's nodes export on the port `ray start` gave them.
    ray.init(
        address=address or "local",
        include_dashboard=False if address is None else None,
        _metrics_export_port=free_metrics_port(config.server.metrics_port) if address is None else None,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port, "request_timeout_s": config.server.request_timeout_s})
        deploy(config)
        print(serving_message(config.name, host, port, metrics_url()), flush=True)
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        print("omnistage: shutting down", flush=True)
        if address is not None:
            # On a shared cluster remove only this app; a local cluster goes down whole below.
            serve.delete(APP_NAME)
        ray.shutdown()
