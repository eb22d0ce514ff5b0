"""Chaos under load: a mixed load through the client SDK, with its retries, while a random stage
replica is killed every few seconds; each request ends answered, failed with a clear retryable
error, or lost.

The load asks image, audio and video questions (half of them streamed) and generates images,
audio and video, each request with media of its own so the encoders' feature cache cannot answer
for them. A kill is a SIGKILL of the replica's process (a crash, the OOM killer) or ``ray.kill``
of its actor, at random. ``benchmarks/chaos.py`` runs this for minutes on an app of its own;
the reliability tests run a short version.

Outcomes of one request (one SDK call, retries included):

* answered: a complete answer (a chat with its finish reason, a stream that ended with
  ``[DONE]``, media that decode);
* failed: the SDK raised a 503 or 429 (after its retries, or in a stream that had started, which
  it cannot retry), recorded with whether the server gave a retry delay;
* lost: anything else: a timeout (a hang), a 500 or other status, a dropped connection, a stream
  cut without an error event.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from omnistage.clients import Client, OverloadedError, RetryEvent
from omnistage.clients.media import Audio, Video

KINDS = ("image_question", "audio_question", "video_question", "image_generation", "audio_generation", "video_generation")


def stage_replicas(app_name: str) -> dict[str, dict[str, int]]:
    """Deployment -> {replica actor name: pid} of app ``app_name``'s live replicas, read through
    Ray's state API (the process must be connected to Ray, with its dashboard running)."""
    import ray
    from ray.util.state import list_actors

    prefix = f"ServeReplica:{app_name}:"
    address = ray.get_runtime_context().gcs_address
    found: dict[str, dict[str, int]] = {}
    for actor in list_actors(address=address, filters=[("state", "=", "ALIVE")], detail=True, limit=10_000):
        if actor.class_name.startswith(prefix):
            found.setdefault(actor.class_name.removeprefix(prefix), {})[actor.name] = actor.pid
    return found


def kill_replica(actor_name: str, pid: int, how: str) -> None:
    """``how`` is ``sigkill`` (the process dies as in a crash; it must run on this host) or
    ``ray.kill`` (Ray ends the actor)."""
    if how == "sigkill":
        os.kill(pid, signal.SIGKILL)
    elif how == "ray.kill":
        import ray

        ray.kill(ray.get_actor(actor_name, namespace="serve"), no_restart=True)
    else:
        raise ValueError(f"expected how 'sigkill' or 'ray.kill', got {how!r}")


@dataclass
class _Request:
    kind: str
    stream: bool
    retries: list[RetryEvent] = field(default_factory=list)
    deltas: int = 0  # text deltas a stream gave before it ended
    outcome: str = ""  # answered, failed or lost
    detail: str = ""  # for failed and lost: what the SDK raised
    seconds: float = 0.0


def _ask(client: Client, request: _Request, rng: np.random.Generator) -> None:
    """Sends one request of ``request.kind``; returns once the answer is complete, else raises."""
    modality, _, task = request.kind.partition("_")
    if task == "generation":
        prompt = f"a picture, a sound or a clip, number {rng.integers(1_000_000)}"
        made = {"image": client.generate_image, "audio": client.generate_audio, "video": client.generate_video}[modality](prompt)
        expected = {"image": Image.Image, "audio": Audio, "video": Video}[modality]
        if not isinstance(made, expected):
            raise TypeError(f"expected a generated {modality} as {expected.__name__}, got {type(made).__name__}")
        return
    # Media of their own, so each request runs its encoder rather than a cache hit.
    media = {
        "image": {"images": rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)},
        "audio": {"audio": ((0.1 * rng.standard_normal(8000)).astype(np.float32), 16000)},
        "video": {"videos": rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)},
    }[modality]
    options = {"prompt": f"What is in this {modality}?", "max_tokens": 16, **media}
    if request.stream:
        with client.chat_stream(**options) as stream:
            for _ in stream:
                request.deltas += 1
        finish_reason = stream.finish_reason
    else:
        finish_reason = client.chat(**options).finish_reason
    if finish_reason not in ("stop", "length"):
        raise ValueError(f"expected an answer with finish_reason stop or length, got {finish_reason!r}")


def _classify(request: _Request, exc: BaseException | None) -> None:
    if exc is None:
        request.outcome = "answered"
    elif isinstance(exc, OverloadedError):
        request.outcome = "failed"
        request.detail = f"{exc.status_code} {'with' if exc.retry_after is not None else 'without'} Retry-After"
    else:
        request.outcome = "lost"
        request.detail = f"{type(exc).__name__}: {exc}"
    if exc is not None and request.deltas:
        # The SDK retries a stream only before its first byte: this one the caller must resend.
        request.detail += " (mid-stream)"


def _retry_cause(event: RetryEvent) -> str:
    error = event.error
    if isinstance(error, OverloadedError):
        return f"{error.status_code} {'with' if error.retry_after is not None else 'without'} Retry-After"
    return type(error).__name__


