"""Where a staged request's serving overhead goes: one image question, hop by hop.

The same image question (tiny preset, feature cache off) is timed, one at a time:

    in process   each stage called directly (decode + encode, project, LLM), and the whole
                 ``LocalPipeline.chat``: the compute the request needs, on one torch thread as
                 in a replica
    handles      each stage called through its Serve deployment handle from this process, as the
                 ingress calls it (the LLM as a stream without text deltas): compute plus one hop
    proxy        ``GET /v1/models`` over HTTP: the proxy and the ingress, no stage called
    http         the whole question over HTTP: everything

for each placement of the input projector (``--placements``, default both: a pool of its own, and
inside the encoders' replicas), so the overhead (http minus the in-process ``chat``, at p50 and
p99) splits into the proxy and ingress (``proxy``), each hop (``handles`` minus ``in process``, per
stage), and what is left (the ingress's own work between hops: parsing, header checks, awaiting
each ref). Milliseconds over ``--runs`` requests.

    .venv/bin/python benchmarks/hop_cost.py [--runs 60] [--json report.json]
"""

import argparse
import base64
import json
import os
import time
from typing import Any

import httpx
import numpy as np

from omnistage.actors.media import encode_png
from omnistage.pipelines.demo import sample_image

PORT = 8961
MESSAGES = [{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(encode_png(sample_image())).decode()}},
    {"type": "text", "text": "What is in this image?"},
]}]
MAX_TOKENS = 8


def timed_ms(fn, runs: int) -> np.ndarray:
    fn()  # warm
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return np.array(times) * 1e3


def median_ms(fn, runs: int) -> float:
    return round(float(np.median(timed_ms(fn, runs))), 2)


def measure_app(placement: str, local: dict[str, float], item: Any, features: Any, llm_request: Any, embeddings: Any, runs: int) -> dict[str, Any]:
    """The deployed app's handle calls and HTTP latency, against the in-process times ``local``."""
    from ray import serve

    from omnistage.pipelines.serve import APP_NAME

    pools = ("image_encoder", "input_projector", "llm") if placement == "pool" else ("image_encoder", "llm")
    handle = {name: serve.get_deployment_handle(name, APP_NAME) for name in pools}

    def stream() -> Any:
        return list(handle["llm"].options(stream=True).stream.remote(llm_request, embeddings, request_id="hop", deltas=False))

    # Fused, the encoder's handle call is the encoder and the projector, one hop.
    handles = {
        "image_encoder": median_ms(lambda: handle["image_encoder"].remote(item, request_id="hop").result(), runs),
        "llm": median_ms(stream, runs),
    }
    if placement == "pool":
        handles["input_projector"] = median_ms(lambda: handle["input_projector"].remote(features, request_id="hop").result(), runs)
        hops = {name: round(handles[name] - local[name], 2) for name in handles}
    else:
        hops = {
            "image_encoder+input_projector": round(handles["image_encoder"] - local["image_encoder"] - local["input_projector"], 2),
            "llm": round(handles["llm"] - local["llm"], 2),
        }
    body = {"messages": MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 0, "seed": 0}
    with httpx.Client(base_url=f"http://127.0.0.1:{PORT}", timeout=60) as client:
        proxy = median_ms(lambda: client.get("/v1/models").raise_for_status(), runs)
        http = timed_ms(lambda: client.post("/v1/chat/completions", json=body).raise_for_status(), runs)
    p50, p99 = (round(float(np.percentile(http, q)), 2) for q in (50, 99))
    return {
        "through_handles_ms": handles,
        "per_hop_ms": hops,
        "proxy_and_ingress_ms": proxy,
        "http_ms": {"p50": p50, "p99": p99},
        "overhead_ms": {"p50": round(p50 - local["chat"], 2), "p99": round(p99 - local["chat"], 2)},
        "unexplained_ms": round(p50 - local["chat"] - proxy - sum(hops.values()), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--placements", default="pool,encoders", help="input_projector.placement values to measure, comma-separated")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args()

    import ray
    import torch
    from ray import serve

    from omnistage.actors.payloads import LLMRequest
    from omnistage.cluster.config import load_config
    from omnistage.pipelines.local import LocalPipeline
    from omnistage.pipelines.messages import parse_messages
    from omnistage.pipelines.serve import APP_NAME, deploy

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # A replica runs its model on one thread (Ray sets OMP_NUM_THREADS=1 for fractional CPUs); so
    # does the in-process baseline, or it would spin against the replicas for the same two cores.
    torch.set_num_threads(1)
    config = load_config("tiny")
    # Every request brings its own picture in real traffic: the feature cache would hide the encoder.
    config = config.model_copy(update={"cache": config.cache.model_copy(update={"enabled": False})})
    chat = parse_messages(MESSAGES, ["image"], None, config.server.limits)
    [(_, item)] = chat.media

    def request(media: list) -> LLMRequest:
        return LLMRequest(messages=chat.messages, media=media, max_tokens=MAX_TOKENS, temperature=0, seed=0)

    # In process: the stages themselves.
    pipeline = LocalPipeline(config)
    features = pipeline.encoders["image"]([item])[0]
    embeddings = pipeline.input_projector([features])[0]
    local = {
        "image_encoder": median_ms(lambda: pipeline.encoders["image"]([item]), args.runs),
        "input_projector": median_ms(lambda: pipeline.input_projector([features]), args.runs),
        "llm": median_ms(lambda: pipeline.llm([request([embeddings])]), args.runs),
        "chat": median_ms(lambda: pipeline.chat(MESSAGES, max_tokens=MAX_TOKENS, temperature=0, seed=0), args.runs),
    }

    ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    report: dict[str, Any] = {"runs": args.runs, "in_process_ms": local, "placements": {}}
    for placement in args.placements.split(","):
        stages = config.stages.model_copy(
            update={"input_projector": config.stages.input_projector.model_copy(update={"placement": placement})}
        )
        deploy(config.model_copy(update={"stages": stages}))
        report["placements"][placement] = measure_app(placement, local, item, features, request([]), embeddings, args.runs)
        serve.delete(APP_NAME)
    serve.shutdown()
    ray.shutdown()
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
