"""The Serve application as Ray's own tools deploy it: an application builder for ``import_path``
and the ``serve deploy`` config exported from an omnistage config.

``serve deploy serve.yaml``, ``serve run serve.yaml`` and KubeRay's ``serveConfigV2`` all name
``omnistage.pipelines.serve_config:app_builder`` with ``args: {config: ...}``; Serve calls the
builder on the cluster, which builds the same application ``omnistage serve`` deploys.

The export splits the config in two, so each setting lives in one place:

- ``deployments``: each pool's placement (``scaling``, ``resources``, ``queue``, ``health``) as Serve options.
  Serve applies changes here in place: new autoscaling bounds or queue limits restart nothing.
- ``http_options``: the server's host, port and request timeout (fixed once Serve has started).
- ``args.config``: everything else (models, batching, input limits, the request timeout again for
  the ingress). Serve treats ``args`` (and ``runtime_env``, which records the omnistage version)
  as code: a change there restarts every replica of the application.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from ray import serve

from omnistage.cluster.config import ConfigError, OmnistageConfig, PoolConfig, load_config
from omnistage.pipelines.graph import Graph
from omnistage.pipelines.serve import APP_NAME, build_app, deployment_options

SERVE_IMPORT_PATH = "omnistage.pipelines.serve_config:app_builder"
ROUTE_PREFIX = "/"
# Sections of a pool's config that become Serve deployment options instead of builder args.
PLACEMENT_SECTIONS = ("scaling", "resources", "queue", "health")
# Server settings that become Serve's http_options (the proxies') instead of builder args. The
# request timeout goes to both: the proxies enforce it and the ingress cancels downstream calls.
HTTP_SETTINGS = ("host", "port")


def config_from_args(args: dict[str, Any]) -> OmnistageConfig:
    """The config a Serve ``args`` mapping names: ``{"config": <config mapping>}`` or
    ``{"config": "<preset name or YAML path on the cluster>"}``."""
    if not isinstance(args, dict) or set(args) != {"config"}:
        keys = sorted(args) if isinstance(args, dict) else type(args).__name__
        raise ConfigError(f"expected Serve args with exactly one key 'config' (a mapping, or a preset name or path), got {keys}")
    value = args["config"]
    if isinstance(value, dict):
        try:
            return OmnistageConfig.model_validate(value)
        except ValueError as exc:
            raise ConfigError(f"args.config is invalid: {exc}") from None
    if isinstance(value, str):
        return load_config(value)
    raise ConfigError(f"expected args.config to be a mapping or a preset name or path, got {type(value).__name__}")


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Serve application builder (``import_path: omnistage.pipelines.serve_config:app_builder``).

    Serve runs it in a task on the cluster. API keys are read there, as ``omnistage serve`` reads
    them: ``OMNISTAGE_API_KEYS`` in that node's environment or ``server.api_key_hashes_file``.
    """
    return build_app(config_from_args(args))


def pools(config: OmnistageConfig) -> dict[str, PoolConfig]:
    """Deployment name -> its pool config, every pool of the graph then the ingress, as ``build_app``
    names them (a stage fused into its neighbour's pool has none)."""
    found: dict[str, PoolConfig] = {name: getattr(config.stages, name) for name in Graph.of(config).pools}
    found["ingress"] = config.server.ingress
    return found


def export_serve_config(config: OmnistageConfig) -> dict[str, Any]:
    """The ``serve deploy`` config (Ray's ``ServeDeploySchema``) that deploys ``config``.

    Self-contained: nodes need the checkpoints it names, not the preset file. Pool placement goes
    to ``deployments``, the rest to ``args.config`` (``config_from_serve_config`` joins them back).
    Validated with Ray's own schema before returning.
    """
    from importlib.metadata import version

    from ray.serve.schema import ServeDeploySchema

    server = config.server
    args_config = config.model_dump(mode="json")
    for stage in args_config["stages"].values():
        for section in PLACEMENT_SECTIONS if stage else ():
            stage.pop(section)
    args_config["server"].pop("ingress")
    for key in HTTP_SETTINGS:
        args_config["server"].pop(key)
    exported = {
        # A proxy on every node: a load balancer in front may target any of them.
        "proxy_location": "EveryNode",
        "http_options": {"host": server.host, "port": server.port, "request_timeout_s": server.request_timeout_s},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": ROUTE_PREFIX,
                "import_path": SERVE_IMPORT_PATH,
                # Part of the app's code version: exporting after an upgrade makes `serve deploy`
                # restart the replicas on the new code, which an unchanged config would not.
                "runtime_env": {"env_vars": {"OMNISTAGE_VERSION": version("omnistage")}},
                "args": {"config": args_config},
                "deployments": [deployment_options(pool, name) for name, pool in pools(config).items()],
            }
        ],
    }
    ServeDeploySchema.model_validate(exported)
    return exported


