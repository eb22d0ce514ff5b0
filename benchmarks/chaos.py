"""Chaos under load (RELIABILITY row 17): minutes of mixed load through the SDK while a random
stage replica is killed every few seconds; prints a JSON report of requests sent, answered,
retried by the SDK, failed and lost (see ``omnistage.pipelines.chaos``).

Starts a local Ray with its dashboard on loopback (the kills find replicas through Ray's state
API), serves the config as an app of its own, and shuts everything down at the end.

    .venv/bin/python benchmarks/chaos.py --config tiny --duration 180 [--kill-every 5] [--concurrency 8] [--json out/chaos.json]
"""

import argparse
import json
import sys
from pathlib import Path

PORT = 8942


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", help="preset name or YAML file")
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of load")
    parser.add_argument("--kill-every", type=float, default=5.0, help="seconds between kills")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--max-retries", type=int, default=10, help="the SDK's max_retries")
    parser.add_argument("--timeout", type=float, default=300.0, help="the SDK's timeout per call, retries included (its default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()

    import ray
    from ray import serve

    from omnistage.cluster.config import load_config
    from omnistage.pipelines.chaos import run_chaos
    from omnistage.pipelines.serve import deploy

    config = load_config(args.config)
    # Logical CPUs beyond the machine's: every replica asks for a fraction of one.
    ray.init(address="local", num_cpus=8, include_dashboard=True, dashboard_host="127.0.0.1")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        deploy(config, name="chaos")
        report = run_chaos(
            f"http://127.0.0.1:{PORT}", "chaos", duration_s=args.duration, kill_every_s=args.kill_every,
            concurrency=args.concurrency, seed=args.seed, max_retries=args.max_retries, timeout_s=args.timeout,
        )
    finally:
        ray.shutdown()
    report["settings"]["config"] = args.config
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0 if report["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
