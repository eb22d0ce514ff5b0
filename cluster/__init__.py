"""Configuration: the pydantic schema, YAML presets, and (later) Serve and cluster configs."""

from omnistage.cluster.config import ConfigError, OmnistageConfig, load_config, preset_names

__all__ = ["ConfigError", "OmnistageConfig", "load_config", "preset_names"]
