"""Autoscaling that follows the mix: a load that shifts from video captions to image generations
and back, under each autoscaling policy, with every pool's replica count recorded over time.

The staged app (tiny preset) is deployed once per policy (``scaling.policy`` of the video encoder
and image generator pools; the LLM pool scales on sequences in flight in both; each of the three
between 1 and ``--max-replicas``):

    ongoing_requests  Serve's default: replicas = requests in flight / target_ongoing_requests
    utilisation       omnistage.pipelines.autoscaling: seconds of model work per second, plus the
                      backlog, over target_utilisation

Load, open loop (Poisson arrivals, streamed answers): ``--phase-s`` seconds of video captions at
``--caption-rate``, then image generations at ``--generation-rate``, then video captions again.
Every second the replica count of each pool is read from ``serve.status()``. Per phase and policy:
TTFT, time per output token and end-to-end latency percentiles, errors, and the share of requests
that met their SLOs (``--slo-scale`` times the kind's cost alone, as in ``goodput.py``).

The pools react in seconds here (upscale delay 2 s, downscale delay 10 s, metrics every second over
a 5 s window) so that a run takes minutes; Serve's defaults (30 s, 600 s) would keep every replica
of a shift this short.

    .venv/bin/python benchmarks/autoscale_mix.py --json autoscale.json --plot autoscale.png
"""

import argparse
import asyncio
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from goodput import SLO, Outcome, _send, solo_costs, summarize

PORT = 8971
POOLS = ("video_encoder", "input_projector", "llm", "output_projector", "image_generator")
SCALED = ("video_encoder", "llm", "image_generator")
POLICIES = ("ongoing_requests", "utilisation")


def config_for(policy: str, max_replicas: int) -> Any:
    from omnistage.cluster.config import OmnistageConfig, load_config

    data = load_config("tiny").model_dump()
    data["stages"] = {name: data["stages"][name] for name in POOLS}
    # Every video brings its own frames in real traffic: the feature cache would hide the encoder.
    data["cache"]["enabled"] = False
    for name in SCALED:
        data["stages"][name]["scaling"].update(
            # The LLM pool always scales on sequences in flight (the config refuses anything else).
            policy="ongoing_requests" if name == "llm" else policy,
            min_replicas=1, max_replicas=max_replicas, target_ongoing_requests=2, target_utilisation=0.7,
            upscale_delay_s=2, downscale_delay_s=10, metrics_interval_s=1, look_back_period_s=5,
        )
    return OmnistageConfig.model_validate(data)


class ReplicaTrace(threading.Thread):
    """Reads each pool's running replicas of app ``app`` every ``period_s`` until stopped."""

    def __init__(self, app: str, start: float, period_s: float = 1.0):
        super().__init__(daemon=True)
        self.app, self.start_time, self.period_s = app, start, period_s
        self.samples: list[dict[str, Any]] = []
        self.done = threading.Event()

    def run(self) -> None:
        from ray import serve

        while not self.done.wait(self.period_s):
            deployments = serve.status().applications[self.app].deployments
            running = {name: deployments[name].replica_states.get("RUNNING", 0) for name in SCALED}
            self.samples.append({"t": round(time.perf_counter() - self.start_time, 1), **running})


async def shifting_load(url: str, phases: list[tuple[str, float, float]], seed: int) -> list[tuple[int, Outcome]]:
    """Open loop over consecutive phases ``(kind, rate, seconds)``; each outcome with its phase."""
    rng = np.random.default_rng(seed)
    arrivals: list[tuple[float, int, str]] = []
    offset = 0.0
    for index, (kind, rate, seconds) in enumerate(phases):
        times = np.cumsum(rng.exponential(1 / rate, int(rate * seconds * 2) + 8))
        arrivals += [(offset + t, index, kind) for t in times[times < seconds]]
        offset += seconds
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=None, max_keepalive_connections=64)) as client:
        start = time.perf_counter()

        async def one(i: int) -> tuple[int, Outcome]:
            at, phase, kind = arrivals[i]
            due = start + at
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            return phase, await _send(client, url, kind, due, seed + i)

        return list(await asyncio.gather(*(one(i) for i in range(len(arrivals)))))


def plot(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = list(report["policies"])
    fig, axes = plt.subplots(1, len(policies), figsize=(6 * len(policies), 3.8), sharey=True, squeeze=False)
    for ax, policy in zip(axes[0], policies):
        trace = report["policies"][policy]["trace"]
        for name in SCALED:
            ax.step([s["t"] for s in trace], [s[name] for s in trace], where="post", label=name)
        start = 0.0
        for kind, _, seconds in report["phases"]:
            ax.axvspan(start, start + seconds, alpha=0.08 if kind == "video_caption" else 0.2, color="grey")
            ax.text(start + 1, report["max_replicas"] + 0.15, kind.replace("_", " "), fontsize=8)
            start += seconds
        attained = ", ".join(f"{row['attainment']:.0%}" for row in report["policies"][policy]["phases"])
        ax.set(title=f"{policy} (SLOs met per phase: {attained})", xlabel="seconds", ylabel="running replicas")
        ax.set_ylim(0, report["max_replicas"] + 0.6)
        ax.set_yticks(range(report["max_replicas"] + 1))
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--caption-rate", type=float, default=16, help="video captions per second in the caption phases")
    parser.add_argument("--generation-rate", type=float, default=6, help="image generations per second in the generation phase")
    parser.add_argument("--phase-s", type=float, default=40)
    parser.add_argument("--max-replicas", type=int, default=2)
    parser.add_argument("--slo-scale", type=float, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--plot", help="write the plot (PNG) here")
    args = parser.parse_args()

    import ray
    from ray import serve

    from omnistage.pipelines.serve import deploy

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    phases = [("video_caption", args.caption_rate, args.phase_s), ("image_generation", args.generation_rate, args.phase_s),
              ("video_caption", args.caption_rate, args.phase_s)]
    ray.init(address="local", num_cpus=16, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    report: dict[str, Any] = {"machine_cpus": os.cpu_count(), "phases": phases, "max_replicas": args.max_replicas, "policies": {}}
    slos: dict[str, SLO] | None = None
    for policy in args.policies:
        deploy(config_for(policy, args.max_replicas), name=policy, route_prefix=f"/{policy}")
        url = f"http://127.0.0.1:{PORT}/{policy}/v1/chat/completions"
        solo = solo_costs(url, ["video_caption", "image_generation"], runs=3)
        if slos is None:  # from the first policy's app at one replica per pool, the same for both
            slos = {
                kind: SLO(args.slo_scale * c["ttft_s"], args.slo_scale * max(c["tpot_s"], 1e-3),
                          args.slo_scale * c["e2e_s"] if kind == "image_generation" else None)
                for kind, c in solo.items()
            }
            report["solo"], report["slos"] = solo, {k: vars(v) for k, v in slos.items()}
        trace = ReplicaTrace(policy, time.perf_counter())
        trace.start()
        outcomes = asyncio.run(shifting_load(url, phases, args.seed))
        trace.done.set()
        trace.join()
        rows = [summarize([o for p, o in outcomes if p == index], slos) for index in range(len(phases))]
        report["policies"][policy] = {"trace": trace.samples, "phases": rows}
        peak = {name: max((s[name] for s in trace.samples), default=0) for name in SCALED}
        print(json.dumps({"policy": policy, "peak_replicas": peak,
                          "phases": [{k: r[k] for k in ("requests", "errors", "attainment")} for r in rows]}), flush=True)
        serve.delete(policy)
    serve.shutdown()
    ray.shutdown()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.plot:
        plot(report, args.plot)


if __name__ == "__main__":
    main()
