"""Published end-to-end checkpoints (LLaVA, LLaVA-NeXT, BLIP-2, InstructBLIP, Qwen2-Audio, IDEFICS, Kosmos-2,
Video-LLaVA, LLaVA-NeXT-Video, InstructBLIP-Video, LLaVA-OneVision) split across the stage pools.

A stage whose ``model`` is such a directory recognises it by the ``model_type`` in its
``config.json`` and takes its own part of the model (named as in the checkpoint's files):

- ``llava``: image encoder ``vision_tower`` (hidden states of ``vision_feature_layer``, CLS
  dropped for the ``default`` strategy); input projector ``multi_modal_projector``; LLM
  ``language_model`` (base model and ``lm_head``) as the text config's causal LM.
- ``llava_next``: as ``llava``, with any-resolution tiling: the image encoder tiles the image as
  the checkpoint's image processor does (the resized whole image, then the grid's patches) and
  sends every view's features with the image's original size (``Features.image_size``); the input
  projector applies ``multi_modal_projector`` to every view, then packs them as
  ``LlavaNextModel.pack_image_features`` does (grid reassembled, padding cut away, one
  ``image_newline`` per row), the only step that needs the original size.
- ``blip-2``: image encoder ``vision_model`` (``last_hidden_state``, after its post-layernorm);
  input projector ``query_tokens`` + ``qformer`` + ``language_projection``; LLM
  ``language_model`` (OPT; Flan-T5 as encoder-decoder).
- ``instructblip``: as ``blip-2``; the Q-Former also reads the instruction, tokenized with the
  checkpoint's ``qformer_tokenizer``, after its queries.
- ``qwen2_audio``: audio encoder ``audio_tower`` (its ``last_hidden_state``: average-pooled, then
  layer-normed); input projector ``multi_modal_projector``; LLM ``language_model`` as a causal LM.
- ``idefics``: image encoder ``model.vision_model`` (its ``last_hidden_state``, CLS kept, before
  the post-layernorm, as ``IdeficsModel`` reads it); input projector ``model.perceiver_resampler``;
  LLM the decoder (``model.embed_tokens``, ``model.layers``, ``model.gated_cross_attn_layers``,
  ``model.norm``, ``lm_head``), which reads the resampled images through its cross-attention
  layers instead of spliced tokens (``CROSS_ATTENTION_TYPES``, ``Embeddings.fusion``).
- ``kosmos-2``: image encoder ``vision_model`` (every token's last hidden state through its
  ``post_layernorm``, then L2-normalised, as ``get_image_features`` reads it); input projector
  ``image_to_text_projection`` (its latent queries attend to the features); LLM ``text_model``
  (``Kosmos2TextForCausalLM``, its sinusoidal positions counted from ``pad_token_id + 1``). The
  prompt is laid out as ``Kosmos2Processor`` lays it out (``Kosmos2Prompt``), and grounded answers
  give their phrases' boxes (``Kosmos2Prompt.entities``).
- ``video_llava``: image encoder ``image_tower`` (as ``llava``); video encoder ``video_tower``, each
  sampled frame in turn, hidden states of ``vision_feature_layer`` with CLS kept (as
  ``get_video_features`` takes them); input projector ``multi_modal_projector`` for both media;
  LLM ``language_model``.
- ``llava_next_video``: image encoder and input projector's image head as ``llava_next``; video
  encoder ``vision_tower`` on each frame, CLS dropped by the ``default`` strategy, then the
  frame's patch grid pooled by ``vision_resampler`` (``spatial_pool_mode``, ``spatial_pool_stride``);
  input projector's video head ``multi_modal_projector``; LLM ``language_model``.
- ``instructblipvideo``: videos only. Video encoder ``vision_model`` on each sampled frame (4 by
  default, as its processor lays the prompt out), its ``last_hidden_state`` as ``instructblip``'s;
  input projector's video head ``query_tokens`` + ``qformer`` + ``language_projection`` run on each
  frame with the instruction, as ``instructblip``'s on an image, the frames' queries concatenated
  in time order; LLM ``language_model``.
- ``llava_onevision``: image encoder as ``llava_next`` (its SigLIP tower, all tokens, the ``full``
  strategy); input projector's image head packs as ``LlavaOnevisionModel.pack_image_features``
  does (``vision_aspect_ratio``: a packed grid of more than about nine views' tokens bilinearly
  downsampled); video encoder ``vision_tower`` on each frame; input projector's video head
  ``multi_modal_projector`` on each frame, then ``apply_pooling`` (bilinear, 2x) and one
  ``image_newline`` after the video; LLM ``language_model``.

Each pool reads only its part's tensors from the safetensors files (only the shards that hold
them), cast to the stage's dtype as they are read, and builds only that part from its sub-config.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omnistage.actors.payloads import MODALITIES

MULTIMODAL_TYPES = (
    "llava", "llava_next", "blip-2", "instructblip", "qwen2_audio", "idefics", "kosmos-2", "video_llava", "llava_next_video",
    "instructblipvideo", "llava_onevision",
)
# The medium each type takes in: the encoder pool it needs and the input projector's head.
INPUT_MODALITY = {
    "llava": "image", "llava_next": "image", "blip-2": "image", "instructblip": "image", "qwen2_audio": "audio",
    "idefics": "image", "kosmos-2": "image",
}
# Checkpoints that take videos as well as images: a video encoder pool beside the image encoder pool,
# and an input projector head for each medium.
VIDEO_TYPES = ("video_llava", "llava_next_video", "llava_onevision")
# Types whose language model reads projected media through cross-attention layers (Flamingo's
# design) rather than as embeddings spliced into the prompt.
CROSS_ATTENTION_TYPES = ("idefics",)
# Where each part of a checkpoint keeps its tensors, in the published layout (the one transformers'
# save_pretrained writes too): a prefix stripped from the names, or {prefix: the part's own prefix}.
PART_PREFIXES: dict[str, dict[str, str | dict[str, str]]] = {
    "llava": {"encoder": "vision_tower.", "projector": "multi_modal_projector.", "language": "language_model."},
    # image_newline is the packing's (the input projector's), kept at the checkpoint's top level.
    "llava_next": {
        "encoder": "vision_tower.",
        "projector": {"multi_modal_projector.": "multi_modal_projector.", "image_newline": "image_newline"},
        "language": "language_model.",
    },
    "blip-2": {
        "encoder": "vision_model.",
        "projector": {"query_tokens": "query_tokens", "qformer.": "qformer.", "language_projection.": "language_projection."},
        "language": "language_model.",
    },
    "qwen2_audio": {"encoder": "audio_tower.", "projector": "multi_modal_projector.", "language": "language_model."},
}
PART_PREFIXES["instructblip"] = PART_PREFIXES["blip-2"]
PART_PREFIXES["idefics"] = {
    "encoder": "model.vision_model.",
    "projector": "model.perceiver_resampler.",
    # The decoder with its gated cross-attention layers, under the whole model's names.
    "language": {p: p for p in ("model.embed_tokens.", "model.layers.", "model.gated_cross_attn_layers.", "model.norm.", "lm_head.")},
}
PART_PREFIXES["kosmos-2"] = {"encoder": "vision_model.", "projector": "image_to_text_projection.", "language": "text_model."}
# The video encoder's part: Video-LLaVA's own tower; LLaVA-NeXT-Video's one tower, its pooling
# (vision_resampler) holding weights only in "conv" mode, read then.
PART_PREFIXES["video_llava"] = {**PART_PREFIXES["llava"], "encoder": "image_tower.", "video_encoder": "video_tower."}
PART_PREFIXES["llava_next_video"] = {**PART_PREFIXES["llava_next"], "video_encoder": "vision_tower."}
PART_PREFIXES["llava_onevision"] = PART_PREFIXES["llava_next_video"]
# InstructBLIP-Video takes videos only: a video encoder pool (its one tower, on each frame) and a
# video head (its Q-Former, on each frame).
INPUT_MODALITY["instructblipvideo"] = "video"
PART_PREFIXES["instructblipvideo"] = {"video_encoder": "vision_model.", "projector": PART_PREFIXES["blip-2"]["projector"], "language": "language_model."}
# Checkpoints whose video encoder pool runs the model's own frame path: its tower, its video
# processor's preprocessing of a frame, its frames per video.
FRAME_TYPES = (*VIDEO_TYPES, "instructblipvideo")


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


def read_part(path: str | Path, prefix: str | dict[str, str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors named ``prefix...``, under their names without it (or, for
    ``{prefix: new prefix}``, those under each prefix, renamed to the new one), read from the
    safetensors shards that hold them and no others; nothing else is read into memory. With
    ``dtype``, each floating tensor is cast as it is read, so the part is held once, in that dtype."""
    from safetensors import safe_open

    path = Path(path)
    renames = {prefix: ""} if isinstance(prefix, str) else prefix
    wanted = tuple(renames)

    def renamed(key: str) -> str:
        old = next(p for p in wanted if key.startswith(p))
        return renames[old] + key.removeprefix(old)

    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards: dict[str, list[str] | None] = {}
        for key, shard in json.loads(index.read_text())["weight_map"].items():
            if key.startswith(wanted):
                shards.setdefault(shard, []).append(key)
    else:
        shards = {"model.safetensors": None}
    part = {}
    for shard, keys in shards.items():
        with safe_open(str(path / shard), framework="pt") as f:
            for key in keys or [k for k in f.keys() if k.startswith(wanted)]:
                tensor = f.get_tensor(key)
                part[renamed(key)] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    if not part:
        names = " or ".join(f"{p}*" for p in wanted)
        raise ValueError(f"expected tensors named {names} in the safetensors files of {str(path)!r}, found none")
    return part


