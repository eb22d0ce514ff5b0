"""The LLM engine (continuous batching) against static batching and sequential ``generate``, and
the vLLM backend beside it.

One process, one model object shared by all three systems, requests arriving as a Poisson process:

- engine: the stage's engine, stepped by this script as the Serve loop steps it: the built-in
  ``omnistage.actors.engine.Engine``, or with ``--backend vllm`` vLLM's (``VLLMEngine``);
- static: the old ``@serve.batch`` way: whatever waits (up to ``--static-batch``) forms a batch,
  decoded to its longest answer by transformers' ``generate`` before the next batch starts;
- sequential: one transformers ``generate`` per request, in arrival order.

vLLM runs in its own environment (``make vllm-env``): ``--backend vllm`` is run with
.venv-vllm/bin/python and times the vLLM engine only (static and sequential are the same code in
either environment). ``--backend both``, run with .venv/bin/python, runs the built-in engine here
and the vLLM engine under ``--vllm-python`` on the same workload, and reports vLLM's throughput
and latency over the built-in engine's at each rate.

Prompts and answer lengths are drawn from a mix (``--long-share`` of answers are ``--long-tokens``
long, the rest 8-32 tokens; prompts 20-300 tokens). So that every system writes the same number of
tokens, the LM-head rows of EOS and the special tokens are zeroed in memory: greedy decoding then
never picks them and every answer runs to its ``max_tokens``. Times are taken against each
request's scheduled arrival: TTFT (to its first token), TPOT (per token after the first), end-to-end
latency (to its last token, as a stream would see it). At a rate near zero (one request at a time)
the engine's latency is compared with a lone ``generate``.

    .venv/bin/python benchmarks/llm_engine.py [--model tiny|small|large|1b|both] [--backend builtin|vllm|both]
        [--requests N] [--rates 4 16 64] [--threads 1] [--dtype float32] [--json out.json]

LLaMAs built from configs: ``small`` (2 layers, width 128, head size 64: the smallest vLLM's CPU
attention takes), ``large`` (8 layers, width 512), where matrix work outweighs Python, and ``1b``
(Llama 3.2 1B's shape: 16 layers, width 2048; for a GPU, with ``--dtype bfloat16``). ``both`` is
tiny and large. The tiny preset's head size (8) is one vLLM refuses.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
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


# LlamaConfig sizes per --model (the tiny one is the tiny preset's).
SIZES = {
    "small": {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2},
    "large": {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 8},
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8},
}


def _llm(kind: str, workdir: str, backend: str, dtype: str, kv_cache_gb: float):
    """The stage on ``kind``'s model, with the LM-head rows of EOS and the banned tokens zeroed in the
    checkpoint itself (so vLLM, which loads its own copy, never picks them either)."""
    from omnistage.actors.builtin import ensure_preset, resolve_checkpoint
    from omnistage.actors.llm import LLM
    from omnistage.actors.tiny import build_llm
    from omnistage.cluster.config import EngineConfig, LLMConfig

    if kind == "tiny":
        ensure_preset("tiny")
        source = str(resolve_checkpoint("tiny", "llm"))
    else:
        source = os.path.join(workdir, f"llama-{kind}")
        if not os.path.isdir(source):
            build_llm(source, seed=0, **SIZES[kind])
    model = os.path.join(workdir, f"llama-{kind}-no-eos")
    if not os.path.isdir(model):
        probe = LLM(LLMConfig(model=source))
        head = probe.model.get_output_embeddings().weight
        if head.data_ptr() == probe.embed_tokens.weight.data_ptr():
            raise SystemExit("the benchmark zeroes LM-head rows; this model ties them to the input embeddings")
        with torch.no_grad():
            head[sorted({*probe.eos_ids, *probe.banned.tolist()})] = 0
        probe.model.save_pretrained(model)
        probe.tokenizer.save_pretrained(model)
        del probe
    if backend == "vllm":
        kv = int(kv_cache_gb * 2**30)
        engine = EngineConfig(backend="vllm", vllm={"max_num_seqs": 32, "max_model_len": 2048, "kv_cache_memory_bytes": kv})
    else:
        engine = EngineConfig(max_running_seqs=32, max_prefill_tokens=512)
    return LLM(LLMConfig(model=model, dtype=dtype, engine=engine))


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
    engine = llm.engine
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
    engine = llm.engine
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
    results = llm.engine.generate([_request(j) for j in jobs])
    for job, result in zip(jobs, results):
        embeds = llm.embed_prompt(_request(job))[None]
        with torch.inference_mode():
            expected = llm.model.generate(
                inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                max_new_tokens=job.max_tokens, do_sample=False, pad_token_id=llm.pad_id,
            )[0].tolist()
        assert result.token_ids == expected, "engine and generate disagree"


def run_backend(args, kind: str, workdir: str) -> dict:
    """Every rate on one model with this process's backend; with vLLM, its engine only."""
    llm = _llm(kind, workdir, args.backend, args.dtype, args.kv_cache_gb)
    check_same_tokens(llm, _workload(4, 0, args.long_share, 24, args.seed))
    systems = ("engine",) if args.backend == "vllm" else ("engine", "static", "sequential")
    rows = {}
    for rate in _rates(args, kind):
        for system in systems:
            jobs = _workload(_requests(args, kind), rate, args.long_share, args.long_tokens, args.seed)
            if system == "engine":
                run_engine(llm, jobs)
            elif system == "static":
                run_static(llm, jobs, args.static_batch)
            else:
                run_sequential(llm, jobs)
            rows[f"{rate:g}/{system}"] = summarize(jobs)
            print(kind, args.backend, f"rate={rate:g}", system, json.dumps({k: round(v, 4) for k, v in rows[f"{rate:g}/{system}"].items()}), flush=True)
    lone = lone_latency(llm, _workload(12 if kind in ("tiny", "small") else 6, 0, args.long_share, args.long_tokens, args.seed + 1))
    print(kind, args.backend, "lone", json.dumps(lone), flush=True)
    report = {"rates": rows, "lone": lone}
    if args.backend == "builtin":
        top = f"{_rates(args, kind)[-1]:g}"
        report["highest_rate"] = {
            "throughput_engine_over_static": rows[f"{top}/engine"]["tokens_per_s"] / rows[f"{top}/static"]["tokens_per_s"],
            "ttft_p99_static_over_engine": rows[f"{top}/static"]["ttft_p99_s"] / rows[f"{top}/engine"]["ttft_p99_s"],
            "throughput_engine_over_sequential": rows[f"{top}/engine"]["tokens_per_s"] / rows[f"{top}/sequential"]["tokens_per_s"],
        }
        print(kind, "at the highest rate", json.dumps({k: round(v, 2) for k, v in report["highest_rate"].items()}), flush=True)
    return report


