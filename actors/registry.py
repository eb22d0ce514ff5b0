"""Stage names (as in the config's ``stages`` section) to their classes, imported on demand so that
listing stages stays light."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from omnistage.cluster import config as cfg

if TYPE_CHECKING:
    from omnistage.actors.base import Stage

STAGES: dict[str, tuple[str, type[cfg.StageConfig]]] = {
    "image_encoder": ("omnistage.actors.image_encoder:ImageEncoder", cfg.ImageEncoderConfig),
    "video_encoder": ("omnistage.actors.video_encoder:VideoEncoder", cfg.VideoEncoderConfig),
    "audio_encoder": ("omnistage.actors.audio_encoder:AudioEncoder", cfg.AudioEncoderConfig),
    "input_projector": ("omnistage.actors.input_projector:InputProjector", cfg.InputProjectorConfig),
    "llm": ("omnistage.actors.llm:LLM", cfg.LLMConfig),
    "output_projector": ("omnistage.actors.output_projector:OutputProjector", cfg.OutputProjectorConfig),
    "image_generator": ("omnistage.actors.generator:ImageGenerator", cfg.ImageGeneratorConfig),
    "video_generator": ("omnistage.actors.generator:VideoGenerator", cfg.VideoGeneratorConfig),
    "audio_generator": ("omnistage.actors.generator:AudioGenerator", cfg.AudioGeneratorConfig),
}


def create_stage(name: str, config: cfg.StageConfig | dict, cache: cfg.CacheConfig | dict | None = None) -> Stage:
    """Load stage ``name`` from its config (a config object, or its dict form as sent to a
    replica), wrapped in the feature cache when ``cache`` names it."""
    if name not in STAGES:
        raise ValueError(f"expected a stage name in {list(STAGES)}, got {name!r}")
    target, config_class = STAGES[name]
    module_name, class_name = target.split(":")
    stage_class = getattr(importlib.import_module(module_name), class_name)
    stage = stage_class(config_class.model_validate(config) if isinstance(config, dict) else config)
    cache = cfg.CacheConfig.model_validate(cache) if isinstance(cache, dict) else cache
    if cache is None or not cache.enabled or name not in cache.stages:
        return stage
    from omnistage.actors.cache import CachedEncoder, make_store

    return CachedEncoder(stage, make_store(cache.redis_url, cache.ttl_s, cache.local_max_bytes), cache.max_value_bytes)
