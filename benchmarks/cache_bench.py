"""Feature cache: a ten-turn chat that resends the same image every turn, with and without the cache.

Reports the image encoder stage's time per turn (the cache wraps it) and each turn's end-to-end
latency, for the same pipeline configuration with the cache off and on, in one run.

    .venv/bin/python benchmarks/cache_bench.py [--config tiny] [--redis-url redis://:pw@127.0.0.1:6379/0] [--rounds 5]
"""

import argparse
import json
import os
import statistics
import time

from omnistage.actors.media import encode_png
from omnistage.pipelines.demo import sample_image


class Timed:
    """Wraps a stage and adds up the seconds spent in its calls."""

    def __init__(self, stage):
        self.stage = stage
        self.seconds = 0.0

    def __getattr__(self, name):
        return getattr(self.stage, name)

    def __call__(self, items):
        start = time.perf_counter()
        try:
            return self.stage(items)
        finally:
            self.seconds += time.perf_counter() - start


def ten_turns(pipeline, image_png: bytes, turns: int = 10) -> tuple[list[float], list[float]]:
    """Per turn: image encoder seconds and end-to-end seconds."""
    timed = Timed(pipeline.encoders["image"])
    pipeline.encoders["image"] = timed
    history = [{"role": "user", "content": [{"type": "image_url", "image_url": image_png}, {"type": "text", "text": "What is this?"}]}]
    encoder, total = [], []
    for turn in range(turns):
        before = timed.seconds
        start = time.perf_counter()
        answer = pipeline.chat(history, max_tokens=8, temperature=0, seed=0)
        total.append(time.perf_counter() - start)
        encoder.append(timed.seconds - before)
        history += [{"role": "assistant", "content": answer.text}, {"role": "user", "content": f"And turn {turn + 2}?"}]
    pipeline.encoders["image"] = timed.stage
    return encoder, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--redis-url", help="share the cache through this Redis (default: in-process cache)")
    parser.add_argument("--rounds", type=int, default=5, help="ten-turn chats per setting, each with a new image")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from omnistage.cluster.config import load_config
    from omnistage.pipelines.local import LocalPipeline

    base = load_config(args.config)
    settings = {
        "no_cache": base.model_copy(update={"cache": base.cache.model_copy(update={"enabled": False})}),
        "cache": base.model_copy(update={"cache": base.cache.model_copy(update={"redis_url": args.redis_url})}),
    }
    pipelines = {name: LocalPipeline(config) for name, config in settings.items()}
    results = {}
    for name, pipeline in pipelines.items():
        encoder_ms, turn_ms, later_encoder_ms = [], [], []
        for round_index in range(args.rounds + 1):
            # A new image each round, so the cache starts cold for every chat.
            image = sample_image(64)
            image[0, 0] = (round_index, round_index * 7 % 256, 3)
            encoder, total = ten_turns(pipeline, encode_png(image))
            if round_index == 0:
                continue  # warm-up
            encoder_ms += [s * 1e3 for s in encoder]
            later_encoder_ms += [s * 1e3 for s in encoder[1:]]
            turn_ms += [s * 1e3 for s in total]
        results[name] = {
            "encoder_ms_per_turn": statistics.mean(encoder_ms),
            "encoder_ms_turns_2_to_10": statistics.mean(later_encoder_ms),
            "turn_ms_p50": statistics.median(turn_ms),
        }
    results["encoder_speedup_turns_2_to_10"] = (
        results["no_cache"]["encoder_ms_turns_2_to_10"] / results["cache"]["encoder_ms_turns_2_to_10"]
    )
    results["turn_p50_speedup"] = results["no_cache"]["turn_ms_p50"] / results["cache"]["turn_ms_p50"]
    results["store"] = "redis" if args.redis_url else "in-process"
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
