"""Multi-node scenario for tests/test_cluster.py, run in its own process (``ray.cluster_utils.Cluster``
cannot share a process with the test session's ``ray.init``).

The simulated cluster has the node types of ``ray_cluster.yaml``, each node started with that
type's resources (CPUs, declared GPUs, custom resources) and a second LLM node. The app is the tiny
preset's image path with each pool's resources taken from the ``gpu-cluster`` preset, deployed the way
``serve deploy`` deploys it: the exported Serve config, through the application builder. Then:

1. each pool's replica runs on a node of the type that offers its custom resource;
2. an image question and an image generation succeed over HTTP;
3. the node holding the LLM replica is removed; the replica comes back on the other LLM node and
   the same requests succeed again.

Prints one line ``RESULT <json>`` (and exits 0) or ``FAILED <json>`` (exit 1).
Usage: OMNISTAGE_HOME=DIR HF_HUB_OFFLINE=1 python tests/cluster_scenario.py
"""

from __future__ import annotations

import base64
import json
import socket
import sys
import time
import traceback
from typing import Any

APP = "omnistage"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def simulated_config(port: int):
    """The tiny preset's image path (what the requests below use: a pool on each GPU node type),
    placed like gpu-cluster: resources per pool copied, one replica each. The other media's pools
    would only add replicas to start on the same node types."""
    from omnistage.cluster.config import OmnistageConfig, load_config

    tiny = load_config("tiny").model_dump()
    gpu = load_config("gpu-cluster").model_dump()
    used = ("image_encoder", "input_projector", "llm", "output_projector", "image_generator")
    tiny["stages"] = {name: stage for name, stage in tiny["stages"].items() if name in used}
    for name, stage in tiny["stages"].items():
        stage["resources"] = gpu["stages"][name]["resources"]
        stage["scaling"].update(min_replicas=1, max_replicas=1)
    tiny["server"]["ingress"]["resources"] = gpu["server"]["ingress"]["resources"]
    tiny["server"].update(host="127.0.0.1", port=port)
    return OmnistageConfig.model_validate(tiny)


def start_cluster(cluster_yaml: dict[str, Any]):
    """Head plus one node per worker type (two of the LLM type), each with its type's resources."""
    from ray.cluster_utils import Cluster

    types = cluster_yaml["available_node_types"]
    head_type = cluster_yaml["head_node_type"]
    small_store = 100 * 1024 * 1024

    def node_args(node_type: str) -> dict[str, Any]:
        resources = dict(types[node_type].get("resources", {}))
        custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU")}
        return {
            "num_cpus": resources.get("CPU", 0),
            "num_gpus": resources.get("GPU", 0),
            "resources": custom,
            "object_store_memory": small_store,
        }

    cluster = Cluster(initialize_head=True, head_node_args={**node_args(head_type), "include_dashboard": False})
    nodes: dict[str, str] = {cluster.head_node.node_id: head_type}
    handles: dict[str, Any] = {}
    for node_type in types:
        if node_type == head_type:
            continue
        for _ in range(2 if node_type == "llm_gpu" else 1):
            node = cluster.add_node(**node_args(node_type))
            nodes[node.node_id] = node_type
            handles[node.node_id] = node
    cluster.wait_for_nodes()
    return cluster, nodes, handles


def deploy_exported(config, health_check_period_s: float) -> dict[str, Any]:
    """Deploy as `serve deploy` would: Ray's schema, the controller runs the builder on the cluster."""
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    from omnistage.pipelines.serve_config import export_serve_config

    exported = export_serve_config(config)
    # Simulated nodes share one host and port: one proxy, on the head.
    exported["proxy_location"] = "HeadOnly"
    for deployment in exported["applications"][0]["deployments"]:
        deployment["health_check_period_s"] = health_check_period_s
    schema = ServeDeploySchema.model_validate(exported)
    client = serve_api.serve_start(http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location)
    client.deploy_apps(schema, _blocking=False)
    return exported


def wait_running(timeout_s: float) -> float:
    from ray import serve

    start = time.monotonic()
    status = None
    while time.monotonic() - start < timeout_s:
        app = serve.status().applications.get(APP)
        status = app.status if app else None
        if status == "RUNNING":
            return time.monotonic() - start
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RuntimeError(f"app {status}: {app.message}")
        time.sleep(0.5)
    raise TimeoutError(f"app not RUNNING after {timeout_s} s (last status {status})")


def replica_nodes(names: list[str]) -> dict[str, dict[str, Any]]:
    from ray import serve

    out = {}
    for name in names:
        stats = serve.get_deployment_handle(name, APP).stats.remote().result(timeout_s=30)
        out[name] = {"node_id": stats["node_id"], "gpu_ids": stats["gpu_ids"]}
    return out


