"""Goodput under mixed multimodal load: the staged app against two monoliths, open loop.

Systems, deployed side by side on the same Ray instance and CPUs, measured in one run:

    staged    the Serve app: a pool per stage; the LLM pool runs the continuous-batching engine
    monolith  replicas that each hold the whole pipeline and serve one request at a time (what
              wrapping a research model's demo in a Serve deployment gives)
    batched   the same replicas, whose requests share the continuous-batching LLM engine (encoders
              and generators still run one call at a time per replica)

Load: requests arrive as a Poisson process at each rate of a ladder (open loop: a request is sent
at its arrival time whatever the server is doing), drawn from a mix of image, audio and video
questions, text chats with long answers and image generations. Every request streams, so time to
first token (TTFT) and time per output token (TPOT, from the answer's usage) are read the same way
on every system. The systems take turns at each rate, so a slow minute of a noisy machine falls on
all of them.

SLOs: per request, TTFT and TPOT within their limits, and for generations the whole answer within
its own. The limits default to ``--slo-scale`` times what the kind costs alone on the monolith
(DistServe's "SLO scale"); ``--slo-ttft``, ``--slo-tpot`` and ``--slo-e2e`` set them absolutely.
Goodput, as DistServe defines it: the highest rate of the ladder at which at least
``--attainment`` (90%) of the requests met every SLO of their kind.

The preset keeps the proportions of LLaVA-1.5-7B + Stable Diffusion 1.5 served on one A100 (see
``REFERENCE``): the costs of an image encoding, a prefill and an image generation relative to one
decode step. It is built from configs (random weights; its EOS and special-token rows of the LM
head are zeroed so answers run to max_tokens), and the generator's denoising steps are calibrated
on this machine so the generation/decode ratio holds. The report prints the ratios measured.

    .venv/bin/pip install -e '.[server,bench]'
    .venv/bin/python benchmarks/goodput.py --json goodput.json --plot goodput.png
"""


# No `from __future__ import annotations`: FastAPI reads the route's `Request` annotation in the
# replica, where the class arrives pickled by value without this module's globals.
import argparse
import asyncio
import base64
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from omnistage.actors.media import encode_png, encode_video, encode_wav
from omnistage.pipelines.demo import sample_audio, sample_image, sample_video

PORT = 8951
SYSTEMS = ("staged", "monolith", "batched")

# One A100-80GB, bf16. Image generation: Stable Diffusion 1.5 at 512x512 took 1.18 s for 30 steps
# in diffusers' own benchmark (bf16, SDPA), so 50 DDIM steps ~ 2.0 s. LLaVA-1.5-7B: a decode step
# at batch 1 reads the 13.5 GB of weights (>= 6.7 ms at 2 TB/s; ~20 ms in transformers); a prefill
# of its ~650-token image prompt is ~9 TFLOP (~45 ms). CLIP ViT-L/14-336: 577 tokens x 0.3 B
# parameters ~ 0.35 TFLOP (~10 ms). Costs relative to one decode step:
REFERENCE = {"decode_step_ms": 20.0, "encode_image": 0.5, "prefill": 2.25, "generate_image": 100.0}

# Widths of the benchmark preset: a CLIP tower 256 wide, a LLaMA of 8 layers x 512, SD conditioning 64 wide.
BENCH_DIMS = {
    "image_encoder": 256,
    "audio_encoder": 16,
    "llm": 512,
    "image_cond": (77, 64),
    "video_cond": (77, 64),
    "audio_cond": (1, 64),
}


def _url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _parts(*media: dict[str, Any], text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [*media, {"type": "text", "text": text}]}]


IMAGE = {"type": "image_url", "image_url": {"url": _url("image/png", encode_png(sample_image()))}}
AUDIO = {"type": "input_audio", "input_audio": {"data": base64.b64encode(encode_wav(*sample_audio())).decode(), "format": "wav"}}
VIDEO = {"type": "video_url", "video_url": {"url": _url("video/mp4", encode_video(sample_video(), fps=8))}}

