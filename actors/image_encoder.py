"""Image encoder stage: a CLIP-style vision tower turns images into patch features (F_X)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from omnistage.actors.base import Stage
from omnistage.actors.media import decode, to_image_array
from omnistage.actors.multimodal import is_multimodal_checkpoint, vision_part
from omnistage.actors.payloads import EncodedMedia, Features

if TYPE_CHECKING:
    # Configs are only annotations here: the config package imports this one's payloads.
    from omnistage.cluster.config import ImageEncoderConfig


class ImageEncoder(Stage):
    """Images to feature sequences, LLaVA style: hidden states of ``feature_layer``, CLS dropped.

    Input: images as (height, width, 3) uint8 arrays. Output: ``Features`` of shape
    (n_patches, d_vision), or (n_patches + 1, d_vision) with ``drop_cls=False``; with an
    any-resolution processor (LLaVA-NeXT's), every view's in turn, with the image's size.
    """

    component = "image_encoder"
    modality = "image"

    def __init__(self, config: ImageEncoderConfig):
        super().__init__(config)
        from transformers import AutoImageProcessor, AutoModel

        self.processor = AutoImageProcessor.from_pretrained(self.checkpoint)
        # An any-resolution processor (LLaVA-NeXT's) tiles each image into views by its grids.
        self.tiles = bool(getattr(self.processor, "image_grid_pinpoints", None))
        # Without a choice of the checkpoint's or the config's: LLaVA's, the second to last layer
        # without CLS. A feature layer of None means last_hidden_state (after any post-layernorm,
        # as BLIP-2 reads it).
        layer: int | list[int] | None = -2
        drop_cls = True
        if is_multimodal_checkpoint(self.checkpoint):
            # LLaVA / BLIP-2: keep the vision tower, and the checkpoint's own feature layer and
            # CLS choice.
            self.model, layer, drop_cls = self.checkpoint_part()
        else:
            # The class comes from the checkpoint's model_type (CLIP, SigLIP, ViT, DINOv2, BEiT, ...).
            model = AutoModel.from_pretrained(self.checkpoint, dtype=self.dtype)
            # A full CLIP / SigLIP checkpoint also holds a text tower; only the vision side is used.
            self.model = getattr(model, "vision_model", model)
        # The stage's config wins over both where it sets them.
        self.feature_layer = layer if config.feature_layer is None else config.feature_layer
        self.drop_cls: bool = drop_cls if config.drop_cls is None else config.drop_cls
        self.model = self.model.to(self.device).eval()
        vision_config = self.model.config
        n_layers = 1 if isinstance(self.feature_layer, int | None) else len(self.feature_layer)
        self.feature_dim: int = vision_config.hidden_size * n_layers
        # Some towers (SigLIP) have no CLS token: dropping would lose a patch.
        self.has_cls = _has_cls(vision_config)
        if not self.has_cls:
            self.drop_cls = False

    def checkpoint_part(self) -> tuple[torch.nn.Module, int | list[int] | None, bool]:
        """(tower, feature layer, drop CLS) of a published end-to-end checkpoint (``multimodal.py``)."""
        return vision_part(self.checkpoint, self.dtype)

    @torch.inference_mode()
    def encode_frames(self, images: list[np.ndarray]) -> torch.Tensor:
        """(n, height, width, 3) uint8 images -> (n, n_tokens, d_vision) features on the stage's device."""
        inputs = self.processor(images=images, return_tensors="pt")
        # IDEFICS's image processor returns the pixel tensor itself, not a BatchFeature; Video-LLaVA's
        # names them as its model once took them.
        if isinstance(inputs, torch.Tensor):
            return self.encode_pixels(inputs)
        return self.encode_pixels(inputs["pixel_values"] if "pixel_values" in inputs else inputs["pixel_values_images"])

    @torch.inference_mode()
    def encode_tiled(self, images: list[np.ndarray]) -> list[Features]:
        """Images tiled by an any-resolution processor (LLaVA-NeXT's): each image's views (the
        resized whole image, then the grid's patches) through the tower in one batch, as
        ``LlavaNextModel.get_image_features`` runs them, sent on as one (n_views * n_tokens,
        d_vision) sequence with the image's original (height, width)."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        inputs = self.processor(images=images, return_tensors="pt")
        sizes = [(int(h), int(w)) for h, w in inputs["image_sizes"].tolist()]
        # The processor pads every image's views to the batch's most; the padding views are dropped.
        counts = [image_size_to_num_patches(size, self.processor.image_grid_pinpoints, self.model.config.image_size) for size in sizes]
        views = torch.cat([pixels[:n] for pixels, n in zip(inputs["pixel_values"], counts)])
        features = self.encode_pixels(views).float().cpu()
        return [
            Features(modality="image", features=f.flatten(0, 1).numpy(), image_size=size)
            for f, size in zip(torch.split(features, counts), sizes)
        ]

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(n, 3, height, width) processed pixels -> (n, n_tokens, d_vision) features on the stage's device."""
        out = self.model(pixel_values=pixels.to(self.device, self.dtype), output_hidden_states=True)
        if self.feature_layer is None:
            layers = [out.last_hidden_state]
        elif isinstance(self.feature_layer, int):
            layers = [out.hidden_states[self.feature_layer]]
        else:  # LLaVA variants that concatenate several layers
            layers = [out.hidden_states[i] for i in self.feature_layer]
        if self.drop_cls:
            layers = [h[:, 1:] for h in layers]
        return layers[0] if len(layers) == 1 else torch.cat(layers, dim=-1)

    def check(self, image: EncodedMedia | np.ndarray) -> None:
        self.prepare(image)

    def prepare(self, image: EncodedMedia | np.ndarray) -> np.ndarray:
        return decode(image) if isinstance(image, EncodedMedia) else to_image_array(image)

    def __call__(self, images: list[EncodedMedia | np.ndarray]) -> list[Features]:
        arrays = [self.prepare(image) for image in images]
        if self.tiles:
            return self.encode_tiled(arrays)
        features = self.encode_frames(arrays).float().cpu().numpy()
        return [Features(modality="image", features=f) for f in features]


def _has_cls(vision_config) -> bool:
    """Whether the tower prepends a CLS token: SigLIP-style towers output patch tokens only."""
    return vision_config.model_type not in ("siglip_vision_model", "siglip2_vision_model")
