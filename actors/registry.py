"""Stage names (as in the config's ``stages`` section) to their classes, imported on demand so that
listing stages stays light."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omnistage.actors.base import Stage
    from omnistage.cluster.config import CacheConfig, StageConfig

# Stage name -> "module:class" of the stage and the name of its config class in
# omnistage.cluster.config (resolved on use: the config package imports this package's payloads).
STAGES: dict[str, tuple[str, str]] = {
    "image_encoder": ("omnistage.actors.image_encoder:ImageEncoder", "ImageEncoderConfig"),
    "video_encoder": ("omnistage.actors.video_encoder:VideoEncoder", "VideoEncoderConfig"),
    "audio_encoder": ("omnistage.actors.audio_encoder:AudioEncoder", "AudioEncoderConfig"),
    "input_projector": ("omnistage.actors.input_projector:InputProjector", "InputProjectorConfig"),
    "llm": ("omnistage.actors.llm:LLM", "LLMConfig"),
    "output_projector": ("omnistage.actors.output_projector:OutputProjector", "OutputProjectorConfig"),
    "image_generator": ("omnistage.actors.generator:ImageGenerator", "ImageGeneratorConfig"),
    "video_generator": ("omnistage.actors.generator:VideoGenerator", "VideoGeneratorConfig"),
    "audio_generator": ("omnistage.actors.generator:AudioGenerator", "AudioGeneratorConfig"),
}


def create_stage(name: str, config: StageConfig | dict, cache: CacheConfig | dict | None = None) -> Stage:
    """Load stage ``name`` from its config (a config object, or its dict form as sent to a
    replica), wrapped in the feature cache when ``cache`` names it."""
    from omnistage.cluster import config as cfg

    if name not in STAGES:
        raise ValueError(f"expected a stage name in {list(STAGES)}, got {name!r}")
    target, config_name = STAGES[name]
    config_class = getattr(cfg, config_name)
    module_name, class_name = target.split(":")
    stage_class = getattr(importlib.import_module(module_name), class_name)
    stage = stage_class(config_class.model_validate(config) if isinstance(config, dict) else config)
    cache = cfg.CacheConfig.model_validate(cache) if isinstance(cache, dict) else cache
    if cache is None or not cache.enabled or name not in cache.stages:
        return stage
    from omnistage.actors.cache import CachedEncoder, make_store

    return CachedEncoder(stage, make_store(cache.redis_url, cache.ttl_s, cache.local_max_bytes), cache.max_value_bytes)
