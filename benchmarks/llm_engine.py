"""The LLM engine (continuous batching) against static batching and sequential ``generate``.

One process, one model object shared by all three systems, requests arriving as a Poisson process:

- engine: ``omnistage.actors.engine.Engine``, stepped by this script as the Serve loop steps it;
- static: the old ``@serve.batch`` way: whatever waits (up to ``--static-batch``) forms a batch,
  decoded to its longest answer by transformers' ``generate`` before the next batch starts;
- sequential: one transformers ``generate`` per request, in arrival order.

Prompts and answer lengths are drawn from a mix (``--long-share`` of answers are ``--long-tokens``
long, the rest 8-32 tokens; prompts 20-300 tokens). So that every system writes the same number of
tokens, the LM-head rows of EOS and the special tokens are zeroed in memory: greedy decoding then
never picks them and every answer runs to its ``max_tokens``. Times are taken against each
request's scheduled arrival: TTFT (to its first token), TPOT (per token after the first), end-to-end
latency (to its last token, as a stream would see it). At a rate near zero (one request at a time)
the engine's latency is compared with a lone ``generate``.

    .venv/bin/python benchmarks/llm_engine.py [--model tiny|large|both] [--requests N]
        [--rates 4 16 64] [--threads 1] [--json out.json]

``large`` is a LLaMA built from a config (8 layers, width 512), where matrix work outweighs Python.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class Job:
    arrival: float  # seconds after the run's start
    prompt: str
    max_tokens: int
    first: float | None = None
    done: float | None = None
    tokens: int = 0


def _llm(kind: str, workdir: str):
    from omnistage.actors.builtin import ensure_preset
    from omnistage.actors.llm import LLM
    from omnistage.actors.tiny import build_llm
    from omnistage.cluster.config import EngineConfig, LLMConfig

    if kind == "tiny":
        model = "tiny"
        ensure_preset("tiny")
    else:
        model = os.path.join(workdir, "llama-8x512")
        build_llm(model, seed=0, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                   num_attention_heads=8, num_key_value_heads=8)
    llm = LLM(LLMConfig(model=model, engine=EngineConfig(max_running_seqs=32, max_prefill_tokens=512)))
    head = llm.model.get_output_embeddings().weight
    if head.data_ptr() == llm.embed_tokens.weight.data_ptr():
        raise SystemExit("the benchmark zeroes LM-head rows; this model ties them to the input embeddings")
    with torch.no_grad():
        head[sorted({*llm.eos_ids, *llm.banned.tolist()})] = 0
    return llm


def _workload(n: int, rate: float, long_share: float, long_tokens: int, seed: int) -> list[Job]:
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, n)) if rate > 0 else np.zeros(n)
    words = "the red circle moves left while a blue square waits on the right".split()
    jobs = []
    for t in arrivals:
        length = int(rng.integers(20, 300))
        prompt = " ".join(rng.choice(words, length // 4 + 1))[:length]
        max_tokens = long_tokens if rng.random() < long_share else int(rng.integers(8, 33))
        jobs.append(Job(float(t), prompt, max_tokens))
    return jobs


def _request(job: Job):
    from omnistage.actors.payloads import LLMRequest

    return LLMRequest(messages=[{"role": "user", "content": job.prompt}], max_tokens=job.max_tokens)


def _wait_until(start: float, t: float) -> None:
    delay = start + t - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def run_engine(llm, jobs: list[Job]) -> None:
    from omnistage.actors.engine import Engine

    engine = Engine(llm, llm.config.engine)
    start, next_job, added = time.perf_counter(), 0, {}
    while next_job < len(jobs) or engine.has_work():
        if not engine.has_work():
            _wait_until(start, jobs[next_job].arrival)
        now = time.perf_counter() - start
        while next_job < len(jobs) and jobs[next_job].arrival <= now:
            engine.add(str(next_job), _request(jobs[next_job]))
            added[str(next_job)] = time.perf_counter() - start
            next_job += 1
        for out in engine.step():
            if out.result is not None:
                job = jobs[int(out.request_id)]
                job.first = added[out.request_id] + out.ttft_s
                job.done = time.perf_counter() - start
                job.tokens = out.result.completion_tokens


class _StepClock:
    """A stopping criterion that never stops: it records when each decode step ends."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _generate(llm, batch: list[Job], start: float) -> None:
    """One transformers ``generate`` over ``batch``, left-padded, decoded to its longest answer."""
    from transformers import StoppingCriteriaList

    prompts = [llm.embed_prompt(_request(job)) for job in batch]
    width = max(p.shape[0] for p in prompts)
    embeds = prompts[0].new_zeros(len(batch), width, prompts[0].shape[1])
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        embeds[i, width - p.shape[0] :], mask[i, width - p.shape[0] :] = p, 1
    clock = _StepClock()
    with torch.inference_mode():
        llm.model.generate(
            inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max(j.max_tokens for j in batch),
            min_new_tokens=max(j.max_tokens for j in batch), do_sample=False, pad_token_id=llm.pad_id,
            stopping_criteria=StoppingCriteriaList([clock]),
        )
    for job in batch:
        job.first = clock.times[0] - start
        job.done = clock.times[job.max_tokens - 1] - start
        job.tokens = job.max_tokens


