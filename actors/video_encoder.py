"""Video encoder stage: sample frames uniformly, encode each as an image, concatenate."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from omnistage.actors.image_encoder import ImageEncoder
from omnistage.actors.media import decode, sample_frame_indices, to_video_array
from omnistage.actors.multimodal import FRAME_TYPES, checkpoint_model_type, checkpoint_num_frames, frame_processor, video_part
from omnistage.actors.payloads import EncodedMedia, Features

if TYPE_CHECKING:
    # Configs are only annotations here: the config package imports this one's payloads.
    from omnistage.cluster.config import VideoEncoderConfig

# Frames per video where neither the stage's config nor the checkpoint says: the survey's models' 5.
DEFAULT_NUM_FRAMES = 5


def frames_per_video(config: VideoEncoderConfig) -> int:
    """The config's ``num_frames``, else the checkpoint's video processor's, else 5."""
    if config.num_frames is not None:
        return config.num_frames
    from omnistage.actors.builtin import resolve_checkpoint

    return checkpoint_num_frames(resolve_checkpoint(config.model, VideoEncoder.component)) or DEFAULT_NUM_FRAMES


class VideoEncoder(ImageEncoder):
    """Videos to feature sequences through the image tower.

    Input: videos as files (``EncodedMedia``, of which only the sampled frames are decoded) or
    (n_frames, height, width, 3) uint8 arrays. Output: ``Features`` of shape
    (num_frames * n_patches, d_vision), frames in time order.

    A Video-LLaVA, LLaVA-NeXT-Video or InstructBLIP-Video directory gives its own frame path
    (``multimodal.video_part``): the tower the model runs frames through, its layer and CLS choice
    for videos, LLaVA-NeXT-Video's spatial pooling after it, and the video processor's per-frame
    preprocessing.
    """

    # Shares the image tower's checkpoint: one vision model serves both modalities.
    component = "image_encoder"
    modality = "video"
    # LLaVA-NeXT-Video's vision_resampler, run on each frame's tokens; None: the tower's tokens as they are.
    pool: torch.nn.Module | None = None

    config: VideoEncoderConfig

    def __init__(self, config: VideoEncoderConfig):
        super().__init__(config)
        self.num_frames = frames_per_video(config)
        if checkpoint_model_type(self.checkpoint) in FRAME_TYPES:
            self.processor = frame_processor(self.checkpoint)
            # A frame is never tiled, whatever the checkpoint does to images.
            self.tiles = False
            if self.pool is not None:
                self.pool = self.pool.to(self.device)

    def checkpoint_part(self) -> tuple[torch.nn.Module, int | list[int] | None, bool]:
        if checkpoint_model_type(self.checkpoint) not in FRAME_TYPES:
            return super().checkpoint_part()
        tower, layer, drop_cls, self.pool = video_part(self.checkpoint, self.dtype)
        return tower, layer, drop_cls

    def prepare(self, video: EncodedMedia | np.ndarray) -> np.ndarray:
        if isinstance(video, EncodedMedia):
            return decode(video, video_frames=self.num_frames)
        return to_video_array(video)

    @torch.inference_mode()
    def __call__(self, videos: list[EncodedMedia | np.ndarray]) -> list[Features]:
        k = self.num_frames
        frames = []
        for video in videos:
            video = self.prepare(video)
            frames.extend(video[sample_frame_indices(len(video), k)])
        # One forward pass for every frame of every video in the batch.
        features = self.encode_frames(frames)
        if self.pool is not None:
            features = self.pool(features)
        features = features.float().cpu().numpy()
        per_video = features.reshape(len(videos), k * features.shape[1], features.shape[2])
        return [Features(modality="video", features=f) for f in per_video]
