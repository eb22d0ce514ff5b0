"""Input projector stage: align encoder features (F_X) with the LLM's embedding space (P_X).

One checkpoint holds a head per input modality, each of one of four designs the survey lists:
``linear``, ``mlp2x_gelu`` (LLaVA-1.5), ``qformer`` (BLIP-2: learnable queries over
``Blip2QFormerModel``) and ``resampler`` (Flamingo/IDEFICS Perceiver resampler).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from omnistage.actors.errors import InvalidInputError
from omnistage.actors.heads import HeadStage
from omnistage.actors.payloads import Embeddings, Features

HEAD_TYPES = ("linear", "mlp2x_gelu", "qformer", "resampler")


class QFormerHead(nn.Module):
    """BLIP-2's bridge: ``num_queries`` learnable queries cross-attend to the features."""

    def __init__(self, in_dim: int, out_dim: int, num_queries: int, qformer: dict[str, Any]):
        from transformers import Blip2QFormerConfig, Blip2QFormerModel

        super().__init__()
        config = Blip2QFormerConfig(**qformer, encoder_hidden_size=in_dim)
        self.query_tokens = nn.Parameter(torch.zeros(1, num_queries, config.hidden_size))
        nn.init.normal_(self.query_tokens, std=config.initializer_range)
        self.qformer = Blip2QFormerModel(config)
        self.language_projection = nn.Linear(config.hidden_size, out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        queries = self.query_tokens.expand(features.shape[0], -1, -1)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=features)
        return self.language_projection(out.last_hidden_state)


class ResamplerHead(nn.Module):
    """A Perceiver resampler: ``num_latents`` latents attend to the features, then a linear map.

    With ``num_frames`` (a video's frames, concatenated in time order by the video encoder), a
    learned embedding per frame is added to that frame's features first, as Flamingo's resampler
    does: attention alone does not see order, and without it a shape moving right reads the same
    as one moving left. The embeddings start as standard normals, as OpenFlamingo's ``frame_embs``
    do: started at 0.02 of that, the shapes preset's video head named the way 100 clips drawn
    elsewhere moved 90 times; started as here, 95 times (same data and steps).
    """

    def __init__(
        self, in_dim: int, out_dim: int, num_latents: int, depth: int, num_heads: int, head_dim: int, num_frames: int | None = None
    ):
        from transformers import IdeficsConfig
        from transformers.models.idefics.perceiver import IdeficsPerceiverResampler

        super().__init__()
        # The resampler reads only these two settings from an IDEFICS config.
        config = IdeficsConfig(vision_config={"embed_dim": in_dim}, perceiver_config={"qk_layer_norms_perceiver": True})
        self.resampler = IdeficsPerceiverResampler(config, in_dim, depth, num_heads, head_dim, num_latents)
        self.proj = nn.Linear(in_dim, out_dim)
        self.num_frames = num_frames
        if num_frames:
            self.frame_embeds = nn.Parameter(torch.randn(num_frames, in_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.num_frames:
            batch, n_tokens, width = features.shape
            if n_tokens % self.num_frames:
                raise ValueError(
                    f"expected features of {self.num_frames} frames (a multiple of {self.num_frames} tokens), "
                    f"got {n_tokens} tokens"
                )
            frames = features.view(batch, self.num_frames, n_tokens // self.num_frames, width)
            features = (frames + self.frame_embeds[:, None]).flatten(1, 2)
        return self.proj(self.resampler(features))


def make_head(spec: dict[str, Any]) -> nn.Module:
    """Build a head from its config entry: ``{"type", "in_dim", "out_dim", ...}``."""
    kind, in_dim, out_dim = spec["type"], spec["in_dim"], spec["out_dim"]
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    if kind == "qformer":
        return QFormerHead(in_dim, out_dim, spec["num_queries"], spec["qformer"])
    if kind == "resampler":
        return ResamplerHead(
            in_dim, out_dim, spec["num_latents"], spec["depth"], spec["num_heads"], spec["head_dim"], spec.get("num_frames")
        )
    raise ValueError(f"expected a projector type in {HEAD_TYPES}, got {kind!r}")


class InputProjector(HeadStage):
    """Features of any configured modality to LLM embeddings.

    Input: ``Features`` (n_tokens, d_encoder), with the text the medium came with
    (``instruction``) for a head that reads it (InstructBLIP's). Output: ``Embeddings``
    (n_out, d_llm), where n_out is n_tokens for ``linear`` / ``mlp2x_gelu`` and the number of
    queries or latents otherwise.
    """

    component = "input_projector"
    make_head = staticmethod(make_head)
    in_field = "features"
    output_type = Embeddings
    out_field = "embeds"

    def check(self, item: Features) -> None:
        super().check(item)
        if self.head_spec(item.modality).get("reads_instruction") and not isinstance(item.instruction, str):
            raise InvalidInputError(
                f"InputProjector expected the text the {item.modality} came with (Features.instruction: its "
                f"{self.head_spec(item.modality)['type']} head reads it), got {item.instruction!r}"
            )
        spec = self.head_spec(item.modality)
        # A head that splits a video back into frames (InstructBLIP-Video's Q-Former, LLaVA-OneVision's
        # pooling) needs whole frames.
        per_frame = spec.get("tokens_per_frame")
        if per_frame and item.features.shape[0] % per_frame:
            raise InvalidInputError(
                f"InputProjector expected {item.modality} features of whole frames ({per_frame} tokens each: its "
                f"{spec['type']} head reads each frame), got {item.features.shape[0]} tokens"
            )
        if spec.get("reads_image_size"):
            size = item.image_size
            if not (isinstance(size, tuple | list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
                raise InvalidInputError(
                    f"InputProjector expected the {item.modality}'s original (height, width) (Features.image_size: "
                    f"its {spec['type']} head unpads by it), got {size!r}"
                )
            # The views the encoder tiled an image of that size into, each of tokens_per_view tokens.
            n_views = self.heads[item.modality].n_views(tuple(size))
            if item.features.shape[0] != n_views * spec["tokens_per_view"]:
                raise InvalidInputError(
                    f"InputProjector expected {n_views} views of {spec['tokens_per_view']} tokens for a "
                    f"{size[0]}x{size[1]} {item.modality}, {n_views * spec['tokens_per_view']} tokens, got {item.features.shape[0]}"
                )

    def __call__(self, items: list[Features]) -> list[Embeddings]:
        # The head's spec says how the LLM reads its output (IDEFICS's resampler: cross-attention).
        return [dataclasses.replace(e, fusion=self.head_spec(e.modality).get("fusion", "splice")) for e in super().__call__(items)]

    def load_heads(self) -> tuple[dict[str, Any], nn.Module]:
        """A LLaVA, BLIP-2, InstructBLIP, IDEFICS or Kosmos-2 checkpoint gives its projector as the
        ``image`` head, a Qwen2-Audio checkpoint as the ``audio`` head, an InstructBLIP-Video
        checkpoint as the ``video`` head, a Video-LLaVA, LLaVA-NeXT-Video or LLaVA-OneVision
        checkpoint as the ``image`` and ``video`` heads."""
        from omnistage.actors.multimodal import is_multimodal_checkpoint, projector_heads

        if not is_multimodal_checkpoint(self.checkpoint):
            return super().load_heads()
        specs, heads = projector_heads(self.checkpoint, self.dtype)
        return {"heads": specs}, nn.ModuleDict(heads)
