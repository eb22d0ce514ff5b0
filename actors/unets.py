"""Diffusers UNets that know where they are: the ``shapes`` preset's generators use them.

A convolutional UNet sees the same thing everywhere: from pure noise it cannot tell the left of a
latent from its right, nor (the video UNet) the first frame from the last, except through the
zero padding at the edges. Trained on captions that name a place, Stable Diffusion's UNet at this
scale drew the shape in a random third (34.8%, chance), and did as badly with three levels down to
4x4. These subclasses add what DiT and Stable Diffusion 3 give their transformers, a learned
position embedding: one (channels, height, width) map added after ``conv_in``, and for the 3D UNet
one vector per frame, added before its first temporal transformer. Nothing else changes: same
config, same forward, same ``save_pretrained`` layout. A checkpoint's ``model_index.json`` names
this module; diffusers loads classes only from modules already imported, so import it before
``DiffusionPipeline.from_pretrained`` (the generator stages do).
"""

from __future__ import annotations

import functools

import torch
from diffusers import ModelMixin, UNet2DConditionModel, UNet3DConditionModel
from torch import nn
from torch.nn import functional as F

# diffusers picks a component's loading method by finding its base class, by name, in the module
# that model_index.json names: this one, so ModelMixin must be found here.
__all__ = ["ModelMixin", "PositionalUNet2DConditionModel", "PositionalUNet3DConditionModel"]


def _latent_size(sample_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (sample_size, sample_size) if isinstance(sample_size, int) else (int(sample_size[0]), int(sample_size[1]))


class PositionedConv(nn.Module):
    """``conv`` plus a learned (out_channels, height, width) map, resized to other latent sizes."""

    def __init__(self, conv: nn.Conv2d, size: tuple[int, int]):
        super().__init__()
        self.conv = conv
        self.position = nn.Parameter(torch.zeros(conv.out_channels, *size))

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        out = self.conv(sample)
        position = self.position
        if position.shape[1:] != out.shape[2:]:
            position = F.interpolate(position[None], size=out.shape[2:], mode="bilinear", align_corners=False)[0]
        return out + position.to(out.dtype)


class FramePositioned(nn.Module):
    """A temporal transformer that first adds a learned vector to each frame's features (frames
    beyond ``max_frames`` take the last one's)."""

    def __init__(self, transformer: nn.Module, channels: int, max_frames: int):
        super().__init__()
        self.transformer = transformer
        self.frames = nn.Parameter(torch.zeros(max_frames, channels))

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
    learned vector per frame (up to 32) before its first temporal transformer."""

    max_frames = 32

    @functools.wraps(UNet3DConditionModel.__init__)
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.conv_in = PositionedConv(self.conv_in, _latent_size(self.config.sample_size))
        self.transformer_in = FramePositioned(self.transformer_in, self.conv_in.conv.out_channels, self.max_frames)
