"""Serve adapters: each stage class becomes a deployment; the stage itself never learns of Serve.

A replica checks each request on arrival (so one bad request never fails the batch it would have
joined), then hands batches to the stage on one worker thread, which keeps the replica's event
loop free to collect the next batch while the model runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog
from ray import serve

from omnistage.actors.payloads import Conditioning, GeneratedMedia, GenerationRequest, LLMRequest, LLMResult
from omnistage.pipelines.logs import configure_logging

log = structlog.get_logger(__name__)


@dataclasses.dataclass
class LLMReply:
    """What the LLM pool sends the ingress: the answer, with each signal group left in the object
    store (``signal_refs``: (modality, ObjectRef of a SignalGroup)) for the output projector to read,
    so hidden states never pass through the ingress."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    signal_refs: list[tuple[str, Any]]


def _advance(steps: Any) -> tuple[bool, Any]:
    """One step of a generator, run on the stage's thread: (False, yielded) or (True, returned).
    StopIteration itself cannot cross into an asyncio future."""
    try:
        return False, next(steps)
    except StopIteration as done:
        return True, done.value


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


class StageServer:
    """Deployment body for any stage: ``await handle.remote(item, request_id=...)``."""

    def __init__(self, stage_name: str, stage_config: dict[str, Any], cache_config: dict[str, Any] | None = None):
        from omnistage.actors.registry import create_stage

        configure_logging()
        self.name = stage_name
        self.stage = create_stage(stage_name, stage_config, cache_config)
        batching = self.stage.config.batching
        self._batched.set_max_batch_size(batching.max_batch_size)
        self._batched.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=stage_name)
        # When the worker thread began the call it is on (None: idle), for check_health.
        self._call_started: float | None = None
        self._metrics = _Metrics(stage_name)
        self._waiting = 0
        self._counts = {"batches": 0, "items": 0, "largest_batch": 0}

    async def __call__(self, item: Any, request_id: str = "") -> Any:
        return await self._submit(item, request_id)

    async def _submit(self, item: Any, request_id: str) -> Any:
        try:
            self.stage.check(item)
        except ValueError:
            self._metrics.errors.inc()
            log.info("item_refused", stage=self.name, request_id=request_id)
            raise
        self._waiting += 1
        self._metrics.queue.set(self._waiting)
        try:
            return await self._batched(item, request_id)
        finally:
            self._waiting -= 1
            self._metrics.queue.set(self._waiting)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batched(self, items: list[Any], request_ids: list[str]) -> list[Any]:
        start = time.perf_counter()
        try:
            results = await self._on_worker(self.stage, items)
        except Exception:
            self._metrics.errors.inc(len(items))
            log.exception("batch_failed", stage=self.name, request_ids=request_ids)
            raise
        seconds = time.perf_counter() - start
        self._observe_batch(len(items), seconds)
        log.info("batch_done", stage=self.name, request_ids=request_ids, batch_size=len(items), seconds=round(seconds, 4))
        return results

    async def _on_worker(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on the stage's worker thread, which records when it started the call."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._timed, fn, *args)

    def _timed(self, fn: Any, *args: Any) -> Any:
        self._call_started = time.monotonic()
        try:
            return fn(*args)
        finally:
            self._call_started = None

    def _observe_batch(self, size: int, seconds: float) -> None:
        self._metrics.requests.inc(size)
        self._metrics.latency.observe(seconds)
        self._metrics.batch_size.observe(size)
        self._counts["batches"] += 1
        self._counts["items"] += size
        self._counts["largest_batch"] = max(self._counts["largest_batch"], size)
        if hasattr(self.stage, "cache_stats"):
            self._metrics.record_cache(self.stage.cache_stats())

    def stats(self) -> dict[str, Any]:
        """This replica's batch counts and the GPUs Ray gave it; for operators and tests."""
        import ray

        from ray import serve

        cache = self.stage.cache_stats() if hasattr(self.stage, "cache_stats") else None
        replica = serve.get_replica_context().replica_id.unique_id
        context = ray.get_runtime_context()
        return {
            **self._counts,
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


class LLMServer(StageServer):
    """The LLM pool. Projected media arrive as extra arguments, so the ingress can pass the
    projector's responses straight through and Serve resolves them in this replica."""

    def __init__(self, stage_name: str, stage_config: dict[str, Any], cache_config: dict[str, Any] | None = None):
        super().__init__(stage_name, stage_config, cache_config)
        batching = self.stage.config.batching
        self._stream_batched.set_max_batch_size(batching.max_batch_size)
        self._stream_batched.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)

    async def __call__(self, request: LLMRequest, *media: Any, request_id: str = "") -> LLMReply:
        result = await self._submit(dataclasses.replace(request, media=list(media)), request_id)
        return self._reply(result)

    async def stream(self, request: LLMRequest, *media: Any, request_id: str = ""):
        """Yields text deltas as they are decoded, then one ``LLMReply``."""
        request = dataclasses.replace(request, media=list(media))
        try:
            self.stage.check(request)
        except ValueError:
            self._metrics.errors.inc()
            raise
        async for item in self._stream_batched(request, request_id):
            yield self._reply(item) if isinstance(item, LLMResult) else item

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _stream_batched(self, requests: list[LLMRequest], request_ids: list[str]):
        steps = self.stage.stream(requests)
        start = time.perf_counter()
        while True:
            finished, value = await self._on_worker(_advance, steps)
            if finished:
                results = value
                break
            yield value
        self._observe_batch(len(requests), time.perf_counter() - start)
        log.info("stream_done", stage=self.name, request_ids=request_ids, batch_size=len(requests))
        yield results

    def _reply(self, result: LLMResult) -> LLMReply:
        import ray

        return LLMReply(
            text=result.text,
            finish_reason=result.finish_reason,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            signal_refs=[(group.modality, ray.put(group)) for group in result.signals],
        )


class GeneratorServer(StageServer):
    """A generator pool: conditioning arrives from the output projector's response; the reply
    carries the encoded file only, not the raw pixels or samples."""

    async def __call__(self, conditioning: Conditioning, seed: int | None = None, request_id: str = "") -> GeneratedMedia:
        media = await self._submit(GenerationRequest(conditioning=conditioning, seed=seed), request_id)
        return dataclasses.replace(media, array=None)
