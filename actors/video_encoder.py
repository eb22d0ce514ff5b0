"""Video encoder stage: sample frames uniformly, encode each as an image, concatenate."""

from __future__ import annotations

import numpy as np

from omnistage.actors.image_encoder import ImageEncoder
from omnistage.actors.media import to_video_array
from omnistage.actors.payloads import Features
from omnistage.cluster.config import VideoEncoderConfig


def sample_frame_indices(n_frames: int, n_samples: int) -> np.ndarray:
    """``n_samples`` indices spread evenly from the first to the last frame (repeats if too few)."""
    return np.linspace(0, n_frames - 1, n_samples).round().astype(int)


class VideoEncoder(ImageEncoder):
    """Videos to feature sequences through the image tower.

    Input: videos as (n_frames, height, width, 3) uint8 arrays. Output: ``Features`` of shape
    (num_frames * n_patches, d_vision), frames in time order.
    """

    # Shares the image tower's checkpoint: one vision model serves both modalities.
    component = "image_encoder"
    modality = "video"

    config: VideoEncoderConfig

    def check(self, video: np.ndarray) -> None:
        to_video_array(video)

    def __call__(self, videos: list[np.ndarray]) -> list[Features]:
        k = self.config.num_frames
        frames = []
        for video in videos:
            video = to_video_array(video)
            frames.extend(video[sample_frame_indices(len(video), k)])
        # One forward pass for every frame of every video in the batch.
        features = self.encode_frames(frames).float().cpu().numpy()
        per_video = features.reshape(len(videos), k * features.shape[1], features.shape[2])
        return [Features(modality="video", features=f) for f in per_video]
