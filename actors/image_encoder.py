"""Image encoder stage: a CLIP-style vision tower turns images into patch features (F_X)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from omnistage.actors.base import Stage
from omnistage.actors.media import to_image_array
from omnistage.actors.payloads import Features
from omnistage.cluster.config import ImageEncoderConfig


def build_tiny(path: Path, seed: int) -> None:
    """A CLIP ViT with 30x30 inputs and 2x2 patches: (B, 3, 30, 30) -> (B, 225, 32) patch features."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        image_size=30, patch_size=2, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
    )
    CLIPVisionModel(config).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}).save_pretrained(path)


class ImageEncoder(Stage):
    """Images to feature sequences, LLaVA style: hidden states of ``feature_layer``, CLS dropped.

    Input: images as (height, width, 3) uint8 arrays. Output: ``Features`` of shape
    (n_patches, d_vision), or (n_patches + 1, d_vision) with ``drop_cls=False``.
    """

    component = "image_encoder"
    modality = "image"

    def __init__(self, config: ImageEncoderConfig):
        super().__init__(config)
        from transformers import AutoImageProcessor, AutoModel

        self.processor = AutoImageProcessor.from_pretrained(self.checkpoint)
        model = AutoModel.from_pretrained(self.checkpoint, dtype=self.dtype)
        # A full CLIP / SigLIP checkpoint also holds a text tower; only the vision side is used.
        self.model = getattr(model, "vision_model", model).to(self.device).eval()
        self.feature_dim: int = self.model.config.hidden_size

    @torch.inference_mode()
    def encode_frames(self, images: list[np.ndarray]) -> torch.Tensor:
        """(n, height, width, 3) uint8 images -> (n, n_tokens, d_vision) features on the stage's device."""
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        out = self.model(pixel_values=pixels.to(self.device, self.dtype), output_hidden_states=True)
        features = out.hidden_states[self.config.feature_layer]
        return features[:, 1:] if self.config.drop_cls else features

    def check(self, image: np.ndarray) -> None:
        to_image_array(image)

    def __call__(self, images: list[np.ndarray]) -> list[Features]:
        arrays = [to_image_array(image) for image in images]
        features = self.encode_frames(arrays).float().cpu().numpy()
        return [Features(modality="image", features=f) for f in features]
