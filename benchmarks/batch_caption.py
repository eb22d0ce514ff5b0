"""Captioning throughput: the Ray Data batch job against a plain loop over ``LocalPipeline``.

Both caption the same seeded Parquet file of small PNG images with the same models, prompt and
``max_tokens``, in this one run. Each side is timed from a cold start to its answers in hand:
the loop from loading the pipeline to the last answer, the job from ``run_caption`` to its
Parquet output (actor start-up and model loads included). Starting Ray itself is timed apart:
on a cluster it is already running. The loop runs with whichever torch thread count (1 or 2) is
faster at the time, measured on 30 rows just before; the job's actors run one thread each (Ray sets
``OMP_NUM_THREADS`` from their fractional CPUs).

    python benchmarks/batch_caption.py                      # 2,000 images, the tiny preset
    python benchmarks/batch_caption.py --config benchmarks/batch_caption.yaml --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def _messages(image: bytes, prompt: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": image}, {"type": "text", "text": prompt}]}]


def loop_threads(sample: Path, config: str, max_tokens: int, prompt: str, rows: int = 30) -> dict[int, float]:
    """Seconds per row of the loop at 1 and 2 torch threads, on the first rows.

    OpenMP threads spin while they wait for each other: on a busy machine two threads can be ten
    times slower than one, on an idle one faster. The loop gets whichever is faster right now.
    """
    import pyarrow.parquet as pq
    import torch

    from omnistage.pipelines import LocalPipeline

    pipeline = LocalPipeline.from_config(config)
    images = pq.read_table(sample).column("image").to_pylist()[:rows]
    pipeline.chat(_messages(images[0], prompt), max_tokens=max_tokens)  # warm-up
    per_row = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        start = time.perf_counter()
        for image in images:
            pipeline.chat(_messages(image, prompt), max_tokens=max_tokens)
        per_row[threads] = (time.perf_counter() - start) / len(images)
    return per_row


def baseline(sample: Path, output: Path, config: str, max_tokens: int, prompt: str, threads: int) -> tuple[float, int]:
    """Seconds and rows for a loop of ``LocalPipeline.chat`` over the rows, one image per call."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from omnistage.actors.errors import InvalidInputError
    from omnistage.pipelines import LocalPipeline

    torch.set_num_threads(threads)
    start = time.perf_counter()
    pipeline = LocalPipeline.from_config(config)
    table = pq.read_table(sample)
    answers = []
    for image in table.column("image").to_pylist():
        try:
            answers.append(pipeline.chat(_messages(image, prompt), max_tokens=max_tokens).text)
        except InvalidInputError:
            answers.append(None)
    pq.write_table(table.select(["id"]).append_column("answer", pa.array(answers, pa.string())), output)
    return time.perf_counter() - start, len(answers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--config", default="tiny", help="preset name or YAML path, for both sides")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--rounds", type=int, default=1, help="run each side this many times, ABBA order; the best of each is compared"
    )
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # The loop logs one line per chat; keep only warnings so that printing does not slow it.
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    import ray

    from omnistage.actors.builtin import ensure_preset
    from omnistage.pipelines.batch import DEFAULT_PROMPTS, run_caption
    from omnistage.pipelines.batch_io import make_sample_dataset

    ensure_preset("tiny")  # built before either side is timed
    work = Path(tempfile.mkdtemp(prefix="omnistage-bench-"))
    sample, _ = make_sample_dataset(work / "in", rows=args.rows, kind="image", seed=0)
    prompt = DEFAULT_PROMPTS["image"]

    start = time.perf_counter()
    ray.init(include_dashboard=False)
    ray_init_s = time.perf_counter() - start

    runs: list[dict] = []
    # ABBA (loop, job, job, loop, ...): load that drifts during the run hits both sides alike.
    order = [side for r in range(args.rounds) for side in (("loop", "job") if r % 2 == 0 else ("job", "loop"))]
    for index, side in enumerate(order):
        if side == "loop":
            # Chosen again before each loop: other work on the machine comes and goes.
            per_row = loop_threads(sample, args.config, args.max_tokens, prompt)
            threads = min(per_row, key=per_row.get)
            extra = {"threads": threads, "seconds_per_row_by_threads": {k: round(v, 4) for k, v in per_row.items()}}
            load = os.getloadavg()[0]
            seconds, rows = baseline(sample, work / f"loop-{index}.parquet", args.config, args.max_tokens, prompt, threads)
        else:
            extra = {}
            load = os.getloadavg()[0]
            summary = run_caption(str(sample), str(work / f"job-{index}"), config=args.config, max_tokens=args.max_tokens)
            seconds, rows = summary.seconds, summary.rows_done
        runs.append(
            {"side": side, "seconds": round(seconds, 2), "rows_per_second": round(rows / seconds, 2),
             "load_1m": [round(load, 2), round(os.getloadavg()[0], 2)], **extra}
        )
        print(json.dumps(runs[-1]), flush=True)
    ray.shutdown()

    best = {side: max(r["rows_per_second"] for r in runs if r["side"] == side) for side in ("loop", "job")}
    results = {
        "rows": args.rows,
        "config": args.config,
        "max_tokens": args.max_tokens,
        "cpus": os.cpu_count(),
        "ray_init_seconds": round(ray_init_s, 2),
        "runs": runs,
        "best_rows_per_second": best,
        "ratio": round(best["job"] / best["loop"], 2),
    }
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
