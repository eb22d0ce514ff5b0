"""Video encoder stage: sample frames uniformly, encode each as an image, concatenate."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from omnistage.actors.image_encoder import ImageEncoder
from omnistage.actors.media import decode, sample_frame_indices, to_video_array
from omnistage.actors.payloads import EncodedMedia, Features

if TYPE_CHECKING:
    # Configs are only annotations here: the config package imports this one's payloads.
    from omnistage.cluster.config import VideoEncoderConfig


class VideoEncoder(ImageEncoder):
    """Videos to feature sequences through the image tower.

    Input: videos as files (``EncodedMedia``, of which only the sampled frames are decoded) or
    (n_frames, height, width, 3) uint8 arrays. Output: ``Features`` of shape
    (num_frames * n_patches, d_vision), frames in time order.
    """

    # Shares the image tower's checkpoint: one vision model serves both modalities.
    component = "image_encoder"
    modality = "video"

    config: VideoEncoderConfig

    def prepare(self, video: EncodedMedia | np.ndarray) -> np.ndarray:
        if isinstance(video, EncodedMedia):
            return decode(video, video_frames=self.config.num_frames)
        return to_video_array(video)

    def __call__(self, videos: list[EncodedMedia | np.ndarray]) -> list[Features]:
        k = self.config.num_frames
        frames = []
        for video in videos:
            video = self.prepare(video)
            frames.extend(video[sample_frame_indices(len(video), k)])
        # One forward pass for every frame of every video in the batch.
        features = self.encode_frames(frames).float().cpu().numpy()
        per_video = features.reshape(len(videos), k * features.shape[1], features.shape[2])
        return [Features(modality="video", features=f) for f in per_video]