def _from_part(cls: Any, config: Any, path: Path, prefix: str, dtype: torch.dtype) -> nn.Module:
    """A ``PreTrainedModel`` of class ``cls`` built from its sub-config and the tensors under ``prefix``
    (transformers renames older layouts inside the part, e.g. a CLIP tower's ``vision_model.``)."""
    model, info = cls.from_pretrained(None, config=config, state_dict=read_part(path, prefix, dtype), dtype=dtype, output_loading_info=True)
    missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
    if missing or unexpected:
        raise ValueError(
            f"expected the tensors under {prefix!r} in {str(path)!r} to be exactly {cls.__name__}'s, got "
            f"{len(missing)} missing (first: {missing[:5]}) and {len(unexpected)} unexpected (first: {unexpected[:5]})"
        )
    return model.eval()


def _model_class(config: Any) -> type:
    """The model class of a sub-config: transformers' own mapping, else the class named after the
    config (``Blip2VisionConfig`` -> ``Blip2VisionModel``: parts that are never loaded alone upstream)."""
    import transformers

    try:
        return transformers.MODEL_MAPPING[type(config)]
    except KeyError:
        return getattr(transformers, type(config).__name__.removesuffix("Config") + "Model")


def _part_checkpoint(path: str | Path, part: str) -> tuple[Path, str, Any]:
    """(directory, model_type, the whole checkpoint's config) of a checkpoint that has ``part``."""
    from transformers import AutoConfig

    model_type = checkpoint_model_type(path)
    if model_type not in PART_PREFIXES:
        raise ValueError(f"no {part} part known for model_type {model_type!r} at {str(path)!r}; expected one of {list(PART_PREFIXES)}")
    return Path(path), model_type, AutoConfig.from_pretrained(path)


