"""Serve adapters: each stage class becomes a deployment; the stage itself never learns of Serve.

Batched stages check each request on arrival and hand batches to the model on one worker thread;
the LLM pool drives its continuous-batching engine from one loop on that thread instead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog
from ray import serve

from omnistage.actors.errors import OverloadedError
from omnistage.actors.payloads import Conditioning, Embeddings, Features, GeneratedMedia, GenerationRequest, LLMRequest
from omnistage.pipelines.logs import configure_logging

log = structlog.get_logger(__name__)


@dataclasses.dataclass
class LLMReply:
    """The LLM pool's answer. Its stream yields, after this, one ``SignalGroup`` per entry of
    ``signals`` (their modalities, in order), which the ingress passes on unread."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    signals: list[str]
    # A grounding model's phrases and boxes (LLMResult.entities); None for the others.
    entities: list[dict[str, Any]] | None = None


class _Metrics:
    """Per-stage series exported through Ray's Prometheus endpoint."""

    def __init__(self, stage: str):
        from ray.util import metrics

        tags = {"stage": stage}
        self.requests = metrics.Counter("omnistage_stage_requests", "Items processed", tag_keys=("stage",))
        self.errors = metrics.Counter("omnistage_stage_errors", "Items refused or failed", tag_keys=("stage",))
        self.latency = metrics.Histogram(
            "omnistage_stage_batch_latency_s",
            "Seconds per batch",
            boundaries=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
            tag_keys=("stage",),
        )
        self.batch_size = metrics.Histogram(
            "omnistage_stage_batch_size", "Items per batch", boundaries=[1, 2, 4, 8, 16, 32, 64], tag_keys=("stage",)
        )
        self.queue = metrics.Gauge("omnistage_stage_queue_length", "Items waiting in the replica", tag_keys=("stage",))
        self.cache = {
            name: metrics.Counter(f"omnistage_cache_{name}", f"Feature cache {name.replace('_', ' ')}", tag_keys=("stage",))
            for name in ("hits", "misses", "errors", "bytes_read", "bytes_written")
        }
        for metric in (self.requests, self.errors, self.latency, self.batch_size, self.queue, *self.cache.values()):
            metric.set_default_tags(tags)
        self._cache_seen: dict[str, int] = {}

    def record_cache(self, totals: dict[str, int]) -> None:
        """Counters take increments; the cache keeps totals."""
        for name, total in totals.items():
            delta = total - self._cache_seen.get(name, 0)
            if delta > 0:
                self.cache[name].inc(delta)
            self._cache_seen[name] = total


class _Load:
    """Seconds of model work a replica did and items it finished, since the autoscaler last read them."""

    def __init__(self) -> None:
        self._since = time.monotonic()
        self._busy_s = 0.0
        self._items = 0
        # Seconds of work per item, as last measured: a backlog is priced with it.
        self._cost_s = 0.0

    def add(self, seconds: float, items: int = 0) -> None:
        self._busy_s += seconds
        self._items += items

    def read(self, queued: int) -> dict[str, float]:
        """``busy`` (work seconds per second since the last read), ``cost_s`` (the recent seconds
        of work per item) and ``backlog_s`` (``queued`` items at that cost); then starts a new
        window."""
        now = time.monotonic()
        if self._items:
            self._cost_s = self._busy_s / self._items
        stats = {"busy": self._busy_s / max(now - self._since, 1e-3), "backlog_s": queued * self._cost_s, "cost_s": self._cost_s}
        self._since, self._busy_s, self._items = now, 0.0, 0
        return stats


