"""Diffusers UNets that know where they are: the ``shapes`` preset's generators use them.

A convolutional UNet sees the same thing everywhere: from pure noise it cannot tell the left of a
latent from its right, nor (the video UNet) the first frame from the last, except through the
zero padding at the edges. These subclasses add what DiT and Stable Diffusion 3 give their
transformers, a position embedding: one (channels, height, width) map added after ``conv_in``,
and for the 3D UNet one vector per frame, added before its first temporal transformer. Both start
as sines and cosines of the position, as DiT's fixed embeddings are, and are trained from there.
The 3D UNet can also read its text through the timestep embedding (below). Otherwise the
configs, forwards and ``save_pretrained`` layouts are diffusers' own. A checkpoint's
``model_index.json`` names this module; diffusers loads classes only from modules already
imported, so import it before ``DiffusionPipeline.from_pretrained`` (the generator stages do).

Measured on the shapes world (the picture UNet trained 400 steps from the same seed, then asked
for 60 captions, the place judged from the pixels): the map started as sines and cosines, under
a schedule that ends in pure noise, put 60 of 60 shapes in the place asked; started at zero,
13 of 60 (chance is 20); started as sines and cosines but under Stable Diffusion's schedule as
shipped, 16 of 60. That schedule's noisiest training latent still holds a trace of the picture,
which tells the UNet where the shape is more cheaply than the caption does, and sampling starts
from noise without it: the schedule must end in pure noise (``omnistage.pipelines.train.scheduler``).
"""

from __future__ import annotations

import functools
import math

import torch
from diffusers import ModelMixin, UNet2DConditionModel, UNet3DConditionModel
from diffusers.models.embeddings import TextTimeEmbedding
from torch import nn
from torch.nn import functional as F

# diffusers picks a component's loading method by finding its base class, by name, in the module
# that model_index.json names: this one, so ModelMixin must be found here.
__all__ = ["ModelMixin", "PositionalUNet2DConditionModel", "PositionalUNet3DConditionModel"]


def _latent_size(sample_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (sample_size, sample_size) if isinstance(sample_size, int) else (int(sample_size[0]), int(sample_size[1]))


def sincos(coords: torch.Tensor, channels: int) -> torch.Tensor:
    """(len(coords), channels) for coordinates running from -1 to 1: half the channels hold
    sin(k*pi/2*c), half cos(k*pi/2*c), k = 1, 2, ..., so that every channel varies over a grid of
    a few positions and the lowest ones rise steadily from one end to the other (DiT's
    log-spaced frequencies over integer positions leave most channels nearly constant there, and
    its highest ones repeat within a few positions). An odd last channel stays 0."""
    half = channels // 2
    angles = math.pi / 2 * coords[:, None] * torch.arange(1, half + 1)
    out = torch.zeros(len(coords), channels)
    out[:, : 2 * half] = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return out


def sincos_1d(positions: int, channels: int) -> torch.Tensor:
    """(positions, channels): the transformer's sinusoidal encoding of positions 0, 1, ..."""
    index = torch.arange(positions, dtype=torch.float32)[:, None]
    rates = torch.exp(-math.log(10000.0) * torch.arange(0, channels, 2, dtype=torch.float32) / channels)
    out = torch.zeros(positions, channels)
    out[:, 0::2] = torch.sin(index * rates)
    out[:, 1::2] = torch.cos(index * rates[: channels // 2])
    return out


def sincos_2d(channels: int, height: int, width: int) -> torch.Tensor:
    """(channels, height, width): half the channels encode x across the width, half y down the
    height (``sincos``), whatever the latent's size."""
    half = channels // 2
    x = sincos(torch.linspace(-1, 1, width), half).T[:, None, :].expand(half, height, width)
    y = sincos(torch.linspace(-1, 1, height), half).T[:, :, None].expand(half, height, width)
    out = torch.zeros(channels, height, width)
    out[: 2 * half] = torch.cat([x, y])
    return out


class PositionedConv(nn.Module):
    """``conv`` plus a learned (out_channels, height, width) map, resized to other latent sizes."""

    def __init__(self, conv: nn.Conv2d, size: tuple[int, int]):
        super().__init__()
        self.conv = conv
        self.position = nn.Parameter(sincos_2d(conv.out_channels, *size))

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        out = self.conv(sample)
        position = self.position
        if position.shape[1:] != out.shape[2:]:
            position = F.interpolate(position[None], size=out.shape[2:], mode="bilinear", align_corners=False)[0]
        return out + position.to(out.dtype)


class FramePositioned(nn.Module):
    """A temporal transformer that first adds a learned vector to each frame's features, started
    as the transformer's sinusoidal encoding of the frame's number (frames beyond ``max_frames``
    take the last one's)."""

    def __init__(self, transformer: nn.Module, channels: int, max_frames: int):
        super().__init__()
        self.transformer = transformer
        self.frames = nn.Parameter(sincos_1d(max_frames, channels))

    def forward(self, hidden_states: torch.Tensor, num_frames: int = 1, **kwargs):
        # hidden_states: (batch * num_frames, channels, height, width), frames of a clip adjacent
        index = torch.arange(num_frames, device=hidden_states.device).clamp(max=len(self.frames) - 1)
        per_frame = self.frames[index].to(hidden_states.dtype)
        batch = hidden_states.shape[0] // num_frames
        hidden_states = hidden_states + per_frame.repeat(batch, 1)[:, :, None, None]
        return self.transformer(hidden_states, num_frames=num_frames, **kwargs)


class PositionalUNet2DConditionModel(UNet2DConditionModel):
    """``UNet2DConditionModel`` with a learned position map after ``conv_in``."""

    # The parent's signature, so that diffusers' config machinery sees every argument.
    @functools.wraps(UNet2DConditionModel.__init__)
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.conv_in = PositionedConv(self.conv_in, _latent_size(self.config.sample_size))


class PositionalUNet3DConditionModel(UNet3DConditionModel):
    """``UNet3DConditionModel`` (Zeroscope) with a learned position map after ``conv_in`` and a
    learned vector per frame (up to 32) before its first temporal transformer.

    With ``time_cond_proj_dim`` set, the text also reaches every ResNet block: attention-pooled
    into the timestep condition (``TimestepEmbedding``'s ``cond_proj``, the config field latent
    consistency models use for the guidance scale), as the 2D UNet's ``addition_embed_type="text"``
    adds it to the timestep embedding, which the 3D UNet has no option for. Through cross-attention
    alone, the direction a clip's caption asks for has to come from where a position and a frame
    each attend: the shapes preset's UNet, trained 700 steps from the same seed, moved the shape
    the way 40 captions asked 18 times without the pooled text and 23 times with it (chance 8).
    """

    max_frames = 32

    @functools.wraps(UNet3DConditionModel.__init__)
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.conv_in = PositionedConv(self.conv_in, _latent_size(self.config.sample_size))
        self.transformer_in = FramePositioned(self.transformer_in, self.conv_in.conv.out_channels, self.max_frames)
        if self.config.time_cond_proj_dim is not None:
            self.text_pool = TextTimeEmbedding(self.config.cross_attention_dim, self.config.time_cond_proj_dim, num_heads=4)

    def forward(self, sample, timestep, encoder_hidden_states, class_labels=None, timestep_cond=None, **kwargs):
        if timestep_cond is None and self.config.time_cond_proj_dim is not None:
            timestep_cond = self.text_pool(encoder_hidden_states)
        return super().forward(sample, timestep, encoder_hidden_states, class_labels, timestep_cond, **kwargs)