def audio_part(path: str | Path, dtype: torch.dtype) -> nn.Module:
    """Qwen2-Audio's audio tower alone (``Qwen2AudioEncoder``, the class its audio config names)."""
    path, model_type, config = _part_checkpoint(path, "audio")
    if INPUT_MODALITY.get(model_type) != "audio":
        raise ValueError(f"no audio part known for model_type {model_type!r} at {str(path)!r}")
    return _from_part(_model_class(config.audio_config), config.audio_config, path, PART_PREFIXES[model_type]["encoder"], dtype)


def vision_part(path: str | Path, dtype: torch.dtype) -> tuple[nn.Module, int | list[int] | None, bool]:
    """(vision tower, hidden-state layer or None for ``last_hidden_state``, drop CLS)."""
    path, model_type, config = _part_checkpoint(path, "vision")
    if INPUT_MODALITY.get(model_type) in ("audio", "video"):
        # An audio model's tower is audio_part's; a video-only model's is video_part's.
        raise ValueError(f"no image part known for model_type {model_type!r} at {str(path)!r}: it takes {INPUT_MODALITY[model_type]} only")
    if model_type == "idefics":
        # IDEFICS's tower is no PreTrainedModel: built from its sub-config, given the attention
        # IdeficsModel hands it (its own: sdpa), and loaded whole. The perceiver reads its
        # last_hidden_state, CLS kept, without the post-layernorm (which only the pooled CLS gets).
        from transformers.models.idefics.vision import IdeficsVisionTransformer

        config.vision_config._attn_implementation = "sdpa"
        return _load_module(IdeficsVisionTransformer(config.vision_config), path, PART_PREFIXES[model_type]["encoder"], dtype), None, False
    if model_type == "kosmos-2":
        from omnistage.actors.kosmos2 import Kosmos2VisionTower

        # Normalised last hidden states, CLS kept: what the latent queries attend to.
        return _from_part(Kosmos2VisionTower, config.vision_config, path, PART_PREFIXES[model_type]["encoder"], dtype), None, False
    tower = _from_part(_model_class(config.vision_config), config.vision_config, path, PART_PREFIXES[model_type]["encoder"], dtype)
    if model_type in ("llava", "llava_next", *VIDEO_TYPES):
        return tower, config.vision_feature_layer, config.vision_feature_select_strategy == "default"
    # The (Instruct)BLIP Q-Former reads the vision model's last_hidden_state: after post_layernorm, CLS kept.
    return tower, None, False


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


class InstructBlipBridge(Blip2Bridge):
    """InstructBLIP's input projector: as BLIP-2's, but the Q-Former reads each item's instruction
    too (its own tokens after the queries, in self-attention only), and only the queries' outputs
    go on, as in ``InstructBlipForConditionalGeneration.get_image_features``."""

    # HeadStage passes each item's instruction (``Features.instruction``) to a head that says so.
    reads_instruction = True

    def __init__(self, query_tokens: nn.Parameter, qformer: nn.Module, language_projection: nn.Module, tokenizer: Any):
        super().__init__(query_tokens, qformer, language_projection)
        self.tokenizer = tokenizer

    def forward(self, features: torch.Tensor, instructions: list[str]) -> torch.Tensor:
        # Padded as the processor pads a batch; the mask keeps padding out of attention.
        text = self.tokenizer(instructions, padding=True, return_tensors="pt").to(features.device)
        queries = self.query_tokens.expand(features.shape[0], -1, -1)
        query_mask = torch.ones(queries.shape[:-1], dtype=torch.long, device=features.device)
        out = self.qformer(
            input_ids=text["input_ids"],
            attention_mask=torch.cat([query_mask, text["attention_mask"]], dim=1),
            query_embeds=queries,
            encoder_hidden_states=features,
            encoder_attention_mask=torch.ones(features.shape[:-1], dtype=torch.long, device=features.device),
        )
        query_output = out.last_hidden_state[:, : queries.shape[1]]
        return self.language_projection(query_output.to(self.language_projection.weight.dtype))


