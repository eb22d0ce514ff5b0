"""Where a staged request's serving overhead goes: one image question, hop by hop.

The same image question (tiny preset) is timed, one at a time:

    in process   each stage called directly (decode + encode, project, LLM), and the whole
                 ``LocalPipeline.chat``: the compute the request needs
    handles      each stage called through its Serve deployment handle from this process, as the
                 ingress calls it (the LLM as a stream): compute plus one hop each
    proxy        ``GET /v1/models`` over HTTP: the proxy and the ingress, no stage called
    http         the whole question over HTTP: everything

so the overhead splits into the proxy and ingress (``proxy``), each hop (``handles`` minus ``in
process``, per stage), and what is left (the ingress's own work between hops: parsing, header
checks, awaiting each ref). Medians of ``--runs``, milliseconds.

    .venv/bin/python benchmarks/hop_cost.py [--runs 60]
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


def median_ms(fn, runs: int) -> float:
    fn()  # warm
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(float(np.median(times)) * 1e3, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=60)
    args = parser.parse_args()

    import ray
    from ray import serve

    from omnistage.actors.payloads import LLMRequest
    from omnistage.cluster.config import load_config
    from omnistage.pipelines.local import LocalPipeline
    from omnistage.pipelines.messages import parse_messages
    from omnistage.pipelines.serve import APP_NAME, deploy

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
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
    deploy(config)
    encoder, projector, llm = (serve.get_deployment_handle(n, APP_NAME) for n in ("image_encoder", "input_projector", "llm"))

    def stream() -> Any:
        return list(llm.options(stream=True).stream.remote(request([]), embeddings, request_id="hop"))

    handles = {
        "image_encoder": median_ms(lambda: encoder.remote(item, request_id="hop").result(), args.runs),
        "input_projector": median_ms(lambda: projector.remote(features, request_id="hop").result(), args.runs),
        "llm": median_ms(stream, args.runs),
    }
    body = {"messages": MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 0, "seed": 0}
    with httpx.Client(base_url=f"http://127.0.0.1:{PORT}", timeout=60) as client:
        proxy = median_ms(lambda: client.get("/v1/models").raise_for_status(), args.runs)
        http = median_ms(lambda: client.post("/v1/chat/completions", json=body).raise_for_status(), args.runs)
    serve.shutdown()
    ray.shutdown()

    hops = {name: round(handles[name] - local[name], 2) for name in handles}
    overhead = round(http - local["chat"], 2)
    report = {
        "runs": args.runs,
        "in_process_ms": local,
        "through_handles_ms": handles,
        "per_hop_ms": hops,
        "proxy_and_ingress_ms": proxy,
        "http_ms": http,
        "overhead_ms": overhead,
        "unexplained_ms": round(overhead - proxy - sum(hops.values()), 2),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
