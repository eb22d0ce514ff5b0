"""Cluster manifests: placement checks of a config against node types, and the KubeRay RayService.

Two places describe the machines: ``ray_cluster.yaml`` (Ray's cluster launcher) and
``cluster/kuberay/rayservice.yaml`` (KubeRay), which is generated from the first plus a preset.
``placement_problems`` checks that every pool of a config fits some node type: the custom
resources it asks for are offered there, and so are its GPUs and CPUs, and at ``max_replicas`` the
pools pinned to a type fit in that type's ``max_workers`` nodes.

Some values belong to each deployment and have no default: the image, the GCS Redis, the AWS
account and the checkpoint bucket (``PLACEHOLDERS``). The checked-in files carry ``${NAME}``
markers in their place, and nothing is written for deploying until each is given::

    python -m omnistage.cluster.manifests --image IMAGE --gcs-redis HOST:PORT --out my-rayservice.yaml
    python -m omnistage.cluster.manifests --fill ray_cluster.yaml --out my-cluster.yaml   # from $NAME or --set NAME=VALUE
    python -m omnistage.cluster.manifests --template   # regenerates cluster/kuberay/rayservice.yaml, markers kept
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from omnistage.cluster.config import OmnistageConfig, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
RAY_CLUSTER_YAML = REPO_ROOT / "ray_cluster.yaml"
RAYSERVICE_YAML = REPO_ROOT / "cluster" / "kuberay" / "rayservice.yaml"
DEFAULT_PRESET = "gpu-cluster"
RAY_VERSION = "2.60.0"
# What each deployment must give, by the name of its marker (and environment variable).
PLACEHOLDERS: dict[str, str] = {
    "OMNISTAGE_IMAGE": "the container image with omnistage[server] installed (cluster/kuberay/Dockerfile), "
    "e.g. 123456789012.dkr.ecr.us-west-2.amazonaws.com/omnistage:0.1.0",
    # Never the feature cache's Redis: its LRU eviction would drop cluster state.
    "OMNISTAGE_GCS_REDIS": "host:port of the Redis that keeps the GCS tables, e.g. gcs-redis.internal:6379",
    "OMNISTAGE_AWS_ACCOUNT": "the 12-digit AWS account id that owns the workers' instance profile",
    "OMNISTAGE_MODELS_BUCKET": "the S3 bucket holding the checkpoints under encoder/, llm/ and generator/",
}
# Only these names: the start commands' shell expansions (${VAR:?...}) are left to the nodes.
_MARKER = re.compile(r"\$\{(" + "|".join(PLACEHOLDERS) + r")\}")
_HOST_PORT = re.compile(r"^[A-Za-z0-9.-]+:\d{1,5}$")
APP_LABEL = {"app.kubernetes.io/name": "omnistage"}
SECRET = "omnistage-secrets"
MODELS_CLAIM = "omnistage-models"

# vCPUs and GiB of each instance type. A Ray pod asks one vCPU and 15% of the memory less, left
# to the kubelet and system daemons, so one Ray pod fills one node.
INSTANCE_SHAPES: dict[str, tuple[int, int]] = {
    "m6i.2xlarge": (8, 32),
    "g4dn.2xlarge": (8, 32),
    "g5.2xlarge": (8, 32),
    "g6e.2xlarge": (8, 64),
}


# Placement


@dataclass(frozen=True)
class NodeOffer:
    """What one node of a type offers Ray (``CPU``, ``GPU``, custom resources), and how many."""

    name: str
    resources: dict[str, float] = field(default_factory=dict)
    min_workers: int = 0
    max_workers: int = 1


def load_ray_cluster(path: str | Path = RAY_CLUSTER_YAML) -> dict[str, Any]:
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict) or "available_node_types" not in data:
        raise ValueError(f"expected a Ray cluster launcher config with available_node_types in {str(path)!r}")
    return data


def ray_cluster_offers(cluster: dict[str, Any]) -> list[NodeOffer]:
    """Node types of a cluster launcher config. ``resources`` must list CPU and GPU explicitly for
    types that host pools: an absent count is taken as 0 here (the launcher would detect it)."""
    head = cluster.get("head_node_type")
    return [
        NodeOffer(
            name=name,
            resources={k: float(v) for k, v in spec.get("resources", {}).items()},
            min_workers=1 if name == head else int(spec.get("min_workers", 0)),
            max_workers=1 if name == head else int(spec.get("max_workers", cluster.get("max_workers", 0))),
        )
        for name, spec in cluster["available_node_types"].items()
    ]


def _parse_ray_start_resources(value: str) -> dict[str, float]:
    """KubeRay's ``rayStartParams.resources``: ``"{\\"name\\": 1}"`` (shell-quoted JSON)."""
    text = value.strip()
    if text.startswith('"') and text.endswith('"'):
        text = text[1:-1].replace('\\"', '"')
    return {k: float(v) for k, v in json.loads(text).items()}