# Request kinds: the body each sends (less stream settings).
KINDS: dict[str, dict[str, Any]] = {
    "image_question": {"messages": _parts(IMAGE, text="What is in this image?"), "max_tokens": 16},
    "audio_question": {"messages": _parts(AUDIO, text="What do you hear?"), "max_tokens": 16},
    "video_question": {"messages": _parts(VIDEO, text="What happens in this video?"), "max_tokens": 16},
    # Captioning: the encoder's work with little of the LLM's (autoscale_mix.py's question phases).
    "video_caption": {"messages": _parts(VIDEO, text="Caption this video."), "max_tokens": 4},
    "long_chat": {"messages": [{"role": "user", "content": "Tell me a long story about a red circle."}], "max_tokens": 128},
    "image_generation": {"messages": [{"role": "user", "content": "Draw a red circle."}], "max_tokens": 8, "modalities": ["text", "image"]},
}
DEFAULT_MIX = {"image_question": 0.3, "audio_question": 0.15, "video_question": 0.15, "long_chat": 0.2, "image_generation": 0.2}


# --- the benchmark preset --------------------------------------------------------------------------


def build_preset(root: Path) -> Path:
    """Write the preset's checkpoints under ``root`` (once; seeded)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from omnistage.actors.tiny import (
        build_audio_encoder,
        build_image_encoder,
        build_image_generator,
        build_input_projector,
        build_llm,
        build_output_projector,
    )

    if (root / "done").exists():
        return root
    # 7x7 patches: on a CPU a prefill costs far more per token, relative to a decode step, than on
    # a GPU, so fewer image tokens keep the prefill/decode ratio near LLaVA's on an A100.
    build_image_encoder(root / "image_encoder", 0, image_size=224, patch_size=32, hidden_size=BENCH_DIMS["image_encoder"],
                        num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
    build_audio_encoder(root / "audio_encoder", 1)
    build_input_projector(root / "input_projector", 2, BENCH_DIMS)
    build_llm(root / "llm", 3, hidden_size=BENCH_DIMS["llm"], intermediate_size=1376, num_hidden_layers=8,
              num_attention_heads=8, num_key_value_heads=8)
    build_output_projector(root / "output_projector", 4, BENCH_DIMS)
    build_image_generator(root / "image_generator", 5, BENCH_DIMS)
    # Random weights would end some answers at once and emit signal tokens at random: zero the LM
    # head's rows of EOS and every special token, so answers run to max_tokens and media come only
    # when asked for (forced).
    tokenizer = AutoTokenizer.from_pretrained(root / "llm")
    model = AutoModelForCausalLM.from_pretrained(root / "llm")
    with torch.no_grad():
        model.get_output_embeddings().weight[sorted(set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder))] = 0
    model.save_pretrained(root / "llm")
    (root / "done").touch()
    return root


def bench_config(root: Path, generation_steps: int):
    """The app's config over the preset: every stage one replica on a quarter CPU, the image
    generator allowed a second one; no feature cache."""
    from omnistage.cluster.config import OmnistageConfig, load_config

    data = load_config("tiny").model_dump()
    data["name"] = "omnistage-goodput"
    # Every request brings a medium of its own, as real traffic does: no feature cache hits.
    data["cache"]["enabled"] = False
    data["stages"]["audio_generator"] = data["stages"]["video_generator"] = None
    for name, component in [
        ("image_encoder", "image_encoder"), ("video_encoder", "image_encoder"), ("audio_encoder", "audio_encoder"),
        ("input_projector", "input_projector"), ("llm", "llm"), ("output_projector", "output_projector"),
        ("image_generator", "image_generator"),
    ]:
        stage = data["stages"][name]
        stage["model"] = str(root / component)
        stage["resources"]["num_cpus"] = 0.25
        stage["scaling"].update(min_replicas=1, max_replicas=1)
    data["stages"]["image_generator"].update(num_inference_steps=generation_steps, height=64, width=64)
    data["stages"]["image_generator"]["scaling"].update(
        max_replicas=2, target_ongoing_requests=1, upscale_delay_s=2, downscale_delay_s=30, metrics_interval_s=1, look_back_period_s=4
    )
    data["stages"]["llm"]["defaults"]["max_tokens"] = 128
    data["server"]["request_timeout_s"] = 300
    return OmnistageConfig.model_validate(data)


def calibrate(root: Path, steps_hint: int = 25) -> dict[str, float]:
    """Each stage's cost alone on this machine (one torch thread, as in a replica), and the
    denoising steps that make an image generation cost ``REFERENCE['generate_image']`` decode steps."""
    import torch

    from omnistage.pipelines.local import LocalPipeline

    torch.set_num_threads(1)
    pipeline = LocalPipeline(bench_config(root, steps_hint))

    def best(fn, runs: int = 5) -> float:
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times) * 1e3

    def image_request():  # decode, encode and project the question's picture
        return pipeline.llm_request(KINDS["image_question"]["messages"])

    encode_ms = best(image_request)
    request = image_request()
    prefill_ms = best(lambda: pipeline.llm([_with(request, max_tokens=1)]))
    long_ms = best(lambda: pipeline.llm([_with(request, max_tokens=33)]), runs=3)
    decode_ms = (long_ms - prefill_ms) / 32
    signals = pipeline.llm([_with(request, max_tokens=1, force_modalities=["image"])])[0].signals
    generate_ms = best(lambda: pipeline.generate_media(signals, 0), runs=2)
    steps = max(1, round(steps_hint * REFERENCE["generate_image"] * decode_ms / generate_ms))
    return {
        "decode_step_ms": decode_ms,
        "encode_image": encode_ms / decode_ms,
        "prefill": prefill_ms / decode_ms,
        "generate_image_at_hint": generate_ms / decode_ms,
        "generation_steps": steps,
        "generate_image": generate_ms / decode_ms * steps / steps_hint,
    }


def _with(request: Any, **changes: Any) -> Any:
    import dataclasses

    return dataclasses.replace(request, **changes)


# --- the monoliths ---------------------------------------------------------------------------------


def deploy_monolith(config: Any, name: str, *, one_at_a_time: bool, replicas: int) -> None:
    """Replicas that each hold every stage, answering the OpenAI chat route as a stream.

    Both kinds drive the LLM through the same engine loop as the staged app's LLM pool
    (``LLMServer``) and run the other stages through ``LocalPipeline``, in the replica. The
    ``monolith`` takes one request at a time; the ``batched`` one lets its requests share the
    engine's batch, while encoders and generators run one call at a time on one worker thread.
    """
    from ray import serve

    api = FastAPI()

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=256)
    @serve.ingress(api)
    class Monolith:
        def __init__(self, config_data: dict[str, Any], one_at_a_time: bool):
            from concurrent.futures import ThreadPoolExecutor

            from omnistage.cluster.config import OmnistageConfig
            from omnistage.pipelines.deployments import LLMServer
            from omnistage.pipelines.local import LocalPipeline

            config = OmnistageConfig.model_validate(config_data)
            self.llm = LLMServer("llm", config.stages.llm.model_dump(mode="json"))
            self.pipeline = LocalPipeline(config, loaded={"llm": self.llm.stage})
            self.worker = ThreadPoolExecutor(max_workers=1)
            self.gate = asyncio.Semaphore(1 if one_at_a_time else 1 << 20)

        async def _on_worker(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
            return await asyncio.get_running_loop().run_in_executor(self.worker, lambda: fn(*args, **kwargs))

        async def _events(self, body: dict[str, Any]):
            from omnistage.actors.payloads import SignalGroup

            async with self.gate:
                try:
                    request = await self._on_worker(
                        self.pipeline.llm_request, body["messages"], max_tokens=body.get("max_tokens"),
                        temperature=body.get("temperature"), seed=body.get("seed"), modalities=body.get("modalities"),
                    )
                    signals, reply = [], None
                    async for item in self.llm.stream(request, *request.media):
                        if isinstance(item, str):
                            if item:
                                yield _event({"choices": [{"index": 0, "delta": {"content": item}}]})
                        elif isinstance(item, SignalGroup):
                            signals.append(item)
                        else:
                            reply = item
                    media = await self._on_worker(self.pipeline.generate_media, signals, body.get("seed"))
                    if media:
                        yield _event({"choices": [{"index": 0, "delta": {"media": [m.mime_type for m in media]}}]})
                    yield _event({"choices": [{"index": 0, "delta": {}, "finish_reason": reply.finish_reason}]})
                except Exception as exc:  # the stream's headers are sent: errors travel as an event
                    yield _event({"error": {"message": f"{type(exc).__name__}: {exc}"}})
            yield "data: [DONE]\n\n"

        @api.post("/v1/chat/completions")
        async def chat(self, request: Request) -> StreamingResponse:
            return StreamingResponse(self._events(await request.json()), media_type="text/event-stream")

    serve.run(Monolith.bind(config.model_dump(mode="json"), one_at_a_time), name=name, route_prefix=f"/{name}")


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


# --- the load ---------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One request: when it was due, its first and last text chunks, how many, its end, its error."""

    kind: str
    due: float
    first: float | None = None
    last: float | None = None
    chunks: int = 0
    end: float | None = None
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.due

    @property
    def tpot(self) -> float | None:
        """The mean gap between text chunks after the first: each decode step streams one chunk
        (vLLM's inter-token latency); a generation's media, after the text, are not in it."""
        if self.first is None or self.chunks < 2:
            return None
        return (self.last - self.first) / (self.chunks - 1)

    @property
    def e2e(self) -> float | None:
        return None if self.end is None else self.end - self.due


