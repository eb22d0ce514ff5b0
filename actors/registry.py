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


def create_stage(name: str, config: cfg.StageConfig | dict) -> Stage:
    """Load stage ``name`` from its config (a config object, or its dict form as sent to a replica)."""
    if name not in STAGES:
        raise ValueError(f"expected a stage name in {list(STAGES)}, got {name!r}")
    target, config_class = STAGES[name]
    module_name, class_name = target.split(":")
    stage_class = getattr(importlib.import_module(module_name), class_name)
    return stage_class(config_class.model_validate(config) if isinstance(config, dict) else config)
