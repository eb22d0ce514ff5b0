"""Audio encoder stage: 16 kHz mono log-mel features through a Whisper-style encoder."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import numpy as np
import torch

from omnistage.actors.base import Stage
from omnistage.actors.media import decode, to_audio_clip, to_mono_16k
from omnistage.actors.multimodal import audio_part, checkpoint_model_type
from omnistage.actors.payloads import AudioClip, EncodedMedia, Features

if TYPE_CHECKING:
    # Configs are only annotations here: the config package imports this one's payloads.
    from omnistage.cluster.config import AudioEncoderConfig


class AudioEncoder(Stage):
    """Audio clips to feature sequences.

    Input: ``AudioClip`` (any rate, mono or multi-channel); it is down-mixed and resampled to the
    feature extractor's rate, then padded or cut to its window (30 s for Whisper, 1 s for ``tiny``).
    Output: ``Features`` of shape (n_positions, d_audio); for Qwen2-Audio, (n_audio_tokens, d_audio)
    with n_audio_tokens from the clip's length (750 for a full 30 s window).
    """

    component = "audio_encoder"
    modality = "audio"

    def __init__(self, config: AudioEncoderConfig):
        super().__init__(config)
        from transformers import AutoFeatureExtractor, AutoModel

        self.feature_extractor = AutoFeatureExtractor.from_pretrained(self.checkpoint)
        # Qwen2-Audio: its audio tower alone, read as Qwen2AudioModel reads it (see _encode_masked).
        self.masked = checkpoint_model_type(self.checkpoint) == "qwen2_audio"
        if self.masked:
            # -1, the last, is the tower's output, pooled and normed: what its projector reads.
            if config.feature_layer != -1:
                raise ValueError(
                    f"expected feature_layer -1 for the Qwen2-Audio checkpoint {str(self.checkpoint)!r} (its projector "
                    f"reads the tower's pooled last_hidden_state), got {config.feature_layer}"
                )
            model = audio_part(self.checkpoint, self.dtype)
            self._check_window(model)
        else:
            # The class comes from the checkpoint's model_type (Whisper, HuBERT, CLAP, ...).
            model = AutoModel.from_pretrained(self.checkpoint, dtype=self.dtype)
            # Encoder-decoder checkpoints (Whisper) carry a text decoder this stage does not need;
            # a full CLAP checkpoint also holds a text tower.
            if model.config.is_encoder_decoder:
                model = model.get_encoder()
            model = getattr(model, "audio_model", model)
        self.model = model.to(self.device).eval()
        self.sampling_rate = self.feature_extractor.sampling_rate
        self.feature_dim: int = self.model.config.hidden_size
        self.input_name: str = self.model.main_input_name
        self._accepted = set(inspect.signature(self.model.forward).parameters)
        # Raw-waveform models (HuBERT, wav2vec 2.0) take each clip at its own length: padding a
        # batch would change their outputs. Spectrogram models take a fixed window, batched.
        self.per_clip = self.input_name == "input_values"

    def check(self, clip: EncodedMedia | AudioClip) -> None:
        self.prepare(clip)

    def prepare(self, clip: EncodedMedia | AudioClip) -> AudioClip:
        return decode(clip) if isinstance(clip, EncodedMedia) else to_audio_clip(clip)

    @torch.inference_mode()
    def __call__(self, clips: list[EncodedMedia | AudioClip]) -> list[Features]:
        waves = [to_mono_16k(self.prepare(clip), self.sampling_rate) for clip in clips]
        batches = [[w] for w in waves] if self.per_clip else [waves]
        features = [f for batch in batches for f in self._encode(batch)]
        return [Features(modality="audio", features=np.ascontiguousarray(f)) for f in features]

    def _check_window(self, model) -> None:
        """Qwen2-Audio's tower takes exactly ``2 * max_source_positions`` mel frames: the extractor's window must be that."""
        frames = 2 * model.config.max_source_positions
        if self.feature_extractor.nb_max_frames != frames:
            raise ValueError(
                f"expected the feature extractor in {str(self.checkpoint)!r} to give windows of {frames} mel frames "
                f"(2 * the audio tower's max_source_positions), got {self.feature_extractor.nb_max_frames}"
            )

    def _encode(self, waves: list[np.ndarray]) -> list[np.ndarray]:
        if self.masked:
            return self._encode_masked(waves)
        inputs = self.feature_extractor(waves, sampling_rate=self.sampling_rate, return_tensors="pt")
        kwargs = {
            k: v.to(self.device, self.dtype if v.is_floating_point() else v.dtype)
            for k, v in inputs.items()
            if k in self._accepted and k != "attention_mask"
        }
        out = self.model(**kwargs, output_hidden_states=True)
        hidden = out.hidden_states[self.config.feature_layer]
        if hidden.ndim == 4:  # CLAP's HTSAT keeps a (B, C, H, W) feature map: one token per cell
            hidden = hidden.flatten(2).transpose(1, 2)
        return hidden.float().cpu().numpy()

    def _encode_masked(self, waves: list[np.ndarray]) -> list[np.ndarray]:
        """Qwen2-Audio, as ``Qwen2AudioModel`` runs its tower: each clip padded to the window, the
        padding masked out of attention, and of the pooled output only the clip's own tokens kept,
        as many as the model's processor writes audio tokens for it."""
        from transformers.masking_utils import create_bidirectional_mask

        inputs = self.feature_extractor(waves, sampling_rate=self.sampling_rate, padding="max_length", return_attention_mask=True, return_tensors="pt")
        conv_lengths, lengths = self.model._get_feat_extract_output_lengths(inputs["attention_mask"].sum(-1))
        features = inputs["input_features"].to(self.device, self.dtype)
        positions = self.model.config.max_source_positions
        valid = (torch.arange(positions)[None, :] < conv_lengths[:, None]).long().to(self.device)
        mask = create_bidirectional_mask(
            config=self.model.config,
            inputs_embeds=torch.zeros(len(waves), positions, 1, dtype=self.dtype, device=self.device),
            attention_mask=valid,
        )
        hidden = self.model(features, attention_mask=mask).last_hidden_state.float().cpu().numpy()
        return [h[:n] for h, n in zip(hidden, lengths.tolist())]