async def _send(client: httpx.AsyncClient, url: str, kind: str, due: float, seed: int) -> Outcome:
    outcome = Outcome(kind, due)
    body = {**KINDS[kind], "temperature": 0, "seed": seed, "stream": True}
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                outcome.error = f"HTTP {response.status_code}"
                return outcome
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    outcome.error = str(event["error"].get("message", ""))[:200]
                for choice in event.get("choices", []):
                    if choice.get("delta", {}).get("content"):
                        outcome.last = time.perf_counter()
                        outcome.first = outcome.first or outcome.last
                        outcome.chunks += 1
            outcome.end = time.perf_counter()
    except httpx.HTTPError as exc:
        outcome.error = type(exc).__name__
    return outcome


async def run_load(url: str, rate: float, duration_s: float, mix: dict[str, float], seed: int) -> list[Outcome]:
    """Open loop: Poisson arrivals at ``rate`` for ``duration_s``, each request of a kind drawn from ``mix``."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1 / rate, int(rate * duration_s * 2) + 8)
    arrivals = np.cumsum(gaps)
    arrivals = arrivals[arrivals < duration_s]
    kinds = rng.choice(list(mix), size=len(arrivals), p=np.array(list(mix.values())) / sum(mix.values()))
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=None, max_keepalive_connections=64)) as client:
        start = time.perf_counter()

        async def one(i: int) -> Outcome:
            due = start + arrivals[i]
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            return await _send(client, url, str(kinds[i]), due, seed + i)

        return list(await asyncio.gather(*(one(i) for i in range(len(arrivals)))))


# --- the report -------------------------------------------------------------------------------------


@dataclass
class SLO:
    ttft_s: float
    tpot_s: float
    e2e_s: float | None = None  # generations only

    def met(self, o: Outcome) -> bool:
        if o.error is not None or o.ttft is None or o.ttft > self.ttft_s:
            return False
        if o.tpot is not None and o.tpot > self.tpot_s:
            return False
        return self.e2e_s is None or (o.e2e is not None and o.e2e <= self.e2e_s)


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1e3, 1) if values else None


def summarize(outcomes: list[Outcome], slos: dict[str, SLO]) -> dict[str, Any]:
    """Per kind: count, errors, TTFT / TPOT / end-to-end p50, p90, p99 (ms), SLO attainment."""
    report: dict[str, Any] = {"requests": len(outcomes), "errors": sum(o.error is not None for o in outcomes)}
    report["attainment"] = round(sum(slos[o.kind].met(o) for o in outcomes) / max(1, len(outcomes)), 3)
    e2e = [o.e2e for o in outcomes if o.e2e is not None and o.error is None]
    report["e2e_p99_ms"] = _pct(e2e, 99)
    report["kinds"] = {}
    for kind in sorted({o.kind for o in outcomes}):
        mine = [o for o in outcomes if o.kind == kind]
        row: dict[str, Any] = {"requests": len(mine), "errors": sum(o.error is not None for o in mine)}
        for metric in ("ttft", "tpot", "e2e"):
            values = [getattr(o, metric) for o in mine if getattr(o, metric) is not None and o.error is None]
            row[metric] = {f"p{q}": _pct(values, q) for q in (50, 90, 99)}
        row["attainment"] = round(sum(slos[kind].met(o) for o in mine) / len(mine), 3)
        errors = sorted({o.error for o in mine if o.error})
        if errors:
            row["error_messages"] = errors[:3]
        report["kinds"][kind] = row
    return report


def goodput(rows: dict[float, dict[str, Any]], attainment: float) -> float:
    """DistServe's goodput: the highest rate of the ladder whose SLO attainment is at least
    ``attainment``, with every lower rate meeting it too (0 when the lowest does not)."""
    best = 0.0
    for rate in sorted(rows):
        if rows[rate]["attainment"] < attainment:
            break
        best = rate
    return best


def solo_costs(url: str, kinds: list[str], runs: int) -> dict[str, dict[str, float]]:
    """Each kind's TTFT, TPOT and end-to-end latency alone on the system at ``url`` (medians)."""

    async def measure() -> dict[str, dict[str, float]]:
        out = {}
        async with httpx.AsyncClient(timeout=600) as client:
            for kind in kinds:
                samples = []
                for i in range(runs + 1):
                    o = await _send(client, url, kind, time.perf_counter(), i)
                    if o.error:
                        raise SystemExit(f"{kind} failed alone on {url}: {o.error}")
                    samples.append(o)
                samples = samples[1:] or samples  # the first warms the stages up
                out[kind] = {
                    "ttft_s": float(np.median([o.ttft for o in samples])),
                    "tpot_s": float(np.median([o.tpot for o in samples if o.tpot is not None] or [0.0])),
                    "e2e_s": float(np.median([o.e2e for o in samples])),
                }
        return out

    return asyncio.run(measure())