def _group_offer(name: str, group: dict[str, Any], head: bool) -> NodeOffer:
    params = group.get("rayStartParams", {})
    container = group["template"]["spec"]["containers"][0]
    limits = container.get("resources", {}).get("limits", {})
    cpus = float(params.get("num-cpus", limits.get("cpu", 0)))
    gpus = float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
    resources = {"CPU": cpus, "GPU": gpus, **_parse_ray_start_resources(params.get("resources", "{}"))}
    if head:
        return NodeOffer(name, resources, 1, 1)
    return NodeOffer(name, resources, int(group.get("minReplicas", 0)), int(group.get("maxReplicas", 0)))


def rayservice_offers(rayservice: dict[str, Any]) -> list[NodeOffer]:
    """Head and worker groups of a RayService, read the way KubeRay starts Ray in them."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    offers = [_group_offer("head", cluster["headGroupSpec"], head=True)]
    offers += [_group_offer(g["groupName"], g, head=False) for g in cluster.get("workerGroupSpecs", [])]
    return offers


def placement_problems(config: OmnistageConfig, offers: list[NodeOffer]) -> list[str]:
    """Why some pool of ``config`` cannot be placed on these node types; empty when all fit.

    A pool fits a type when one node of it offers every resource one replica asks for. Pools that
    only one type can host (pinned by a custom resource) must also fit there all together at their
    ``max_replicas``, within the type's ``max_workers`` nodes.
    """
    from omnistage.pipelines.serve_config import pools

    problems: list[str] = []
    demand: dict[str, dict[str, float]] = {}
    pinned: dict[str, list[str]] = {}
    for name, pool in pools(config).items():
        request = {"CPU": pool.resources.num_cpus, "GPU": pool.resources.num_gpus, **pool.resources.custom}
        asked = {k: v for k, v in request.items() if v > 0}
        fits = [o for o in offers if all(o.resources.get(k, 0.0) >= v for k, v in asked.items())]
        if not fits:
            custom = {k: v for k, v in asked.items() if k not in ("CPU", "GPU")}
            offering = [o.name for o in offers if all(k in o.resources for k in custom)]
            problems.append(
                f"pool {name} asks {asked} per replica; no node type offers it "
                f"(types offering its custom resources {sorted(custom)}: {offering or 'none'}; "
                f"offers: {', '.join(f'{o.name} {o.resources}' for o in offers)})"
            )
            continue
        if len(fits) == 1 and any(k not in ("CPU", "GPU") for k in asked):
            node = fits[0]
            replicas = pool.scaling.max_replicas
            for key, amount in asked.items():
                demand.setdefault(node.name, {}).setdefault(key, 0.0)
                demand[node.name][key] += replicas * amount
            pinned.setdefault(node.name, []).append(name)
    for node in offers:
        for key, needed in demand.get(node.name, {}).items():
            capacity = node.max_workers * node.resources.get(key, 0.0)
            if needed > capacity + 1e-9:
                problems.append(
                    f"at max_replicas, pools {pinned[node.name]} need {needed:g} {key} on {node.name} nodes; "
                    f"max_workers {node.max_workers} x {node.resources.get(key, 0.0):g} offers {capacity:g}"
                )
    return problems


# KubeRay RayService


def _group_name(node_type: str) -> str:
    # Kubernetes names: lower-case letters, digits and '-'.
    return node_type.replace("_", "-").lower()


def _pod_shape(node_type: str, spec: dict[str, Any]) -> dict[str, str]:
    instance = spec.get("node_config", {}).get("InstanceType")
    if instance not in INSTANCE_SHAPES:
        raise ValueError(
            f"node type {node_type} uses instance type {instance!r}; add its vCPUs and GiB to INSTANCE_SHAPES "
            f"(known: {', '.join(INSTANCE_SHAPES)})"
        )
    vcpus, gib = INSTANCE_SHAPES[instance]
    return {"cpu": str(vcpus - 1), "memory": f"{int(gib * 0.85)}Gi"}


def _env() -> list[dict[str, Any]]:
    """Environment of every Ray container: secrets from one Kubernetes Secret, never inline."""

    def secret(name: str, key: str, optional: bool = False) -> dict[str, Any]:
        ref: dict[str, Any] = {"name": SECRET, "key": key}
        if optional:
            ref["optional"] = True
        return {"name": name, "valueFrom": {"secretKeyRef": ref}}

    return [
        secret("OMNISTAGE_REDIS_URL", "cache-redis-url"),
        secret("OMNISTAGE_API_KEYS", "api-keys", optional=True),
        {"name": "HF_HUB_OFFLINE", "value": "1"},
    ]


def _container(name: str, image: str, shape: dict[str, str], gpus: int, ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    resources = dict(shape)
    if gpus:
        resources["nvidia.com/gpu"] = str(gpus)
    container: dict[str, Any] = {
        "name": name,
        "image": image,
        "env": _env(),
        "resources": {"limits": dict(resources), "requests": dict(resources)},
    }
    if ports:
        container["ports"] = ports
    return container


def _worker_group(node_type: str, spec: dict[str, Any], image: str) -> dict[str, Any]:
    resources = spec.get("resources", {})
    custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU")}
    gpus = int(resources.get("GPU", 0))
    container = _container("ray-worker", image, _pod_shape(node_type, spec), gpus)
    container["volumeMounts"] = [{"name": "models", "mountPath": "/models", "readOnly": True}]
    pod_spec: dict[str, Any] = {
        "nodeSelector": {"node.kubernetes.io/instance-type": spec["node_config"]["InstanceType"]},
        "containers": [container],
        "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": MODELS_CLAIM, "readOnly": True}}],
    }
    if gpus:
        pod_spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    params: dict[str, str] = {}
    if custom:
        # KubeRay's documented form: shell-quoted JSON, passed on to `ray start --resources`.
        params["resources"] = '"' + json.dumps(custom).replace('"', '\\"') + '"'
    return {
        "groupName": _group_name(node_type),
        "replicas": int(spec.get("min_workers", 0)),
        "minReplicas": int(spec.get("min_workers", 0)),
        "maxReplicas": int(spec.get("max_workers", 0)),
        "rayStartParams": params,
        "template": {"metadata": {"labels": {**APP_LABEL, "omnistage/node-type": node_type}}, "spec": pod_spec},
    }


def marker(name: str) -> str:
    """The ``${NAME}`` a checked-in file carries where a value of ``PLACEHOLDERS`` goes."""
    return "${" + name + "}"


def fill_placeholders(text: str, values: Mapping[str, str]) -> str:
    """``text`` with each ``${NAME}`` marker replaced by ``values[NAME]``; ``ValueError`` naming
    every marker that has no value."""
    missing = sorted({name for name in _MARKER.findall(text) if not (values.get(name) or "").strip()})
    if missing:
        raise ValueError("; ".join(f"expected {name} ({PLACEHOLDERS[name]}), got nothing" for name in missing))
    return _MARKER.sub(lambda match: values[match.group(1)].strip(), text)


def rayservice_manifest(
    config: OmnistageConfig,
    cluster: dict[str, Any],
    *,
    source: str,
    image: str,
    gcs_redis: str,
    name: str = "omnistage",
) -> list[dict[str, Any]]:
    """The RayService (and a NetworkPolicy for its pods) serving ``config`` on the node types of
    ``cluster``: one worker group per worker node type, with the same custom resources, GPUs and
    bounds; ``serveConfigV2`` is ``export_serve_config(config)``."""
    from omnistage.pipelines.serve_config import dump_serve_config

    types = cluster["available_node_types"]
    head_type = cluster["head_node_type"]
    head_spec = types[head_type]
    head_cpus = head_spec.get("resources", {}).get("CPU")
    head_container = _container(
        "ray-head",
        image,
        _pod_shape(head_type, head_spec),
        gpus=0,
        ports=[
            {"containerPort": 6379, "name": "gcs-server"},
            {"containerPort": 8265, "name": "dashboard"},
            {"containerPort": 10001, "name": "client"},
            {"containerPort": 8000, "name": "serve"},
        ],
    )
    head_params = {} if head_cpus is None else {"num-cpus": str(int(head_cpus))}
    rayservice = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name, "labels": dict(APP_LABEL)},
        "spec": {
            "serveConfigV2": dump_serve_config(config, source),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,  # must match the image's Ray
                "enableInTreeAutoscaling": True,
                # Ray's token authentication (KubeRay >= 1.5.1 makes and mounts the token).
                "authOptions": {"mode": "token"},
                # GCS fault tolerance: the GCS keeps its tables in this Redis, so a restarted
                # head pod recovers them and the Serve replicas on workers keep serving meanwhile.
                "gcsFaultToleranceOptions": {
                    "redisAddress": gcs_redis,
                    "redisPassword": {"valueFrom": {"secretKeyRef": {"name": SECRET, "key": "gcs-redis-password"}}},
                },
                "headGroupSpec": {
                    "rayStartParams": head_params,
                    "template": {
                        "metadata": {"labels": {**APP_LABEL, "omnistage/node-type": head_type}},
                        "spec": {
                            "nodeSelector": {"node.kubernetes.io/instance-type": head_spec["node_config"]["InstanceType"]},
                            "containers": [head_container],
                        },
                    },
                },
                "workerGroupSpecs": [
                    _worker_group(node_type, spec, image) for node_type, spec in types.items() if node_type != head_type
                ],
            },
        },
    }
    # The dashboard (8265) and client (10001) run code for whoever reaches them: only Ray's own
    # pods and the KubeRay operator may; Serve's HTTP port is open inside the cluster.
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": f"{name}-ray", "labels": dict(APP_LABEL)},
        "spec": {
            "podSelector": {"matchLabels": dict(APP_LABEL)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": dict(APP_LABEL)}}]},
                {
                    "from": [
                        {
                            "namespaceSelector": {},
                            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}},
                        }
                    ],
                    "ports": [{"port": 8265, "protocol": "TCP"}, {"port": 52365, "protocol": "TCP"}],
                },
                {"ports": [{"port": 8000, "protocol": "TCP"}]},
            ],
        },
    }
    return [rayservice, policy]


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    # The embedded Serve config reads as YAML, not as one escaped line.
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render_rayservice(
    config_name: str = DEFAULT_PRESET,
    cluster_path: str | Path = RAY_CLUSTER_YAML,
    *,
    image: str = marker("OMNISTAGE_IMAGE"),
    gcs_redis: str = marker("OMNISTAGE_GCS_REDIS"),
) -> str:
    """The RayService as YAML; left at their defaults, ``image`` and ``gcs_redis`` are the markers
    of the checked-in template."""
    config = load_config(config_name)
    documents = rayservice_manifest(
        config, load_ray_cluster(cluster_path), source=f"config {config_name!r}", image=image, gcs_redis=gcs_redis
    )
    header = (
        f"# Generated by `python -m omnistage.cluster.manifests` from ray_cluster.yaml and the {config_name!r} preset;\n"
        "# regenerate instead of editing (tests/test_cluster.py compares). docs/deploy.md: KubeRay path.\n"
        "# Needs KubeRay >= 1.5.1, a Secret omnistage-secrets (gcs-redis-password, cache-redis-url, api-keys),\n"
        "# a ReadOnlyMany PVC omnistage-models holding the checkpoints, and the image of cluster/kuberay/Dockerfile.\n"
    )
    if _MARKER.search(image + gcs_redis):
        header += (
            "# ${OMNISTAGE_IMAGE} and ${OMNISTAGE_GCS_REDIS} are required values, not defaults: generate with\n"
            "# --image and --gcs-redis, or fill this file with --fill, which refuses while one is missing.\n"
        )
    return header + yaml.dump_all(documents, Dumper=_Dumper, sort_keys=False, width=120)


def _given(value: str | None, option: str, name: str) -> str:
    if not (value or "").strip():
        raise SystemExit(f"expected {option} or ${name}: {PLACEHOLDERS[name]}; got nothing")
    if _MARKER.search(value):
        raise SystemExit(f"expected {option} to be a real value, got the marker {value!r}")
    return value.strip()


def _rayservice_text(args: argparse.Namespace) -> str:
    config = load_config(args.config)
    problems = placement_problems(config, ray_cluster_offers(load_ray_cluster(args.cluster)))
    if problems:
        raise SystemExit("the config does not fit the node types:\n  " + "\n  ".join(problems))
    if args.template:
        return render_rayservice(args.config, args.cluster)
    image = _given(args.image, "--image", "OMNISTAGE_IMAGE")
    gcs_redis = _given(args.gcs_redis, "--gcs-redis", "OMNISTAGE_GCS_REDIS")
    if not _HOST_PORT.match(gcs_redis):
        raise SystemExit(f"expected --gcs-redis as host:port, got {gcs_redis!r}")
    return render_rayservice(args.config, args.cluster, image=image, gcs_redis=gcs_redis)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Write the KubeRay RayService for a preset and ray_cluster.yaml's node types, or fill the "
        "${NAME} markers of a checked-in file.",
    )
    parser.add_argument("--config", default=DEFAULT_PRESET, help=f"preset name or YAML path (default: {DEFAULT_PRESET})")
    parser.add_argument("--cluster", default=str(RAY_CLUSTER_YAML), help="cluster launcher config with the node types")
    parser.add_argument("--image", default=os.environ.get("OMNISTAGE_IMAGE"), help=f"required: {PLACEHOLDERS['OMNISTAGE_IMAGE']} (default: $OMNISTAGE_IMAGE)")
    parser.add_argument(
        "--gcs-redis", default=os.environ.get("OMNISTAGE_GCS_REDIS"), help=f"required: {PLACEHOLDERS['OMNISTAGE_GCS_REDIS']} (default: $OMNISTAGE_GCS_REDIS)"
    )
    parser.add_argument("--template", action="store_true", help=f"write the markers instead of values: the checked-in {RAYSERVICE_YAML.name}")
    parser.add_argument("--fill", metavar="FILE", help=f"write FILE with its markers ({', '.join(PLACEHOLDERS)}) filled from --set and the environment")
    parser.add_argument("--set", metavar="NAME=VALUE", action="append", default=[], help="a marker's value for --fill (repeatable)")
    parser.add_argument("--out", help=f"output file, - for stdout (default: {RAYSERVICE_YAML} with --template, else -)")
    args = parser.parse_args(argv)
    if args.fill:
        values = {name: os.environ.get(name, "") for name in PLACEHOLDERS}
        for item in args.set:
            name, sep, value = item.partition("=")
            if not sep or name not in PLACEHOLDERS:
                raise SystemExit(f"expected --set NAME=VALUE with NAME among {', '.join(PLACEHOLDERS)}, got {item!r}")
            values[name] = value
        try:
            text = fill_placeholders(Path(args.fill).read_text(), values)
        except ValueError as exc:
            raise SystemExit(f"cannot fill {args.fill}: {exc}") from None
    else:
        text = _rayservice_text(args)
    out = args.out or (str(RAYSERVICE_YAML) if args.template else "-")
    if out == "-":
        sys.stdout.write(text)
    else:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