class _Replica:
    """What every pool's replica has: its stage, one model worker thread, metrics, health, stats."""

    def __init__(
        self,
        stage_name: str,
        stage_config: dict[str, Any],
        cache_config: dict[str, Any] | None = None,
        fused: dict[str, dict[str, Any]] | None = None,
    ):
        from omnistage.actors.registry import create_stage

        configure_logging()
        self.name = stage_name
        self.stage = create_stage(stage_name, stage_config, cache_config)
        # Stages run in this replica on each batch after its own (the graph's pools), by name.
        self.fused = {name: create_stage(name, config, cache_config) for name, config in (fused or {}).items()}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=stage_name)
        # When the worker thread began the call it is on (None: idle), for check_health.
        self._call_started: float | None = None
        self._metrics = _Metrics(stage_name)
        self._counts = {"batches": 0, "items": 0, "largest_batch": 0}

    async def _on_worker(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on the stage's worker thread, which records when it started the call."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._timed, fn, *args)

    def _timed(self, fn: Any, *args: Any) -> Any:
        self._call_started = time.monotonic()
        try:
            return fn(*args)
        finally:
            self._call_started = None

    def _count_batch(self, size: int) -> None:
        self._counts["batches"] += 1
        self._counts["largest_batch"] = max(self._counts["largest_batch"], size)

    def ports(self) -> dict[str, dict[str, Any]]:
        """What each stage of this pool produces and accepts, by name, for the graph's check at deploy."""
        from omnistage.pipelines.graph import ports

        return {name: ports(name, stage) for name, stage in {self.name: self.stage, **self.fused}.items()}

    def stats(self) -> dict[str, Any]:
        """This replica's batch counts and the GPUs Ray gave it; for operators and tests."""
        import ray
        from ray import serve

        from omnistage.actors.media import decoded_counts

        cache = self.stage.cache_stats() if hasattr(self.stage, "cache_stats") else None
        replica = serve.get_replica_context().replica_id.unique_id
        context = ray.get_runtime_context()
        return {
            **self._counts,
            "decoded_media": decoded_counts(),
            "gpu_ids": ray.get_gpu_ids(),
            "device": str(self.stage.device),
            "cache": cache,
            "replica": replica,
            "actor_name": context.get_actor_name(),
            "node_id": context.get_node_id(),
        }

    def ping(self) -> str:
        return self.name

    def check_health(self) -> None:
        """Serve calls this every ``health.period_s``; after three failures in a row the controller
        replaces the replica. It never waits on the worker thread, so a stuck model cannot also
        stall its own check."""
        import torch

        started, limit = self._call_started, self.stage.config.stuck_after_s
        busy_s = 0.0 if started is None else time.monotonic() - started
        if limit is not None and busy_s > limit:
            # The ingress answers the call's requests with 408 at their deadline, but only a new
            # replica frees a worker stuck in a kernel that never returns or a deadlock.
            raise RuntimeError(
                f"expected the {self.name} worker to finish a call within stuck_after_s={limit}, "
                f"got one running for {busy_s:.1f} s"
            )
        if self.stage.device.type == "cuda":
            # Surfaces a lost or faulted GPU (e.g. an Xid error) as an unhealthy replica.
            torch.cuda.synchronize(self.stage.device)


class StageServer(_Replica):
    """Deployment body for a batched stage: ``await handle.remote(item, request_id=...)``.

    Each item is checked on arrival, so one bad request never fails the batch it would have
    joined; batches go to the stage on the worker thread, which keeps the replica's event loop
    free to collect the next batch while the model runs."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._load = _Load()
        batching = self.stage.config.batching
        self._batched.set_max_batch_size(batching.max_batch_size)
        self._batched.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        self._waiting = 0

    async def __call__(self, item: Any, request_id: str = "") -> Any:
        return await self._submit(item, request_id)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve calls this every ``metrics_interval_s``; the ``utilisation`` autoscaling policy
        (``omnistage.pipelines.autoscaling``) reads it. Work is decoding and batches."""
        return self._load.read(self._waiting)

    async def _submit(self, item: Any, request_id: str) -> Any:
        start = time.perf_counter()
        try:
            # Off the event loop: an encoder decodes the request's media file here.
            item = await asyncio.to_thread(self.stage.prepare, item)
        except ValueError:
            self._metrics.errors.inc()
            log.info("item_refused", stage=self.name, request_id=request_id)
            raise
        finally:
            self._load.add(time.perf_counter() - start)
        self._waiting += 1
        self._metrics.queue.set(self._waiting)
        try:
            return await self._batched(item, request_id)
        finally:
            self._waiting -= 1
            self._metrics.queue.set(self._waiting)

    def _forward(self, items: list[Any]) -> list[Any]:
        """The pool's stage on a batch, then each stage fused after it on the results."""
        for stage in (self.stage, *self.fused.values()):
            items = stage(items)
        return items

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batched(self, items: list[Any], request_ids: list[str]) -> list[Any]:
        start = time.perf_counter()
        try:
            results = await self._on_worker(self._forward, items)
        except Exception:
            self._metrics.errors.inc(len(items))
            log.exception("batch_failed", stage=self.name, request_ids=request_ids)
            raise
        seconds = time.perf_counter() - start
        self._load.add(seconds, len(items))
        self._metrics.requests.inc(len(items))
        self._metrics.latency.observe(seconds)
        self._metrics.batch_size.observe(len(items))
        self._count_batch(len(items))
        self._counts["items"] += len(items)
        if hasattr(self.stage, "cache_stats"):
            self._metrics.record_cache(self.stage.cache_stats())
        log.info("batch_done", stage=self.name, request_ids=request_ids, batch_size=len(items), seconds=round(seconds, 4))
        return results


@dataclasses.dataclass(frozen=True)
class EngineState:
    """The engine's counters after a step, read on the worker thread that steps it."""

    running: int
    waiting: int
    kv_tokens: int
    generated_tokens: int

    @classmethod
    def of(cls, engine: Any) -> EngineState:
        return cls(engine.num_running, engine.num_waiting, engine.kv_tokens, engine.generated_tokens)


class _EngineMetrics:
    """The LLM engine's series, per replica."""

    def __init__(self, stage: str, replica: str):
        from ray.util import metrics

        keys = ("stage", "replica")
        self.running = metrics.Gauge("omnistage_llm_running_seqs", "Sequences in the running batch", tag_keys=keys)
        self.waiting = metrics.Gauge("omnistage_llm_waiting_seqs", "Requests waiting for admission", tag_keys=keys)
        self.kv_tokens = metrics.Gauge("omnistage_llm_kv_cache_tokens", "Token slots of the padded KV cache in use", tag_keys=keys)
        self.tokens = metrics.Counter("omnistage_llm_generated_tokens", "Tokens generated (rate: tokens per second)", tag_keys=keys)
        seconds = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
        self.ttft = metrics.Histogram("omnistage_llm_time_to_first_token_s", "Seconds from arrival to the first token", boundaries=seconds, tag_keys=keys)
        self.tpot = metrics.Histogram("omnistage_llm_time_per_output_token_s", "Seconds per token after the first", boundaries=seconds, tag_keys=keys)
        for metric in (self.running, self.waiting, self.kv_tokens, self.tokens, self.ttft, self.tpot):
            metric.set_default_tags({"stage": stage, "replica": replica})
        self._tokens_seen = 0

    def record(self, state: EngineState, outputs: list[Any]) -> None:
        self.running.set(state.running)
        self.waiting.set(state.waiting)
        self.kv_tokens.set(state.kv_tokens)
        if state.generated_tokens > self._tokens_seen:
            self.tokens.inc(state.generated_tokens - self._tokens_seen)
            self._tokens_seen = state.generated_tokens
        for out in outputs:
            if out.result is not None:
                self.ttft.observe(out.ttft_s)
                if out.tpot_s is not None:
                    self.tpot.observe(out.tpot_s)


class LLMServer(_Replica):
    """The LLM pool: one loop drives the stage's engine (continuous batching) while requests are
    in flight; ``__call__`` and ``stream`` both submit to it, so neither waits for the other.

    Projected media arrive as extra arguments (object refs the ingress passes on, resolved in this
    replica). The engine is only touched from the worker thread, one call at a time. The thread
    steps on by itself while the engine has work, handing each step's outputs to the event loop as
    it goes, and stops between steps when a submission or an abort waits for it: a request pays
    one thread handover for its admission, not one per token.
    """

    def __init__(self, stage_name: str, stage_config: dict[str, Any], cache_config: dict[str, Any] | None = None):
        from ray import serve

        super().__init__(stage_name, stage_config, cache_config)
        self.engine = self.stage.engine
        self._outputs: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.Task | None = None
        self._ids = itertools.count()
        self._counts["aborted"] = 0
        # Calls waiting for the worker thread; the stepping loop yields the thread to them.
        self._waiting_calls = 0
        self._aborts: set[asyncio.Task] = set()
        self._engine_metrics = _EngineMetrics(stage_name, serve.get_replica_context().replica_id.unique_id)

    async def stream(self, request: LLMRequest, *media: Any, request_id: str = "", deltas: bool = True):
        """Yields text deltas as they are decoded (with ``deltas``), then one ``LLMReply``, then each
        signal group it names. The caller of a stream owns what it yields, so a signal group
        outlives this replica from the moment it is yielded: the ingress keeps its ref, unread, for
        the output projector.

        Every item yielded is an object of its own in Ray's object store, so a caller that wants
        the whole answer only passes ``deltas=False``; deltas decoded while the caller had not
        taken the previous one go out joined, as one item."""
        async for item in self._generate(request, media, request_id, deltas):
            yield item

    async def _generate(self, request: LLMRequest, media: tuple, request_id: str, deltas: bool):
        key = f"{request_id}#{next(self._ids)}"  # a client may reuse its request id
        queue: asyncio.Queue = asyncio.Queue()
        # Before the engine has the request: the stepping thread may hand out its first output
        # before this coroutine runs again.
        self._outputs[key] = queue
        try:
            await self._between_steps(self.engine.add, key, dataclasses.replace(request, media=list(media)))
        except (ValueError, OverloadedError):
            del self._outputs[key]
            self._metrics.errors.inc()
            log.info("item_refused", stage=self.name, request_id=request_id)
            raise
        except BaseException:
            # Cancelled while waiting for the thread, which may still admit the request.
            del self._outputs[key]
            self._abort(key)
            raise
        if self._loop is None or self._loop.done():
            self._loop = asyncio.get_running_loop().create_task(self._run())
        finished = False
        try:
            while True:
                out, text = None, ""
                while out is None or (out.result is None and not queue.empty()):
                    out = queue.get_nowait() if out is not None else await queue.get()
                    if isinstance(out, BaseException):
                        raise out
                    text += out.delta
                if text and deltas:
                    yield text
                if out.result is not None:
                    finished = True  # the engine is done with the sequence
                    self._metrics.requests.inc()
                    result = out.result
                    yield LLMReply(
                        text=result.text,
                        finish_reason=result.finish_reason,
                        prompt_tokens=result.prompt_tokens,
                        completion_tokens=result.completion_tokens,
                        signals=[group.modality for group in result.signals],
                        entities=result.entities,
                    )
                    for group in result.signals:
                        yield group
                    self._counts["items"] += 1
                    return
        finally:
            del self._outputs[key]
            if not finished:
                # The caller went away (a disconnect, the deadline): free its sequence at the next step.
                self._counts["aborted"] += 1
                self._abort(key)

    def _abort(self, key: str) -> None:
        """Free ``key``'s sequence at the next step, without waiting for it."""
        task = asyncio.get_running_loop().create_task(self._between_steps(self.engine.abort, key))
        # The event loop keeps only a weak reference to a task.
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)

    async def _between_steps(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on the worker thread, which the stepping loop yields to after its current step."""
        self._waiting_calls += 1
        try:
            return await self._on_worker(fn, *args)
        finally:
            self._waiting_calls -= 1

    async def _run(self) -> None:
        """Step the engine while it has work, handing each request its outputs."""
        loop = asyncio.get_running_loop()
        while self.engine.has_work():
            try:
                await self._on_worker(self._steps, loop)
            except Exception as exc:
                # Nothing is known about the cache after a failed step: every request fails now
                # rather than hanging, and the engine starts clean.
                log.exception("engine_step_failed", stage=self.name, requests=len(self._outputs))
                self._metrics.errors.inc(len(self._outputs))
                await self._on_worker(self.engine.abort_all)
                for queue in self._outputs.values():
                    queue.put_nowait(exc)
                return

    def _steps(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the worker thread: step until the engine is idle or a call waits for the thread."""
        while self.engine.has_work() and not self._waiting_calls:
            self._call_started = start = time.monotonic()  # per step, for check_health
            outputs = self.engine.step()
            loop.call_soon_threadsafe(self._deliver, outputs, time.monotonic() - start, EngineState.of(self.engine))

    def _deliver(self, outputs: list[Any], seconds: float, state: EngineState) -> None:
        """On the event loop: one step's outputs to their requests, and its metrics."""
        for out in outputs:
            queue = self._outputs.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)
        self._count_batch(state.running)
        self._metrics.latency.observe(seconds)
        self._engine_metrics.record(state, outputs)
        self._metrics.queue.set(state.waiting)

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "running": self.engine.num_running, "waiting": self.engine.num_waiting}


class GeneratorServer(StageServer):
    """A generator pool: conditioning arrives from the output projector's response; the reply
    carries the encoded file only, not the raw pixels or samples."""

    async def __call__(self, conditioning: Conditioning, seed: int | None = None, request_id: str = "") -> GeneratedMedia:
        media = await self._submit(GenerationRequest(conditioning=conditioning, seed=seed), request_id)
        return dataclasses.replace(media, array=None)


class InputProjectorServer(StageServer):
    """The input projector's pool: the features arrive from the encoder's response (the ingress
    holds only a reference to them), the text they came with from the ingress; they meet here."""

    async def __call__(self, features: Features, request_id: str = "", instruction: str | None = None) -> Embeddings:
        return await self._submit(dataclasses.replace(features, instruction=instruction), request_id)