def plot(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for system in report["systems"]:
        rows = report["results"][system]
        rates = sorted(float(r) for r in rows)
        left.plot(rates, [rows[str(r)]["attainment"] * 100 for r in rates], marker="o", label=f"{system} (goodput {report['goodput'][system]} req/s)")
        right.plot(rates, [(rows[str(r)]["e2e_p99_ms"] or float("nan")) / 1e3 for r in rates], marker="o", label=system)
    left.axhline(report["attainment"] * 100, color="grey", linestyle="--", linewidth=1)
    left.set(xlabel="arrival rate (req/s)", ylabel="requests meeting their SLOs (%)", title="SLO attainment")
    right.set(xlabel="arrival rate (req/s)", ylabel="end-to-end p99 (s)", title="tail latency", yscale="log")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.5, 1, 2, 3, 4], help="arrival rates (req/s), the ladder")
    parser.add_argument("--duration", type=float, default=40, help="seconds of arrivals per rate and system")
    parser.add_argument("--mix", type=json.loads, default=DEFAULT_MIX, help=f"kind -> share, JSON (default {json.dumps(DEFAULT_MIX)})")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--replicas", type=int, default=os.cpu_count() or 1, help="monolith replicas (default: one per CPU)")
    parser.add_argument("--slo-scale", type=float, default=5, help="SLOs as this multiple of a kind's cost alone on the monolith")
    parser.add_argument("--slo-ttft", type=float, help="TTFT SLO in seconds, every kind")
    parser.add_argument("--slo-tpot", type=float, help="TPOT SLO in seconds, every kind")
    parser.add_argument("--slo-e2e", type=float, help="end-to-end SLO in seconds, generations")
    parser.add_argument("--attainment", type=float, default=0.9)
    parser.add_argument("--solo-runs", type=int, default=3)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "omnistage-goodput"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--plot", help="write the plot (PNG) here")
    args = parser.parse_args()
    unknown = set(args.mix) - set(KINDS)
    if unknown:
        raise SystemExit(f"expected mix kinds among {sorted(KINDS)}, got {sorted(unknown)}")

    import ray
    from ray import serve

    from omnistage.pipelines.serve import deploy

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = build_preset(Path(args.workdir) / "preset")
    costs = calibrate(root)
    print(json.dumps({"stage_costs_vs_decode_step": costs, "reference": REFERENCE}), flush=True)
    config = bench_config(root, int(costs["generation_steps"]))

    # Logical CPUs are scheduling tokens: the three systems are deployed at once but take turns
    # at the load, so each runs on the machine's real cores while the others idle.
    ray.init(address="local", num_cpus=16, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    urls = {}
    for system in args.systems:
        if system == "staged":
            deploy(config, name="staged", route_prefix="/staged")
        else:
            deploy_monolith(config, system, one_at_a_time=system == "monolith", replicas=args.replicas)
        urls[system] = f"http://127.0.0.1:{PORT}/{system}/v1/chat/completions"

    # SLOs from what each kind costs alone on the monolith (or the first system deployed); each
    # system first answers every kind once, so no first call's warm-up lands in the ladder.
    baseline = "monolith" if "monolith" in urls else args.systems[0]
    for system, url in urls.items():
        if system != baseline:
            solo_costs(url, list(args.mix), runs=0)
    solo = solo_costs(urls[baseline], list(args.mix), args.solo_runs)
    slos = {
        kind: SLO(
            ttft_s=args.slo_ttft or args.slo_scale * c["ttft_s"],
            tpot_s=args.slo_tpot or args.slo_scale * max(c["tpot_s"], 1e-3),
            e2e_s=(args.slo_e2e or args.slo_scale * c["e2e_s"]) if "modalities" in KINDS[kind] else None,
        )
        for kind, c in solo.items()
    }
    print(json.dumps({"solo_on_" + baseline: solo, "slos": {k: vars(v) for k, v in slos.items()}}), flush=True)

    results: dict[str, dict[str, Any]] = {s: {} for s in args.systems}
    for index, rate in enumerate(args.rates):
        # The systems take turns, in a rotating order, so machine noise falls on all of them.
        order = args.systems[index % len(args.systems):] + args.systems[: index % len(args.systems)]
        for system in order:
            outcomes = asyncio.run(run_load(urls[system], rate, args.duration, args.mix, args.seed + index))
            row = results[system][str(rate)] = summarize(outcomes, slos)
            brief = {k: row[k] for k in ("requests", "errors", "attainment", "e2e_p99_ms")}
            print(json.dumps({"system": system, "rate": rate, **brief}), flush=True)

    report = {
        "machine_cpus": os.cpu_count(),
        "systems": args.systems,
        "rates": args.rates,
        "duration_s": args.duration,
        "mix": args.mix,
        "attainment": args.attainment,
        "goodput_definition": "highest rate of the ladder (and every rate below it) at which at least "
        f"{args.attainment:.0%} of requests met every SLO of their kind (DistServe)",
        "stage_costs_vs_decode_step": costs,
        "reference": REFERENCE,
        "solo": solo,
        "slos": {k: vars(v) for k, v in slos.items()},
        "results": results,
        "goodput": {s: goodput({float(r): row for r, row in results[s].items()}, args.attainment) for s in args.systems},
    }
    serve.shutdown()
    ray.shutdown()
    print(json.dumps(report["goodput"]))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.plot:
        plot(report, args.plot)


if __name__ == "__main__":
    main()