def _rates(args, kind: str) -> list[float]:
    return args.rates or ([4, 16, 64, 256] if kind in ("tiny", "small") else [0.25, 1, 4])


def _requests(args, kind: str) -> int:
    return args.requests or (64 if kind in ("tiny", "small") else 24)


def vllm_over_builtin(builtin: dict, vllm: dict) -> dict[str, dict[str, float]]:
    """Per rate: vLLM's throughput over the built-in engine's, and the built-in engine's latencies
    over vLLM's (above 1: vLLM is better)."""
    ratios = {}
    for key, b in builtin["rates"].items():
        if key.endswith("/engine"):
            v = vllm["rates"][key]
            ratios[key.removesuffix("/engine")] = {
                "throughput": v["tokens_per_s"] / b["tokens_per_s"],
                "ttft_p50": b["ttft_p50_s"] / v["ttft_p50_s"],
                "tpot_p50": b["tpot_p50_s"] / v["tpot_p50_s"],
                "e2e_p99": b["e2e_p99_s"] / v["e2e_p99_s"],
            }
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["tiny", "small", "large", "1b", "both"], default="both")
    parser.add_argument("--backend", choices=["builtin", "vllm", "both"], default="builtin")
    parser.add_argument("--vllm-python", default=".venv-vllm/bin/python", help="interpreter of the vLLM environment (--backend both)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--kv-cache-gb", type=float, default=1.0, help="vLLM's KV cache (the CPU build otherwise takes a share of host memory)")
    parser.add_argument("--requests", type=int, help="requests per run (default: 64 tiny and small, 24 larger)")
    parser.add_argument("--rates", type=float, nargs="+", help="requests per second (default: per model)")
    parser.add_argument("--long-share", type=float, default=0.3)
    parser.add_argument("--long-tokens", type=int, default=200)
    parser.add_argument("--static-batch", type=int, default=8, help="the old @serve.batch max_batch_size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 1 keeps OpenMP from spinning on a busy machine")
    parser.add_argument("--json", help="write the report here too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kinds = ["tiny", "large"] if args.model == "both" else [args.model]
    if args.backend != "builtin" and "tiny" in kinds:
        parser.error("vLLM's CPU attention refuses the tiny preset's head size (8): use --model small, large or 1b")

    report = {"args": vars(args), "models": {}}
    with tempfile.TemporaryDirectory() as workdir:
        os.environ.setdefault("OMNISTAGE_HOME", os.path.join(workdir, "home"))
        if args.backend == "both":
            vllm_json = os.path.join(workdir, "vllm.json")
            # The vLLM half in its own interpreter, on the same workloads.
            command = [args.vllm_python, __file__, *_without(sys.argv[1:], ("--backend", "--json", "--vllm-python")),
                       "--backend", "vllm", "--json", vllm_json]
            args.backend = "builtin"
            builtin = {kind: run_backend(args, kind, workdir) for kind in kinds}
            subprocess.run(command, check=True)
            with open(vllm_json) as f:
                vllm = json.load(f)["models"]
            for kind in kinds:
                ratios = vllm_over_builtin(builtin[kind], vllm[kind])
                for rate, row in ratios.items():
                    print(kind, f"rate={rate}", "vllm over builtin", json.dumps({k: round(v, 2) for k, v in row.items()}), flush=True)
                report["models"][kind] = {"builtin": builtin[kind], "vllm": vllm[kind], "vllm_over_builtin": ratios}
        else:
            report["models"] = {kind: run_backend(args, kind, workdir) for kind in kinds}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


def _without(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """``argv`` less each of ``options`` and the value after it."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        else:
            out.append(arg)
    return out


if __name__ == "__main__":
    main()
