"""Published end-to-end checkpoints (LLaVA, BLIP-2, Qwen2-Audio) split across the stage pools.

A stage whose ``model`` is such a directory recognises it by the ``model_type`` in its
``config.json`` and takes its own part of the model:

- ``llava``: image encoder ``model.vision_tower`` (hidden states of ``vision_feature_layer``, CLS
  dropped for the ``default`` strategy); input projector ``model.multi_modal_projector``; LLM
  ``model.language_model`` + ``lm_head`` as a causal LM.
- ``blip-2``: image encoder ``vision_model`` (``last_hidden_state``, after its post-layernorm);
  input projector ``query_tokens`` + ``qformer`` + ``language_projection``; LLM
  ``language_model`` (OPT; Flan-T5 as encoder-decoder).
- ``qwen2_audio``: audio encoder ``audio_tower`` (its ``last_hidden_state``: average-pooled, then
  layer-normed); input projector ``multi_modal_projector``; LLM ``language_model`` as a causal LM.

LLaVA and BLIP-2 are loaded whole (``AutoModelForImageTextToText``, class chosen from the
checkpoint's config) and the unused parts dropped, so each pool briefly holds the full weights
while loading. A Qwen2-Audio pool reads only its part's tensors from the safetensors files and
builds only that part.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omnistage.actors.payloads import MODALITIES

MULTIMODAL_TYPES = ("llava", "blip-2", "qwen2_audio")
# The medium each type takes in: the encoder pool it needs and the input projector's head.
INPUT_MODALITY = {"llava": "image", "blip-2": "image", "qwen2_audio": "audio"}
# Types loaded whole and split in memory; the others are loaded part by part.
WHOLE_TYPES = ("llava", "blip-2")
# Where each part of a Qwen2-Audio checkpoint keeps its tensors, in the published layout (the one
# transformers' save_pretrained writes too).
QWEN2_AUDIO_PREFIXES = {"audio": "audio_tower.", "projector": "multi_modal_projector.", "language": "language_model."}


def checkpoint_model_type(path: str | Path) -> str | None:
    """The ``model_type`` in a transformers checkpoint's ``config.json``, or None (no such file or key)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    try:
        return json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError):
        return None


def is_multimodal_checkpoint(path: str | Path) -> bool:
    return checkpoint_model_type(path) in MULTIMODAL_TYPES


def load_multimodal(path: str | Path, dtype: torch.dtype) -> nn.Module:
    """The whole end-to-end model; its class comes from the checkpoint's own config."""
    from transformers import AutoModelForImageTextToText

    model_type = checkpoint_model_type(path)
    if model_type not in WHOLE_TYPES:
        raise ValueError(f"expected a checkpoint with model_type in {WHOLE_TYPES} at {str(path)!r}, got {model_type!r}")
    return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).eval()


def read_part(path: str | Path, prefix: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors named ``prefix...``, under their names without it, read from the
    safetensors shards that hold them and no others; nothing else is read into memory. With
    ``dtype``, each floating tensor is cast as it is read, so the part is held once, in that dtype."""
    from safetensors import safe_open

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards: dict[str, list[str]] = {}
        for key, shard in json.loads(index.read_text())["weight_map"].items():
            if key.startswith(prefix):
                shards.setdefault(shard, []).append(key)
    else:
        shards = {"model.safetensors": None}
    part = {}
    for shard, keys in shards.items():
        with safe_open(str(path / shard), framework="pt") as f:
            for key in keys or [k for k in f.keys() if k.startswith(prefix)]:
                tensor = f.get_tensor(key)
                part[key.removeprefix(prefix)] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    if not part:
        raise ValueError(f"expected tensors named {prefix}* in the safetensors files of {str(path)!r}, found none")
    return part


def _from_part(cls: Any, config: Any, path: Path, prefix: str, dtype: torch.dtype) -> nn.Module:
    """A ``PreTrainedModel`` of class ``cls`` built from its sub-config and the tensors under ``prefix``."""
    model, info = cls.from_pretrained(None, config=config, state_dict=read_part(path, prefix, dtype), dtype=dtype, output_loading_info=True)
    missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
    if missing or unexpected:
        raise ValueError(
            f"expected the tensors under {prefix!r} in {str(path)!r} to be exactly {cls.__name__}'s, got "
            f"{len(missing)} missing (first: {missing[:5]}) and {len(unexpected)} unexpected (first: {unexpected[:5]})"
        )
    return model.eval()


def audio_part(path: str | Path, dtype: torch.dtype) -> nn.Module:
    """Qwen2-Audio's audio tower alone (``Qwen2AudioEncoder``, the class its audio config names)."""
    from transformers import MODEL_MAPPING, AutoConfig

    model_type = checkpoint_model_type(path)
    if model_type != "qwen2_audio":
        raise ValueError(f"no audio part known for model_type {model_type!r} at {str(path)!r}")
    config = AutoConfig.from_pretrained(path).audio_config
    return _from_part(MODEL_MAPPING[type(config)], config, Path(path), QWEN2_AUDIO_PREFIXES["audio"], dtype)


def vision_part(model: nn.Module) -> tuple[nn.Module, int | list[int] | None, bool]:
    """(vision tower, hidden-state layer or None for ``last_hidden_state``, drop CLS)."""
    config = model.config
    if config.model_type == "llava":
        return model.model.vision_tower, config.vision_feature_layer, config.vision_feature_select_strategy == "default"
    if config.model_type == "blip-2":
        # BLIP-2's Q-Former reads the vision model's last_hidden_state: after post_layernorm, CLS kept.
        return model.vision_model, None, False
    raise ValueError(f"no vision part known for model_type {config.model_type!r}")


class Blip2Bridge(nn.Module):
    """BLIP-2's input projector: learnable queries read the image features through the Q-Former,
    then a linear map into the language model's embeddings (as in ``Blip2ForConditionalGeneration``)."""

    def __init__(self, query_tokens: nn.Parameter, qformer: nn.Module, language_projection: nn.Module):
        super().__init__()
        self.query_tokens = query_tokens
        self.qformer = qformer
        self.language_projection = language_projection

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        queries = self.query_tokens.expand(features.shape[0], -1, -1)
        mask = torch.ones(features.shape[:-1], dtype=torch.long, device=features.device)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=features, encoder_attention_mask=mask)
        return self.language_projection(out.last_hidden_state.to(self.language_projection.weight.dtype))