def send_requests(base_url: str) -> dict[str, Any]:
    import httpx

    from omnistage.actors.media import encode_png
    from omnistage.pipelines.demo import sample_image

    png = base64.b64encode(encode_png(sample_image())).decode()
    chat = {
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
            {"type": "text", "text": "What is in this image?"},
        ]}],
        "max_tokens": 4, "seed": 0, "temperature": 0,
    }
    with httpx.Client(base_url=base_url, timeout=60) as client:
        answer = client.post("/v1/chat/completions", json=chat)
        image = client.post("/v1/images/generations", json={"prompt": "a red circle", "seed": 0})
    result = {"chat_status": answer.status_code, "image_status": image.status_code}
    if answer.status_code == 200:
        result["chat_text_type"] = type(answer.json()["choices"][0]["message"]["content"]).__name__
    if image.status_code == 200:
        result["image_mime"] = image.json()["data"][0]["mime_type"]
    return result


def requests_until_ok(base_url: str, timeout_s: float) -> tuple[dict[str, Any], float, int]:
    start = time.monotonic()
    attempts = 0
    last: dict[str, Any] = {}
    while time.monotonic() - start < timeout_s:
        attempts += 1
        try:
            last = send_requests(base_url)
        except Exception as exc:  # connection reset while the proxy or ingress moves
            last = {"error": type(exc).__name__}
        if last.get("chat_status") == 200 and last.get("image_status") == 200:
            return last, time.monotonic() - start, attempts
        time.sleep(1)
    return last, time.monotonic() - start, attempts


def run() -> dict[str, Any]:
    import ray
    import yaml

    from omnistage.cluster.manifests import RAY_CLUSTER_YAML
    from omnistage.pipelines.serve import prepare_models
    from omnistage.pipelines.serve_config import pools

    timings: dict[str, float] = {}
    t0 = time.monotonic()
    port = _free_port()
    config = simulated_config(port)
    base_url = f"http://127.0.0.1:{port}"
    # Built once here, as `omnistage serve` does, not by every replica at once.
    prepare_models(config)
    cluster_yaml = yaml.safe_load(RAY_CLUSTER_YAML.read_text())
    cluster, node_types, node_handles = start_cluster(cluster_yaml)
    try:
        ray.init(address=cluster.address, logging_level="warning")
        timings["cluster_start_s"] = time.monotonic() - t0

        # Which node type each pool must land on: the one offering its custom resources.
        types = cluster_yaml["available_node_types"]
        expected = {}
        for name, pool in pools(config).items():
            custom = set(pool.resources.custom)
            expected[name] = sorted(t for t, spec in types.items() if custom and custom <= set(spec.get("resources", {})))
        deploy_exported(config, health_check_period_s=2)
        # Generous: on two cores, beside the session's own Ray and Serve app, the replicas of four
        # nodes load in turn; a passing run moves on as soon as each condition holds.
        timings["deploy_s"] = wait_running(420)

        stage_names = [n for n in expected if n != "ingress"]
        placed = replica_nodes(stage_names)
        placement = {name: node_types[info["node_id"]] for name, info in placed.items()}
        gpus = {name: info["gpu_ids"] for name, info in placed.items()}

        t = time.monotonic()
        before = send_requests(base_url)
        timings["requests_s"] = time.monotonic() - t

        # Remove the node the LLM replica runs on; its type has another node.
        llm_node = placed["llm"]["node_id"]
        t = time.monotonic()
        # Not graceful: the node is lost as a machine is, not drained.
        cluster.remove_node(node_handles[llm_node], allow_graceful=False)
        timings["remove_node_s"] = time.monotonic() - t
        t = time.monotonic()
        moved_to = None
        while time.monotonic() - t < 240:
            try:
                moved_to = replica_nodes(["llm"])["llm"]["node_id"]
                if moved_to != llm_node:
                    break
            except Exception:
                pass
            time.sleep(1)
        timings["llm_replaced_s"] = time.monotonic() - t
        after, after_s, attempts = requests_until_ok(base_url, 240)
        timings["requests_after_s"] = after_s
        timings["total_s"] = time.monotonic() - t0
        return {
            "node_types": sorted(set(node_types.values())),
            "expected": expected,
            "placement": placement,
            "gpu_ids": gpus,
            "before": before,
            "removed_node_type": node_types[llm_node],
            "llm_moved_to_type": node_types.get(moved_to) if moved_to and moved_to != llm_node else None,
            "after": after,
            "after_attempts": attempts,
            "timings": {k: round(v, 1) for k, v in timings.items()},
        }
    finally:
        try:
            from ray import serve

            serve.shutdown()
        except Exception:
            pass
        ray.shutdown()
        cluster.shutdown()


def main() -> int:
    try:
        result = run()
    except Exception as exc:
        print("FAILED " + json.dumps({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}), flush=True)
        return 1
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
