"""Configuration: the pydantic schema, YAML presets, and cluster manifests (``manifests``: placement
checks against node types, the KubeRay RayService)."""

from omnistage.cluster.config import ConfigError, OmnistageConfig, load_config, preset_names

__all__ = ["ConfigError", "OmnistageConfig", "load_config", "preset_names"]