def projector_part(model: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
    """(image projector module, its head spec ``{"type", "in_dim", "out_dim", ...}``)."""
    config = model.config
    text_width = config.text_config.hidden_size
    if config.model_type == "llava":
        layers = config.vision_feature_layer
        n_layers = 1 if isinstance(layers, int) else len(layers)
        in_dim = config.vision_config.hidden_size * n_layers
        return model.model.multi_modal_projector, {"type": "llava", "in_dim": in_dim, "out_dim": text_width}
    if config.model_type == "blip-2":
        bridge = Blip2Bridge(model.query_tokens, model.qformer, model.language_projection)
        spec = {
            "type": "blip-2",
            "in_dim": config.vision_config.hidden_size,
            "out_dim": text_width,
            "num_queries": config.num_query_tokens,
        }
        return bridge, spec
    raise ValueError(f"no projector part known for model_type {config.model_type!r}")


def load_projector(path: str | Path, dtype: torch.dtype) -> tuple[str, nn.Module, dict[str, Any]]:
    """(modality, the checkpoint's input projector, its head spec)."""
    model_type = checkpoint_model_type(path)
    if model_type != "qwen2_audio":
        return INPUT_MODALITY[model_type], *projector_part(load_multimodal(path, dtype))
    from transformers import AutoConfig
    from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioMultiModalProjector

    config = AutoConfig.from_pretrained(path)
    # One linear map per audio token: the tower has already pooled and normed its states.
    projector = Qwen2AudioMultiModalProjector(config)
    projector.load_state_dict(read_part(path, QWEN2_AUDIO_PREFIXES["projector"]), strict=True)
    spec = {"type": "qwen2_audio", "in_dim": config.audio_config.d_model, "out_dim": config.text_config.hidden_size}
    return "audio", projector.eval(), spec


def load_language_part(path: str | Path, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """(the language model as a causal LM, the whole checkpoint's config)."""
    if checkpoint_model_type(path) != "qwen2_audio":
        whole = load_multimodal(path, dtype)
        return language_part(whole), whole.config
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, GenerationConfig

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    causal_lm = MODEL_FOR_CAUSAL_LM_MAPPING[type(config.text_config)]
    lm = _from_part(causal_lm, config.text_config, path, QWEN2_AUDIO_PREFIXES["language"], dtype)
    if (path / "generation_config.json").is_file():
        # Its EOS ids (the instruct checkpoint's <|im_end|>) are the whole model's, not the text config's.
        lm.generation_config = GenerationConfig.from_pretrained(path)
    return lm, config


def language_part(model: nn.Module) -> nn.Module:
    """The language model as a causal LM (embeddings in, logits and a KV cache out)."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if config.model_type == "blip-2":
        # OPT (causal) or Flan-T5 (encoder-decoder: the LLM stage feeds the prompt to its encoder).
        lm = model.language_model
    elif config.model_type == "llava":
        # LLaVA keeps the base model and lm_head apart; put them back into the text config's
        # causal-LM class. Built on the meta device so no weights are allocated twice.
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(config.text_config)
        lm.model = model.model.language_model
        lm.lm_head = model.lm_head
    else:
        raise ValueError(f"no language part known for model_type {config.model_type!r}")
    lm.generation_config = model.generation_config
    return lm.eval()


def media_token_ids(model_config: Any) -> dict[str, int]:
    """The id of each media token the checkpoint's config names (``image_token_id`` or
    ``image_token_index``, likewise for video and audio), by modality."""
    ids = {}
    for modality in MODALITIES:
        for name in (f"{modality}_token_id", f"{modality}_token_index"):
            value = getattr(model_config, name, None)
            if value is not None:
                ids[modality] = int(value)
                break
    if not ids:
        raise ValueError(
            f"expected the {model_config.model_type} config to name a media token (image_token_id / "
            "image_token_index, or the video / audio ones), got none"
        )
    return ids


def pretrained_config(path: str | Path, name: str | None = None):
    """An ``OmnistageConfig`` serving a LLaVA, BLIP-2 or Qwen2-Audio directory as encoder, input
    projector and LLM pools (image or audio in, text out; no generators, no signal tokens). The same
    dict works as the ``stages`` section of a YAML file for the Serve app."""
    from omnistage.cluster.config import OmnistageConfig

    path = Path(path).expanduser().resolve()
    model_type = checkpoint_model_type(path)
    if model_type not in MULTIMODAL_TYPES:
        raise ValueError(
            f"expected a LLaVA, BLIP-2 or Qwen2-Audio checkpoint directory (config.json model_type in {MULTIMODAL_TYPES}), "
            f"got model_type {model_type!r} at {str(path)!r}"
        )
    model = str(path)
    return OmnistageConfig.model_validate(
        {
            "name": name or path.name,
            "stages": {
                f"{INPUT_MODALITY[model_type]}_encoder": {"model": model},
                "input_projector": {"model": model},
                "llm": {"model": model, "signal_tokens": {}},
            },
        }
    )