def config_from_serve_config(exported: dict[str, Any]) -> OmnistageConfig:
    """The omnistage config a ``serve deploy`` config deploys: ``args.config`` with each entry of
    ``deployments`` put back as its pool's placement. The inverse of ``export_serve_config``."""
    apps = [app for app in exported.get("applications", []) if app.get("name") == APP_NAME]
    if len(apps) != 1:
        raise ConfigError(f"expected one application named {APP_NAME!r} in the Serve config, got {len(apps)}")
    app = apps[0]
    args = app.get("args", {})
    value = args.get("config") if isinstance(args, dict) else None
    # A preset name or path in args is loaded whole; the deployments still override its placement.
    data = copy.deepcopy(value) if isinstance(value, dict) else config_from_args(args).model_dump(mode="json")
    http = exported.get("http_options", {})
    data.setdefault("server", {}).update({key: http[key] for key in HTTP_SETTINGS if key in http})
    for options in app.get("deployments", []):
        name = options["name"]
        if name == "ingress":
            section = data.setdefault("server", {}).setdefault("ingress", {})
        elif data["stages"].get(name) is not None:
            section = data["stages"][name]
        else:
            raise ConfigError(f"the Serve config has options for deployment {name!r}, which the app does not have")
        section.update(_pool_from_options(options))
    return OmnistageConfig.model_validate(data)


def _pool_from_options(options: dict[str, Any]) -> dict[str, Any]:
    """A pool's placement sections from its Serve deployment options (as ``deployment_options`` writes them)."""
    scaling = {k: v for k, v in options.get("autoscaling_config", {}).items() if k != "initial_replicas"}
    actor = options.get("ray_actor_options", {})
    resources = {"num_cpus": actor.get("num_cpus"), "num_gpus": actor.get("num_gpus"), "custom": actor.get("resources")}
    return {
        "scaling": scaling,
        "resources": {k: v for k, v in resources.items() if v is not None},
        "queue": {k: options[k] for k in ("max_ongoing_requests", "max_queued_requests") if k in options},
        "health": {k: options[f"health_check_{k}"] for k in ("period_s", "timeout_s") if f"health_check_{k}" in options},
    }


def dump_serve_config(config: OmnistageConfig, source: str) -> str:
    """``export_serve_config`` as YAML text, with a header saying where it came from."""
    header = (
        f"# Serve config for {config.name!r}, generated from {source} by `omnistage serve --export-config`.\n"
        "# Deploy: serve deploy FILE (or serve run FILE). Pool placement (scaling, resources, queue, health) is in\n"
        "# `deployments`: Serve applies changes there in place. The rest is `args.config`: a change there\n"
        "# restarts every replica. Prefer changing the omnistage config and exporting again.\n"
    )
    return header + yaml.safe_dump(export_serve_config(config), sort_keys=False, width=100)


def write_serve_config(config_name: str, out: str | Path, host: str | None = None, port: int | None = None) -> Path:
    """Export the config named by ``config_name`` (preset or path) to ``out`` (``-``: stdout), with
    ``host`` and ``port`` replacing the config's ``server`` settings when given."""
    import sys

    config = load_config(config_name)
    overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    if overrides:
        data = config.model_dump()
        data["server"].update(overrides)
        config = OmnistageConfig.model_validate(data)
    text = dump_serve_config(config, f"config {config_name!r}")
    if str(out) == "-":
        sys.stdout.write(text)
        return Path(out)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
