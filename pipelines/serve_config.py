"""The Serve application as Ray's own tools deploy it: an application builder for ``import_path``
and the ``serve deploy`` config exported from an omnistage config.

``serve deploy serve.yaml``, ``serve run serve.yaml`` and KubeRay's ``serveConfigV2`` all name
``omnistage.pipelines.serve_config:app_builder`` with ``args: {config: ...}``; Serve calls the
builder on the cluster, which builds the same application ``omnistage serve`` deploys. The
exported ``deployments`` list repeats each pool's scaling, resources and queue limits, because
that is where operators (and Serve's in-place updates) expect them; both come from one config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from ray import serve

from omnistage.cluster.config import ConfigError, OmnistageConfig, PoolConfig, load_config
from omnistage.pipelines.serve import APP_NAME, build_app, deployment_options

SERVE_IMPORT_PATH = "omnistage.pipelines.serve_config:app_builder"
ROUTE_PREFIX = "/"


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
    """Deployment name -> its pool config, every configured stage then the ingress, as ``build_app``
    names them."""
    from omnistage.actors.registry import STAGES

    found: dict[str, PoolConfig] = {
        name: getattr(config.stages, name) for name in STAGES if getattr(config.stages, name) is not None
    }
    found["ingress"] = config.server.ingress
    return found


def export_serve_config(config: OmnistageConfig) -> dict[str, Any]:
    """The ``serve deploy`` config (Ray's ``ServeDeploySchema``) that deploys ``config``.

    ``args.config`` carries the whole config, so the file is self-contained: nodes need the
    checkpoints it names, not the preset file. Validated with Ray's own schema before returning.
    """
    from ray.serve.schema import ServeDeploySchema

    server = config.server
    exported = {
        # A proxy on every node: a load balancer in front may target any of them.
        "proxy_location": "EveryNode",
        "http_options": {"host": server.host, "port": server.port, "request_timeout_s": server.request_timeout_s},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": ROUTE_PREFIX,
                "import_path": SERVE_IMPORT_PATH,
                "args": {"config": config.model_dump(mode="json")},
                "deployments": [deployment_options(pool, name) for name, pool in pools(config).items()],
            }
        ],
    }
    ServeDeploySchema.model_validate(exported)
    return exported


def dump_serve_config(config: OmnistageConfig, source: str) -> str:
    """``export_serve_config`` as YAML text, with a header saying where it came from."""
    header = (
        f"# Serve config for {config.name!r}, generated from {source} by `omnistage serve --export-config`.\n"
        "# Deploy: serve deploy FILE (or serve run FILE). Change the omnistage config and export again rather\n"
        "# than editing here: `deployments` and `args.config` are generated from the same settings.\n"
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
