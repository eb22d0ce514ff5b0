"""Serving overhead and throughput: the staged Serve app against in-process and monolithic baselines.

(a) Latency of one image question, one client: ``LocalPipeline`` in this process against the
    staged app over HTTP. The difference of the medians is the serving overhead.
(b) Throughput under a mixed load (1/2 image questions, 1/4 audio questions, 1/4 image
    generations) at several concurrencies: the staged app against a monolith, one deployment
    whose replicas each hold a whole ``LocalPipeline`` and serve one request at a time, given the
    same CPUs.

Both sides use the same preset and run in this one script, so the ratios hold on a noisy machine.

    .venv/bin/python benchmarks/serve_bench.py [--config tiny] [--requests 64] [--concurrency 1 8 32]
"""

import argparse
import asyncio
import base64
import json
import os
import threading
import time

import httpx
import numpy as np

from omnistage.actors.media import encode_png, encode_wav
from omnistage.pipelines.demo import sample_audio, sample_image

PORT = 8941


def _url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


IMAGE_Q = {
    "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _url("image/png", encode_png(sample_image()))}},
        {"type": "text", "text": "What is in this image?"},
    ]}],
    "max_tokens": 8, "temperature": 0, "seed": 0,
}
AUDIO_Q = {
    "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(encode_wav(*sample_audio())).decode(), "format": "wav"}},
        {"type": "text", "text": "What do you hear?"},
    ]}],
    "max_tokens": 8, "temperature": 0, "seed": 0,
}
IMAGE_GEN = {"messages": [{"role": "user", "content": "Draw a red circle."}], "max_tokens": 8, "temperature": 0, "seed": 0, "modalities": ["text", "image"]}
MIX = [IMAGE_Q, AUDIO_Q, IMAGE_Q, IMAGE_GEN]  # halves, quarters, quarters


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def latency_local(pipeline, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        pipeline.chat(IMAGE_Q["messages"], max_tokens=8, temperature=0, seed=0)
        times.append(time.perf_counter() - start)
    return times


def latency_http(url: str, runs: int) -> list[float]:
    times = []
    with httpx.Client(timeout=120) as client:
        for _ in range(runs):
            start = time.perf_counter()
            response = client.post(url, json=IMAGE_Q)
            response.raise_for_status()
            times.append(time.perf_counter() - start)
    return times


async def throughput(url: str, concurrency: int, total: int) -> float:
    """Requests per second completing ``total`` mixed requests with ``concurrency`` in flight."""
    queue = list(range(total))
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=concurrency)) as client:

        async def worker() -> None:
            while queue:
                i = queue.pop()
                response = await client.post(url, json=MIX[i % len(MIX)])
                response.raise_for_status()

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return total / (time.perf_counter() - start)


def deploy_monolith(config_name: str, cpus: float, replicas: int):
    """One deployment holding the whole pipeline per replica: the baseline the staged app beats."""
    from fastapi import FastAPI, Request
    from ray import serve

    api = FastAPI()

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": cpus}, max_ongoing_requests=64)
    @serve.ingress(api)
    class Monolith:
        def __init__(self, config: str):
            from omnistage.pipelines.local import LocalPipeline

            self.pipeline = LocalPipeline.from_config(config)
            self.lock = threading.Lock()  # one request at a time: no cross-request batching

        def _chat(self, body: dict) -> dict:
            with self.lock:
                result = self.pipeline.chat(
                    body["messages"], max_tokens=body["max_tokens"], temperature=body["temperature"],
                    seed=body["seed"], modalities=body.get("modalities"),
                )
            return {"text": result.text, "media": [m.mime_type for m in result.media]}

        @api.post("/v1/chat/completions")
        async def chat(self, request: Request) -> dict:
            return await asyncio.to_thread(self._chat, await request.json())

    serve.run(Monolith.bind(config_name), name="monolith", route_prefix="/mono")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    parser.add_argument("--latency-runs", type=int, default=60)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    args = parser.parse_args()

    import ray
    from ray import serve

    from omnistage.cluster.config import load_config
    from omnistage.pipelines.local import LocalPipeline
    from omnistage.pipelines.serve import APP_NAME, deploy

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = load_config(args.config)
    cpus = os.cpu_count() or 1
    ray.init(address="local", include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    results: dict = {"machine_cpus": cpus, "config": args.config}

    # (a) latency: in process, then through the staged app
    pipeline = LocalPipeline(config)
    latency_local(pipeline, 5)  # warm-up
    local = latency_local(pipeline, args.latency_runs)
    del pipeline
    deploy(config)
    staged_url = f"http://127.0.0.1:{PORT}/v1/chat/completions"
    latency_http(staged_url, 5)
    served = latency_http(staged_url, args.latency_runs)
    results["latency_ms"] = {
        "local": {"p50": percentile(local, 50) * 1e3, "p99": percentile(local, 99) * 1e3},
        "staged": {"p50": percentile(served, 50) * 1e3, "p99": percentile(served, 99) * 1e3},
    }
    results["latency_ms"]["overhead_p50"] = results["latency_ms"]["staged"]["p50"] - results["latency_ms"]["local"]["p50"]

    # (b) throughput: staged, then the monolith with the whole machine's CPUs
    results["throughput_rps"] = {"staged": {}, "monolith": {}}
    asyncio.run(throughput(staged_url, 8, 16))  # warm-up
    for c in args.concurrency:
        results["throughput_rps"]["staged"][c] = asyncio.run(throughput(staged_url, c, args.requests))
    serve.delete(APP_NAME)
    replicas = max(1, cpus)
    deploy_monolith(args.config, cpus=cpus / replicas, replicas=replicas)
    mono_url = f"http://127.0.0.1:{PORT}/mono/v1/chat/completions"
    asyncio.run(throughput(mono_url, 8, 16))
    for c in args.concurrency:
        results["throughput_rps"]["monolith"][c] = asyncio.run(throughput(mono_url, c, args.requests))
    results["staged_over_monolith"] = {
        c: results["throughput_rps"]["staged"][c] / results["throughput_rps"]["monolith"][c] for c in args.concurrency
    }
    serve.shutdown()
    ray.shutdown()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