class InstructBlipVideoBridge(InstructBlipBridge):
    """InstructBLIP-Video's input projector: InstructBLIP's bridge on each frame, as
    ``InstructBlipVideoForConditionalGeneration.get_video_features`` runs it: the video's features
    split back into frames (the video encoder sends them in time order), every frame's queries
    reading the video's instruction, and the frames' projected queries concatenated in time order."""

    def __init__(self, *parts: Any, tokens_per_frame: int):
        super().__init__(*parts)
        self.tokens_per_frame = tokens_per_frame

    def forward(self, features: torch.Tensor, instructions: list[str]) -> torch.Tensor:
        """(batch, n_frames * tokens_per_frame, d_vision) features -> (batch, n_frames * num_queries, d_llm)."""
        batch, n_tokens, width = features.shape
        frames = n_tokens // self.tokens_per_frame
        per_frame = super().forward(features.reshape(batch * frames, self.tokens_per_frame, width), [text for text in instructions for _ in range(frames)])
        return per_frame.reshape(batch, frames * per_frame.shape[1], per_frame.shape[2])


class LlavaNextPacker(nn.Module):
    """LLaVA-NeXT's input projector: ``multi_modal_projector`` on every view of an image (the
    resized whole image first, then the grid's patches, as the image encoder sends them), then
    the views packed into the sequence the LLM reads, by ``LlavaNextModel.pack_image_features``
    itself: the grid reassembled, the padding the tiling added cut away (which needs the image's
    original size), an ``image_newline`` after each row, the whole image's tokens first."""

    # HeadStage passes each item's original (height, width) (``Features.image_size``) to a head that says so.
    reads_image_size = True

    def __init__(self, config: Any, projector: nn.Module, image_newline: nn.Parameter, tokens_per_view: int):
        super().__init__()
        # pack_image_features reads only self.config (the grid pinpoints and the tower's sizes).
        self.config = config
        self.multi_modal_projector = projector
        self.image_newline = image_newline
        self.tokens_per_view = tokens_per_view

    def n_views(self, image_size: tuple[int, int]) -> int:
        """How many views the tiling makes of an image of ``image_size`` (height, width): the whole
        image and its grid's patches."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        return image_size_to_num_patches(image_size, self.config.image_grid_pinpoints, self.config.vision_config.image_size)

    def forward(self, features: torch.Tensor, image_sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """(batch, n_views * tokens_per_view, d_vision) features and each image's (height, width) ->
        per image, (n_packed, d_llm) embeddings (lengths differ with the image's aspect ratio)."""
        from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

        views = [self.multi_modal_projector(f.view(-1, self.tokens_per_view, f.shape[-1])) for f in features]
        packed, _ = LlavaNextModel.pack_image_features(
            self, views, torch.tensor(image_sizes), self.config.vision_feature_select_strategy, self.image_newline
        )
        return packed


class LlavaOnevisionPacker(LlavaNextPacker):
    """LLaVA-OneVision's input projector for images: as LLaVA-NeXT's, but packed by
    ``LlavaOnevisionModel.pack_image_features`` itself, whose unpadded grid, when it holds more
    than about ``vision_aspect_ratio``'s (``anyres_max_9``) nine views' tokens, is bilinearly
    downsampled before its rows get their ``image_newline``."""

    def forward(self, features: torch.Tensor, image_sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

        views = [self.multi_modal_projector(f.view(-1, self.tokens_per_view, f.shape[-1])) for f in features]
        packed, _ = LlavaOnevisionModel.pack_image_features(
            self, views, torch.tensor(image_sizes), self.image_newline, self.config.vision_aspect_ratio
        )
        return packed


class LlavaOnevisionVideoHead(nn.Module):
    """LLaVA-OneVision's input projector for videos, as ``LlavaOnevisionModel.get_video_features``:
    ``multi_modal_projector`` on every frame's tokens, each frame's grid pooled 2x by
    ``apply_pooling`` (bilinear, odd sides rounded up), then one ``image_newline`` after the video."""

    def __init__(self, config: Any, projector: nn.Module, image_newline: nn.Parameter, tokens_per_frame: int):
        super().__init__()
        # apply_pooling reads only self.config (the tower's sizes).
        self.config = config
        self.multi_modal_projector = projector
        self.image_newline = image_newline
        self.tokens_per_frame = tokens_per_frame

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(batch, n_frames * tokens_per_frame, d_vision) -> (batch, n_frames * pooled + 1, d_llm)."""
        from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

        batch = features.shape[0]
        frames = self.multi_modal_projector(features.reshape(-1, self.tokens_per_frame, features.shape[-1]))
        pooled = LlavaOnevisionModel.apply_pooling(self, frames).reshape(batch, -1, frames.shape[-1])
        return torch.cat((pooled, self.image_newline[None, None, :].expand(batch, 1, -1).to(pooled.dtype)), dim=1)


def _load_module(module: nn.Module, path: Path, prefix: str, dtype: torch.dtype) -> nn.Module:
    """``module`` (a part that is no ``PreTrainedModel``) holding exactly the tensors under ``prefix``, in ``dtype``."""
    module.load_state_dict(read_part(path, prefix, dtype), strict=True)
    return module.to(dtype).eval()


def _bridge_parts(path: Path, model_type: str, config: Any, dtype: torch.dtype) -> tuple[nn.Parameter, nn.Module, nn.Linear]:
    """(Instruct)BLIP's query tokens, Q-Former (its class from the Q-Former config) and language projection."""
    qformer = _from_part(_model_class(config.qformer_config), config.qformer_config, path, "qformer.", dtype)
    rest = read_part(path, {k: v for k, v in PART_PREFIXES[model_type]["projector"].items() if k != "qformer."}, dtype)
    projection = nn.Linear(config.qformer_config.hidden_size, config.text_config.hidden_size, dtype=dtype)
    projection.load_state_dict({k.removeprefix("language_projection."): v for k, v in rest.items() if k != "query_tokens"}, strict=True)
    return nn.Parameter(rest["query_tokens"]), qformer, projection


def projector_part(path: str | Path, dtype: torch.dtype) -> tuple[str, nn.Module, dict[str, Any]]:
    """(modality, the checkpoint's input projector, its head spec ``{"type", "in_dim", "out_dim", ...}``)."""
    path, model_type, config = _part_checkpoint(path, "projector")
    if model_type == "idefics":
        from transformers.models.idefics.perceiver import IdeficsPerceiverResampler

        if not config.use_resampler:
            raise ValueError(f"expected an IDEFICS checkpoint with a Perceiver resampler (use_resampler), got none at {str(path)!r}")
        width, perceiver = config.vision_config.embed_dim, config.perceiver_config
        n_latents = perceiver.resampler_n_latents
        resampler = IdeficsPerceiverResampler(config, width, perceiver.resampler_depth, perceiver.resampler_n_heads, perceiver.resampler_head_dim, n_latents)
        # The latents stay in the vision width: the LLM's cross-attention layers project them.
        spec = {"type": model_type, "in_dim": width, "out_dim": width, "num_latents": n_latents, "fusion": "cross_attention"}
        return "image", _load_module(resampler, path, PART_PREFIXES[model_type]["projector"], dtype), spec
    text_width = config.text_config.hidden_size
    if model_type == "kosmos-2":
        from omnistage.actors.kosmos2 import kosmos2_projection

        projection = kosmos2_projection(config, read_part(path, PART_PREFIXES[model_type]["projector"], dtype), dtype)
        spec = {"type": model_type, "in_dim": config.vision_config.hidden_size, "out_dim": text_width, "num_queries": config.latent_query_num}
        return "image", projection, spec
    if model_type in ("blip-2", "instructblip", "instructblipvideo"):
        spec = {"type": model_type, "in_dim": config.vision_config.hidden_size, "out_dim": text_width, "num_queries": config.num_query_tokens}
        parts = _bridge_parts(path, model_type, config, dtype)
        if model_type == "blip-2":
            return "image", Blip2Bridge(*parts), spec
        from transformers import AutoTokenizer

        # The instruction reaches this stage as text (Features.instruction): the Q-Former's own
        # tokenizer lives here, where the published checkpoint keeps it.
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder="qformer_tokenizer")
        spec["reads_instruction"] = True
        if model_type == "instructblip":
            return "image", InstructBlipBridge(*parts, tokenizer), spec
        # A frame's tokens: the tower's patch grid and CLS.
        vision = config.vision_config
        tokens_per_frame = (vision.image_size // vision.patch_size) ** 2 + 1
        return "video", InstructBlipVideoBridge(*parts, tokenizer, tokens_per_frame=tokens_per_frame), {**spec, "tokens_per_frame": tokens_per_frame}
    if model_type in ("llava_next", "llava_next_video", "llava_onevision"):
        if model_type == "llava_onevision":
            from transformers.models.llava_onevision.modeling_llava_onevision import (
                LlavaOnevisionMultiModalProjector as Projector,
            )

            Packer: type[LlavaNextPacker] = LlavaOnevisionPacker
        else:
            from transformers.models.llava_next.modeling_llava_next import LlavaNextMultiModalProjector as Projector

            Packer = LlavaNextPacker
        layers = config.vision_feature_layer
        vision = config.vision_config
        in_dim = vision.hidden_size * (1 if isinstance(layers, int) else len(layers))
        tensors = read_part(path, PART_PREFIXES[model_type]["projector"], dtype)
        projector = Projector(config).to(dtype)
        projector.load_state_dict({k.removeprefix("multi_modal_projector."): v for k, v in tensors.items() if k != "image_newline"}, strict=True)
        # A view's tokens: the tower's patch grid, plus CLS unless the strategy drops it (SigLIP has none).
        tokens_per_view = (vision.image_size // vision.patch_size) ** 2 + (
            config.vision_feature_select_strategy != "default" and vision.model_type != "siglip_vision_model"
        )
        packer = Packer(config, projector, nn.Parameter(tensors["image_newline"]), tokens_per_view)
        spec = {"type": model_type, "in_dim": in_dim, "out_dim": text_width, "reads_image_size": True, "tokens_per_view": tokens_per_view}
        return "image", packer.eval(), spec
    if model_type in ("llava", "video_llava"):
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector as Projector

        layers = config.vision_feature_layer
        in_dim = config.vision_config.hidden_size * (1 if isinstance(layers, int) else len(layers))
    else:
        # One linear map per audio token: the tower has already pooled and normed its states.
        from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioMultiModalProjector as Projector

        in_dim = config.audio_config.d_model
    projector = Projector(config)
    projector.load_state_dict(read_part(path, PART_PREFIXES[model_type]["projector"], dtype), strict=True)
    return INPUT_MODALITY.get(model_type, "image"), projector.eval(), {"type": model_type, "in_dim": in_dim, "out_dim": text_width}


def language_part(path: str | Path, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """(the language model, embeddings in and logits and a KV cache out, the whole checkpoint's config):
    a causal LM as the text config's class, or BLIP-2's Flan-T5 as encoder-decoder (the LLM stage
    feeds the prompt to its encoder)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING, GenerationConfig

    path, model_type, config = _part_checkpoint(path, "language")
    if model_type == "idefics":
        lm = _idefics_decoder(path, config, dtype)
    else:
        text = config.text_config
        classes = MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING if text.is_encoder_decoder else MODEL_FOR_CAUSAL_LM_MAPPING
        if model_type == "kosmos-2":
            from omnistage.actors.kosmos2 import Kosmos2TextLM as cls
        else:
            cls = classes[type(text)]
        lm = _from_part(cls, text, path, PART_PREFIXES[model_type]["language"], dtype)
    if (path / "generation_config.json").is_file():
        # Its EOS ids (the instruct checkpoint's <|im_end|>) are the whole model's, not the text config's.
        lm.generation_config = GenerationConfig.from_pretrained(path)
    return lm, config


def _idefics_decoder(path: Path, config: Any, dtype: torch.dtype) -> nn.Module:
    """IDEFICS's decoder with its gated cross-attention layers and head: ``IdeficsForVisionText2Text``
    less its vision tower and resampler. The class builds those two too, so they are built from a
    copy of the config at depth 0 and dropped: the pool never holds them, and the forward reaches
    them only for pixels (this stage is given the resampled images instead)."""
    import copy

    from transformers import IdeficsForVisionText2Text

    shell = copy.deepcopy(config)
    depths = config.vision_config.num_hidden_layers, config.perceiver_config.resampler_depth
    shell.vision_config.num_hidden_layers, shell.perceiver_config.resampler_depth = 0, 0
    prefix = PART_PREFIXES["idefics"]["language"]
    # Its load report would list the tower and resampler as missing: they are dropped just below,
    # and the tensors that are missing otherwise raise here.
    report = logging.getLogger("transformers.modeling_utils")
    report.disabled = True
    try:
        model, info = IdeficsForVisionText2Text.from_pretrained(
            None, config=shell, state_dict=read_part(path, prefix, dtype), dtype=dtype, output_loading_info=True
        )
    finally:
        report.disabled = False
    elsewhere = ("model.vision_model.", "model.perceiver_resampler.")
    missing = sorted(k for k in info["missing_keys"] if not k.startswith(elsewhere))
    unexpected = sorted(info["unexpected_keys"])
    if missing or unexpected:
        raise ValueError(
            f"expected the tensors under {sorted(prefix)} in {str(path)!r} to be exactly IDEFICS's decoder, got "
            f"{len(missing)} missing (first: {missing[:5]}) and {len(unexpected)} unexpected (first: {unexpected[:5]})"
        )
    del model.model.vision_model, model.model.perceiver_resampler
    shell.vision_config.num_hidden_layers, shell.perceiver_config.resampler_depth = depths
    return model.eval()


class IdeficsCrossAttention:
    """How IDEFICS's decoder reads images: through its gated cross-attention layers, each text
    position attending to the resampled latents of the last image before it (none before the
    first image, or after an EOS), as ``IdeficsProcessor`` masks them. The prompt keeps one
    ``<image>`` token per image, as the processor writes it; the latents travel beside it.

    ``tokens_per_item`` latents of ``width`` (the vision width) per image."""

    modality = "image"

    def __init__(self, config: Any, tokenizer: Any):
        from transformers.models.idefics.processing_idefics import IMAGE_TOKEN

        self.token = IMAGE_TOKEN
        self.tokenizer = tokenizer
        self.tokens_per_item = config.perceiver_config.resampler_n_latents
        self.width = config.vision_config.embed_dim

    def prompt_mask(self, ids: list[int], n_images: int) -> torch.Tensor:
        """(len(ids), max(1, n_images)) 0/1: which image each prompt position reads, by the
        processor's own functions (one image slot, all zero, for a prompt without images, as it pads)."""
        from transformers.models.idefics.processing_idefics import (
            image_attention_mask_for_packed_input_ids,
            incremental_to_binary_attention_mask,
        )

        incremental, _ = image_attention_mask_for_packed_input_ids(torch.tensor([ids]), self.tokenizer, "pt")
        return incremental_to_binary_attention_mask(incremental, "pt", num_classes=max(1, n_images))[0]

    @staticmethod
    def model_inputs(states: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The decoder's keyword arguments for (rows, n_images, tokens_per_item, width) resampled
        images and a (rows, positions, n_images) mask: the resampler's output is passed as such,
        so the decoder does not run it again."""
        return {"perceiver_embeddings": states.flatten(0, 1), "image_attention_mask": mask}


def cross_attention(model_config: Any, tokenizer: Any) -> IdeficsCrossAttention | None:
    """How the checkpoint's language model reads media through cross-attention, or None where it
    reads them spliced into the prompt."""
    return IdeficsCrossAttention(model_config, tokenizer) if model_config.model_type in CROSS_ATTENTION_TYPES else None


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
    """An ``OmnistageConfig`` serving a LLaVA, LLaVA-NeXT, BLIP-2, InstructBLIP, Qwen2-Audio, IDEFICS, Kosmos-2,
    Video-LLaVA, LLaVA-NeXT-Video, InstructBLIP-Video or LLaVA-OneVision directory as encoder, input projector and
    LLM pools (image, audio or video in, or, with an encoder pool for each, image and video; text out; no
    generators, no signal tokens). The same dict works as the ``stages`` section of a YAML file for the Serve app."""
    from omnistage.cluster.config import OmnistageConfig

    path = Path(path).expanduser().resolve()
    model_type = checkpoint_model_type(path)
    if model_type not in MULTIMODAL_TYPES:
        raise ValueError(
            "expected a LLaVA, LLaVA-NeXT, BLIP-2, InstructBLIP, Qwen2-Audio, IDEFICS, Kosmos-2, Video-LLaVA, "
            "LLaVA-NeXT-Video, InstructBLIP-Video or LLaVA-OneVision checkpoint directory "
            f"(config.json model_type in {MULTIMODAL_TYPES}), "
            f"got model_type {model_type!r} at {str(path)!r}"
        )
    model = str(path)
    encoders = ("image", "video") if model_type in VIDEO_TYPES else (INPUT_MODALITY[model_type],)
    return OmnistageConfig.model_validate(
        {
            "name": name or path.name,
            "stages": {
                **{f"{modality}_encoder": {"model": model} for modality in encoders},
                "input_projector": {"model": model},
                "llm": {"model": model, "signal_tokens": {}},
            },
        }
    )


# --- videos (Video-LLaVA, LLaVA-NeXT-Video, InstructBLIP-Video, LLaVA-OneVision) --------------------

# What a video processor does to each frame, under its own settings' names: convert to RGB,
# resize, centre-crop, rescale, normalise (BaseVideoProcessor._preprocess).
FRAME_SETTINGS = (
    "do_convert_rgb", "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
    "do_normalize", "image_mean", "image_std",
)


def video_processor_settings(path: str | Path) -> dict[str, Any]:
    """The settings the checkpoint's video processor is built from, found where
    ``AutoVideoProcessor`` looks: ``processor_config.json``'s ``video_processor``, else
    ``video_preprocessor_config.json``, else the image processor's ``preprocessor_config.json``
    (where checkpoints older than video processors keep them); {} if none."""
    path = Path(path)
    nested = path / "processor_config.json"
    if nested.is_file() and "video_processor" in (settings := json.loads(nested.read_text())):
        return settings["video_processor"]
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        if (path / name).is_file():
            return json.loads((path / name).read_text())
    return {}


# InstructBlipVideoProcessor writes 4 frames' query tokens into the prompt whatever the video (as
# the model's generate does without a prompt): the frames its model reads.
INSTRUCTBLIP_VIDEO_FRAMES = 4


def checkpoint_num_frames(path: str | Path) -> int | None:
    """Frames per video the checkpoint's video processor samples (its ``num_frames``), else
    InstructBLIP-Video's 4, else None. JSON only, so a batch job's driver reads it without loading a model."""
    model_type = checkpoint_model_type(path)
    value = video_processor_settings(path).get("num_frames") if model_type in FRAME_TYPES else None
    if value is None and model_type == "instructblipvideo":
        return INSTRUCTBLIP_VIDEO_FRAMES
    return int(value) if value is not None else None


def frame_processor(path: str | Path) -> Any:
    """An image processor that turns each sampled frame into the pixels the checkpoint's video
    processor makes of it. The video processors (``VideoLlavaVideoProcessor``, ``LlavaOnevisionVideoProcessor``,
    ``LlavaNextVideoVideoProcessor``) run on torchvision, which is not always installed; their
    per-frame steps (RGB, resize of the shortest edge, centre crop, rescale, normalise) are exactly
    ``CLIPImageProcessor``'s, so it is built with the video processor's own settings: its class
    defaults under the checkpoint's values (the class is constructed for them; that needs no
    torchvision). LLaVA-NeXT-Video's image processor would tile a frame, which its video processor never does.
    ``InstructBlipVideoVideoProcessor``'s module imports torchvision as it loads, so the class is
    never built: its defaults and per-frame steps (RGB, resize to height x width, rescale,
    normalise) are ``BlipImageProcessor``'s, the published checkpoint's image processor."""
    import importlib

    path, model_type, _ = _part_checkpoint(path, "video")
    if model_type not in FRAME_TYPES:
        raise ValueError(f"no video processor known for model_type {model_type!r} at {str(path)!r}; expected one of {FRAME_TYPES}")
    settings = video_processor_settings(path)
    if model_type == "instructblipvideo":
        from transformers import BlipImageProcessor

        return BlipImageProcessor(**{k: settings[k] for k in FRAME_SETTINGS if k in settings})
    from transformers import CLIPImageProcessor

    module = importlib.import_module(f"transformers.models.{model_type}.video_processing_{model_type}")
    video_class = next(getattr(module, name) for name in module.__all__ if name.endswith("VideoProcessor"))
    video = video_class(**{k: settings[k] for k in FRAME_SETTINGS if k in settings})

    def plain(value: Any) -> Any:
        # SizeDict and tuples back to the plain dicts and lists an image processor takes.
        if hasattr(value, "items"):
            return {k: v for k, v in value.items() if v is not None}
        return list(value) if isinstance(value, tuple) else value

    return CLIPImageProcessor(**{k: plain(getattr(video, k)) for k in FRAME_SETTINGS})


def video_part(path: str | Path, dtype: torch.dtype) -> tuple[nn.Module, int | list[int], bool, nn.Module | None]:
    """(the tower frames go through, hidden-state layer, drop CLS, the pooling after it or None):
    Video-LLaVA's ``video_tower`` with CLS kept (``get_video_features`` keeps it whatever the
    strategy); LLaVA-NeXT-Video's ``vision_tower``, CLS dropped by the ``default`` strategy, then
    ``vision_resampler`` (``LlavaNextVideoPooler``: the frame's patch grid pooled by
    ``spatial_pool_stride``); InstructBLIP-Video's ``vision_model``, its ``last_hidden_state`` with
    CLS kept (after its post-layernorm), as its Q-Former reads each frame; LLaVA-OneVision's
    ``vision_tower`` as for its images, unpooled."""
    path, model_type, config = _part_checkpoint(path, "video")
    if model_type not in FRAME_TYPES:
        raise ValueError(f"no video part known for model_type {model_type!r} at {str(path)!r}; expected one of {FRAME_TYPES}")
    prefix = PART_PREFIXES[model_type]["video_encoder"]
    tower = _from_part(_model_class(config.vision_config), config.vision_config, path, prefix, dtype)
    if model_type == "instructblipvideo":
        return tower, None, False, None
    if model_type == "video_llava":
        return tower, config.vision_feature_layer, False, None
    if model_type == "llava_onevision":
        # Its frames are pooled after the projector: the input projector's video head pools them.
        return tower, config.vision_feature_layer, config.vision_feature_select_strategy == "default", None
    from transformers.models.llava_next_video.modeling_llava_next_video import LlavaNextVideoPooler

    pool = LlavaNextVideoPooler(config).to(dtype)
    if any(True for _ in pool.parameters()):  # "conv" mode: weights of its own
        pool.load_state_dict(read_part(path, "vision_resampler.", dtype), strict=True)
    return tower, config.vision_feature_layer, config.vision_feature_select_strategy == "default", pool.eval()


def projector_heads(path: str | Path, dtype: torch.dtype) -> tuple[dict[str, dict[str, Any]], dict[str, nn.Module]]:
    """(head spec by modality, head by modality) of the checkpoint's input projector. A video
    checkpoint has one ``multi_modal_projector`` for both media: the image head is ``projector_part``'s
    (LLaVA-NeXT-Video's packs the image's views, as LLaVA-NeXT's does), the video head is the same
    projector module on each frame's (already pooled) tokens in turn, with no packing and no newline.
    LLaVA-OneVision's video head is that projector, then its pooling and one newline
    (``LlavaOnevisionVideoHead``), sharing the image head's modules."""
    modality, module, spec = projector_part(path, dtype)
    model_type = checkpoint_model_type(path)
    if model_type not in VIDEO_TYPES:
        return {modality: spec}, {modality: module}
    projector = getattr(module, "multi_modal_projector", module)
    video = {"type": spec["type"], "in_dim": spec["in_dim"], "out_dim": spec["out_dim"]}
    if model_type == "llava_onevision":
        head = LlavaOnevisionVideoHead(module.config, projector, module.image_newline, spec["tokens_per_view"])
        return {"image": spec, "video": {**video, "tokens_per_frame": spec["tokens_per_view"]}}, {"image": module, "video": head.eval()}
    return {"image": spec, "video": video}, {"image": module, "video": projector}