def run_chaos(
    base_url: str,
    app_name: str,
    *,
    duration_s: float = 180.0,
    kill_every_s: float = 5.0,
    concurrency: int = 8,
    seed: int = 0,
    max_retries: int = 10,
    timeout_s: float = 300.0,
    recovery_timeout_s: float = 180.0,
) -> dict[str, Any]:
    """Runs the load and the kills against the app ``app_name`` served at ``base_url``; returns
    the report (JSON-ready). The calling process must be connected to the app's Ray cluster."""
    rng = random.Random(seed)
    stop = threading.Event()
    done: list[_Request] = []
    in_flight = [0]
    lock = threading.Lock()

    def worker(index: int) -> None:
        media_rng = np.random.default_rng([seed, index])
        pick = random.Random(f"{seed}-{index}")
        current: list[_Request] = []

        def on_retry(event: RetryEvent) -> None:
            current[-1].retries.append(event)

        with Client(base_url, max_retries=max_retries, timeout=timeout_s, on_retry=on_retry) as client:
            while not stop.is_set():
                kind = pick.choice(KINDS)
                request = _Request(kind, stream=kind.endswith("question") and pick.random() < 0.5)
                current.append(request)
                with lock:
                    in_flight[0] += 1
                start = time.monotonic()
                error: BaseException | None = None
                try:
                    _ask(client, request, media_rng)
                except Exception as exc:  # every outcome is counted, whatever its type
                    error = exc
                request.seconds = time.monotonic() - start
                _classify(request, error)
                with lock:
                    in_flight[0] -= 1
                    done.append(request)

    threads = [threading.Thread(target=worker, args=(i,), name=f"chaos-load-{i}", daemon=True) for i in range(concurrency)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    kills: list[dict[str, Any]] = []
    try:
        # The kill schedule: one every kill_every_s, at a random offset within each period.
        for period in range(int(duration_s // kill_every_s)):
            if stop.wait(max(0.0, start + (period + rng.random()) * kill_every_s - time.monotonic())):
                break
            # Ray's state API may list a replica killed a moment ago as alive still.
            killed = {k["replica"] for k in kills}
            pools = {
                name: live for name, actors in stage_replicas(app_name).items()
                if name != "ingress" and (live := {a: pid for a, pid in actors.items() if a not in killed})
            }
            if not pools:
                continue
            pool = rng.choice(sorted(pools))
            actor, pid = rng.choice(sorted(pools[pool].items()))
            how = rng.choice(["sigkill", "ray.kill"])
            with lock:
                busy = in_flight[0]
            kill_replica(actor, pid, how)
            kills.append({"t_s": round(time.monotonic() - start, 1), "pool": pool, "replica": actor, "how": how, "requests_in_flight": busy})
        stop.wait(max(0.0, start + duration_s - time.monotonic()))
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    elapsed = time.monotonic() - start
    recovered_after = _wait_replaced(app_name, {k["replica"] for k in kills}, recovery_timeout_s)
    return _report(done, kills, elapsed, recovered_after, duration_s=duration_s, kill_every_s=kill_every_s,
                   concurrency=concurrency, seed=seed, max_retries=max_retries, timeout_s=timeout_s)


def _wait_replaced(app_name: str, killed: set[str], timeout_s: float) -> float | None:
    """Seconds until every killed replica is gone and each pool runs as many replicas as the
    controller wants; None if that did not happen within ``timeout_s``."""
    from ray import serve

    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        deployments = serve.status().applications[app_name].deployments
        alive = {name for actors in stage_replicas(app_name).values() for name in actors}
        if not killed & alive and all(d.status == "HEALTHY" for d in deployments.values()):
            return time.monotonic() - start
        time.sleep(1)
    return None


def _report(done: list[_Request], kills: list[dict[str, Any]], elapsed: float, recovered_after: float | None, **settings: Any) -> dict[str, Any]:
    outcomes = collections.Counter(r.outcome for r in done)
    by_kind = {
        kind: {"sent": sum(r.kind == kind for r in done), **collections.Counter(r.outcome for r in done if r.kind == kind)} for kind in KINDS
    }
    answered = sorted(r.seconds for r in done if r.outcome == "answered")
    return {
        "settings": settings,
        "elapsed_s": round(elapsed, 1),
        "sent": len(done),
        "answered": outcomes["answered"],
        "failed": outcomes["failed"],
        "lost": outcomes["lost"],
        "sdk_retries": sum(len(r.retries) for r in done),
        "requests_retried": sum(bool(r.retries) for r in done),
        "retried_then_answered": sum(bool(r.retries) and r.outcome == "answered" for r in done),
        "retry_causes": dict(collections.Counter(_retry_cause(e) for r in done for e in r.retries)),
        "failures": dict(collections.Counter(r.detail for r in done if r.outcome == "failed")),
        "lost_reasons": dict(collections.Counter(r.detail for r in done if r.outcome == "lost")),
        "by_kind": by_kind,
        "streams": sum(r.stream for r in done),
        "answer_latency_s": {
            "p50": round(float(np.percentile(answered, 50)), 2) if answered else None,
            "p99": round(float(np.percentile(answered, 99)), 2) if answered else None,
            "max": round(answered[-1], 2) if answered else None,
        },
        "kills": len(kills),
        "kills_with_requests_in_flight": sum(k["requests_in_flight"] > 0 for k in kills),
        "kill_log": kills,
        "recovered_after_s": None if recovered_after is None else round(recovered_after, 1),
    }