def run_static(llm, jobs: list[Job], batch_size: int) -> None:
    start, next_job = time.perf_counter(), 0
    while next_job < len(jobs):
        _wait_until(start, jobs[next_job].arrival)
        now = time.perf_counter() - start
        batch = []
        while next_job < len(jobs) and jobs[next_job].arrival <= now and len(batch) < batch_size:
            batch.append(jobs[next_job])
            next_job += 1
        _generate(llm, batch, start)


def run_sequential(llm, jobs: list[Job]) -> None:
    start = time.perf_counter()
    for job in jobs:
        _wait_until(start, job.arrival)
        _generate(llm, [job], start)


def summarize(jobs: list[Job]) -> dict[str, float]:
    ttft = [j.first - j.arrival for j in jobs]
    tpot = [(j.done - j.first) / (j.tokens - 1) for j in jobs if j.tokens > 1]
    e2e = [j.done - j.arrival for j in jobs]
    span = max(j.done for j in jobs) - min(j.arrival for j in jobs)
    pct = lambda v, q: float(np.percentile(v, q))  # noqa: E731
    return {
        "tokens_per_s": sum(j.tokens for j in jobs) / span,
        "requests_per_s": len(jobs) / span,
        "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
        "tpot_p50_s": pct(tpot, 50), "tpot_p99_s": pct(tpot, 99),
        "e2e_p50_s": pct(e2e, 50), "e2e_p99_s": pct(e2e, 99),
    }


def lone_latency(llm, jobs: list[Job]) -> dict[str, float]:
    """Rate near zero: each request alone, engine against generate, median ratio of latencies."""
    from omnistage.actors.engine import Engine

    engine = Engine(llm, llm.config.engine)
    ratios = []
    for job in jobs:
        t0 = time.perf_counter()
        engine.generate([_request(job)])
        t1 = time.perf_counter()
        _generate(llm, [Job(0.0, job.prompt, job.max_tokens)], t1)
        t2 = time.perf_counter()
        ratios.append((t1 - t0) / (t2 - t1))
    return {"engine_over_generate_p50": float(np.median(ratios)), "max": float(max(ratios)), "requests": len(jobs)}


def check_same_tokens(llm, jobs: list[Job]) -> None:
    """The systems write the same greedy answers (sanity check before timing them)."""
    from omnistage.actors.engine import Engine

    results = Engine(llm, llm.config.engine).generate([_request(j) for j in jobs])
    for job, result in zip(jobs, results):
        embeds = llm.embed_prompt(_request(job))[None]
        with torch.inference_mode():
            expected = llm.model.generate(
                inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                max_new_tokens=job.max_tokens, do_sample=False, pad_token_id=llm.pad_id,
            )[0].tolist()
        assert result.token_ids == expected, "engine and generate disagree"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["tiny", "large", "both"], default="both")
    parser.add_argument("--requests", type=int, help="requests per run (default: 64 tiny, 24 large)")
    parser.add_argument("--rates", type=float, nargs="+", help="requests per second (default: per model)")
    parser.add_argument("--long-share", type=float, default=0.3)
    parser.add_argument("--long-tokens", type=int, default=200)
    parser.add_argument("--static-batch", type=int, default=8, help="the old @serve.batch max_batch_size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 1 keeps OpenMP from spinning on a busy machine")
    parser.add_argument("--json", help="write the report here too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    report = {"args": vars(args), "models": {}}
    with tempfile.TemporaryDirectory() as workdir:
        os.environ.setdefault("OMNISTAGE_HOME", os.path.join(workdir, "home"))
        for kind in (["tiny", "large"] if args.model == "both" else [args.model]):
            llm = _llm(kind, workdir)
            check_same_tokens(llm, _workload(4, 0, args.long_share, 24, args.seed))
            rates = args.rates or ([4, 16, 64, 256] if kind == "tiny" else [0.25, 1, 4])
            n = args.requests or (64 if kind == "tiny" else 24)
            rows = {}
            for rate in rates:
                for system in ("engine", "static", "sequential"):
                    jobs = _workload(n, rate, args.long_share, args.long_tokens, args.seed)
                    if system == "engine":
                        run_engine(llm, jobs)
                    elif system == "static":
                        run_static(llm, jobs, args.static_batch)
                    else:
                        run_sequential(llm, jobs)
                    rows[f"{rate:g}/{system}"] = summarize(jobs)
                    print(kind, f"rate={rate:g}", system, json.dumps({k: round(v, 4) for k, v in rows[f"{rate:g}/{system}"].items()}), flush=True)
            lone = lone_latency(llm, _workload(12 if kind == "tiny" else 6, 0, args.long_share, args.long_tokens, args.seed + 1))
            print(kind, "lone", json.dumps(lone), flush=True)
            top = f"{rates[-1]:g}"
            ratios = {
                "throughput_engine_over_static": rows[f"{top}/engine"]["tokens_per_s"] / rows[f"{top}/static"]["tokens_per_s"],
                "ttft_p99_static_over_engine": rows[f"{top}/static"]["ttft_p99_s"] / rows[f"{top}/engine"]["ttft_p99_s"],
                "throughput_engine_over_sequential": rows[f"{top}/engine"]["tokens_per_s"] / rows[f"{top}/sequential"]["tokens_per_s"],
            }
            print(kind, "at the highest rate", json.dumps({k: round(v, 2) for k, v in ratios.items()}), flush=True)
            report["models"][kind] = {"rates": rows, "lone": lone, "highest_rate": ratios}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
