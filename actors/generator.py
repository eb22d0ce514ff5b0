"""Generator stages (the fifth stage): diffusion pipelines turn conditioning (H_X) into media.

Each stage drives a diffusers pipeline with ``prompt_embeds`` from the output projector (and, for
AudioLDM 2, ``generated_prompt_embeds``), so a checkpoint needs no text encoder. The pipeline class
comes from the checkpoint's ``model_index.json``: the tiny presets (``omnistage.actors.tiny``) load the same way as
Stable Diffusion, Zeroscope, AudioLDM or AudioLDM 2 checkpoints.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from diffusers import AudioLDM2Pipeline, AudioLDMPipeline, DiffusionPipeline
from diffusers.utils import logging as diffusers_logging

# The shapes preset's UNets (position-aware subclasses) are named by its model_index.json files;
# diffusers loads classes only from modules already imported, never imports one itself.
from omnistage.actors import unets  # noqa: F401
from omnistage.actors.base import Stage
from omnistage.actors.errors import InvalidInputError
from omnistage.actors.media import MIME_TYPES, encode_png, encode_video, encode_wav
from omnistage.actors.payloads import GeneratedMedia, GenerationRequest, Modality

if TYPE_CHECKING:
    from omnistage.cluster.config import (
        AudioGeneratorConfig,
        GeneratorConfig,
        ImageGeneratorConfig,
        VideoGeneratorConfig,
    )

# Components that classifier-free guidance runs to embed the empty negative prompt, in the pipelines
# served here (the second text encoder, projection and language model are AudioLDM 2's).
GUIDANCE_COMPONENTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "projection_model", "language_model")


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Float pixels in [0, 1] (diffusers' ``output_type="np"``) -> uint8, rounded."""
    return (pixels * 255).round().astype(np.uint8)


def _expected(shape: tuple[int | None, int]) -> str:
    seq_len, width = shape
    return f"({'seq_len' if seq_len is None else seq_len}, {width})"


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape} and dtype {value.dtype}"
    return f"a {type(value).__name__}"


class _Generator(Stage):
    """Loads a diffusers pipeline and runs one pipeline call per batch of requests.

    Subclasses give the pipeline arguments for their modality (``_pipeline_inputs``) and turn
    the pipeline's output into encoded media (``_to_media``).
    """

    modality: ClassVar[Modality]
    config: GeneratorConfig

    def __init__(self, config: GeneratorConfig):
        super().__init__(config)
        diffusers_logging.disable_progress_bar()  # one bar per component would flood server logs
        index = DiffusionPipeline.load_config(self.checkpoint)
        # Components saved as null must be passed as None: diffusers refuses to load a pipeline
        # missing a component that is not in its _optional_components (text_encoder, tokenizer).
        absent = {name: None for name, value in index.items() if isinstance(value, list) and value[0] is None}
        missing = [name for name in GUIDANCE_COMPONENTS if name in absent]
        if config.guidance_scale > 1 and missing:
            raise ValueError(
                f"guidance_scale={config.guidance_scale} turns on classifier-free guidance, which needs the "
                f"text encoder and tokenizer to embed the empty negative prompt, but checkpoint "
                f"{str(self.checkpoint)!r} has no {', '.join(missing)}; set guidance_scale to 1 or use a "
                f"checkpoint with a text encoder"
            )
        self.pipeline = DiffusionPipeline.from_pretrained(self.checkpoint, dtype=self.dtype, **absent).to(self.device)
        self.pipeline.set_progress_bar_config(disable=True)

    @property
    def conditioning_shape(self) -> tuple[int | None, int]:
        """(seq_len, width) of one request's conditioning; seq_len None accepts any length.

        Cross-attention takes any number of tokens, except under classifier-free guidance: the
        negative prompt is padded to the tokenizer's length and concatenated with the conditioning.
        """
        seq_len = self.pipeline.tokenizer.model_max_length if self.config.guidance_scale > 1 else None
        return seq_len, self.pipeline.unet.config.cross_attention_dim

    @property
    def generated_shape(self) -> tuple[int | None, int] | None:
        """(seq_len, width) of one request's ``generated_embeds``; None where the pipeline takes one
        conditioning (every pipeline but AudioLDM 2)."""
        return None

    def check(self, request: GenerationRequest) -> None:
        """Raise ``InvalidInputError`` unless the conditioning is a finite (seq_len, width) float array,
        and ``generated_embeds`` is one too where the pipeline takes it, else None."""
        self._check_array("conditioning", request.conditioning.embeds, self.conditioning_shape)
        generated, shape = request.conditioning.generated_embeds, self.generated_shape
        pipeline = type(self.pipeline).__name__
        if shape is None and generated is not None:
            raise InvalidInputError(
                f"expected {self.modality} conditioning without generated_embeds ({pipeline} takes one conditioning), "
                f"got generated_embeds as {_describe(generated)}"
            )
        if shape is not None:
            if generated is None:
                raise InvalidInputError(
                    f"expected {self.modality} generated conditioning (generated_embeds) of shape {_expected(shape)} "
                    f"for {pipeline}, got None"
                )
            self._check_array("generated conditioning", generated, shape)

    def _check_array(self, label: str, array: Any, shape: tuple[int | None, int]) -> None:
        seq_len, width = shape
        expected = _expected(shape)
        if not (isinstance(array, np.ndarray) and array.ndim == 2 and np.issubdtype(array.dtype, np.floating)):
            raise InvalidInputError(
                f"expected {self.modality} {label} as a 2-D float array of shape {expected}, got {_describe(array)}"
            )
        wrong_len = array.shape[0] == 0 or (seq_len is not None and array.shape[0] != seq_len)
        if array.shape[1] != width or wrong_len:
            raise InvalidInputError(f"expected {self.modality} {label} of shape {expected}, got shape {array.shape}")
        if not np.isfinite(array).all():
            raise InvalidInputError(
                f"expected finite {self.modality} {label}, got {np.count_nonzero(~np.isfinite(array))} non-finite values"
            )

    def _stack(self, requests: list[GenerationRequest], field: str, label: str) -> torch.Tensor:
        """One checked (seq_len, width) array per request -> (batch, seq_len, width) on the device."""
        arrays = [getattr(request.conditioning, field) for request in requests]
        shapes = [array.shape for array in arrays]
        if len(set(shapes)) > 1:
            raise InvalidInputError(f"expected {self.modality} {label} of one shape across a batch, got shapes {shapes}")
        return torch.from_numpy(np.stack(arrays)).to(device=self.device, dtype=self.dtype)

    @staticmethod
    def _generator(seed: int | None) -> torch.Generator:
        # On the CPU so that a seed gives the same initial noise on any device: diffusers draws
        # the noise with the generator's device and moves it.
        generator = torch.Generator(device="cpu")
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        return generator

    def __call__(self, requests: list[GenerationRequest]) -> list[GeneratedMedia]:
        """One media item per request, in order; all requests go through one pipeline call."""
        if not requests:
            return []
        for request in requests:
            self.check(request)
        embeds = self._stack(requests, "embeds", "conditioning")
        generated = (
            None if self.generated_shape is None else self._stack(requests, "generated_embeds", "generated conditioning")
        )
        with torch.inference_mode():
            output = self.pipeline(
                generator=[self._generator(request.seed) for request in requests],
                num_inference_steps=self.config.num_inference_steps,
                guidance_scale=self.config.guidance_scale,
                output_type="np",
                **self._pipeline_inputs(embeds, generated),
            )
        return self._to_media(output)

    def _pipeline_inputs(self, embeds: torch.Tensor, generated: torch.Tensor | None) -> dict[str, Any]:
        """Modality-specific pipeline arguments, given conditioning of shape (batch, seq_len, width) and,
        where ``generated_shape`` is not None, generated conditioning of shape (batch, seq_len, width)."""
        raise NotImplementedError

    def _to_media(self, output: Any) -> list[GeneratedMedia]:
        """Encode each item of the pipeline's output."""
        raise NotImplementedError


class ImageGenerator(_Generator):
    """Stable Diffusion style text-to-image pipeline, driven by conditioning instead of text.

    Input: ``GenerationRequest`` with conditioning (seq_len, cross_attention_dim). Output: PNG,
    array (height, width, 3) uint8; None height/width give the UNet's native size.
    """

    component = "image_generator"
    modality = "image"
    config: ImageGeneratorConfig

    def _pipeline_inputs(self, embeds: torch.Tensor, generated: torch.Tensor | None) -> dict[str, Any]:
        return {"prompt_embeds": embeds, "height": self.config.height, "width": self.config.width}

    def _to_media(self, output: Any) -> list[GeneratedMedia]:
        # output.images: (batch, height, width, 3) float in [0, 1]
        images = _to_uint8(output.images)
        return [
            GeneratedMedia(modality="image", mime_type=MIME_TYPES["png"], data=encode_png(image), array=image)
            for image in images
        ]


class VideoGenerator(_Generator):
    """Zeroscope (TextToVideoSD) style text-to-video pipeline, driven by conditioning.

    Input: ``GenerationRequest`` with conditioning (seq_len, cross_attention_dim). Output: MP4 or
    GIF per ``config.format``, array (num_frames, height, width, 3) uint8 at ``config.fps``.
    """

    component = "video_generator"
    modality = "video"
    config: VideoGeneratorConfig

    def _pipeline_inputs(self, embeds: torch.Tensor, generated: torch.Tensor | None) -> dict[str, Any]:
        return {
            "prompt_embeds": embeds,
            "height": self.config.height,
            "width": self.config.width,
            "num_frames": self.config.num_frames,
        }

    def _to_media(self, output: Any) -> list[GeneratedMedia]:
        # output.frames: (batch, num_frames, height, width, 3) float in [0, 1]
        videos = _to_uint8(output.frames)
        fmt = self.config.format
        return [
            GeneratedMedia(
                modality="video",
                mime_type=MIME_TYPES[fmt],
                data=encode_video(frames, self.config.fps, fmt),
                array=frames,
                rate=self.config.fps,
            )
            for frames in videos
        ]


def _audioldm2_widths(cross_attention_dim: Any) -> tuple[int, int]:
    """(prompt_embeds width, generated_prompt_embeds width) of an AudioLDM 2 UNet.

    Each block lists up to four cross-attention widths (an int is one entry, None is self-attention
    only). The UNet feeds entries 0 and 1 ``encoder_hidden_states`` (the pipeline's
    ``generated_prompt_embeds``, GPT-2's width) and later entries ``encoder_hidden_states_1`` (its
    ``prompt_embeds``, Flan-T5's width): ``[None, 768, 1024]`` per block is self-attention only,
    then GPT-2 base, then Flan-T5-large.
    """
    blocks = cross_attention_dim if isinstance(cross_attention_dim, (list, tuple)) else [cross_attention_dim]
    entries = [block if isinstance(block, (list, tuple)) else [block] for block in blocks]
    generated = {width for block in entries for width in block[:2] if width is not None}
    prompt = {width for block in entries for width in block[2:] if width is not None}
    if len(generated) != 1 or len(prompt) != 1:
        raise ValueError(
            f"expected an AudioLDM 2 UNet with one generated_prompt_embeds width (cross-attention entries 0-1) and "
            f"one prompt_embeds width (entries 2-3) in every block, got cross_attention_dim {cross_attention_dim}"
        )
    return prompt.pop(), generated.pop()


class AudioGenerator(_Generator):
    """AudioLDM or AudioLDM 2 text-to-audio pipeline, driven by conditioning; which one comes from
    the checkpoint's ``model_index.json``.

    Input: ``GenerationRequest`` whose conditioning is, for AudioLDM, one pooled CLAP embedding
    (1, projection_class_embeddings_input_dim); for AudioLDM 2, ``embeds`` (seq_len, Flan-T5 width)
    as ``prompt_embeds`` and ``generated_embeds`` (seq_len, GPT-2 width) as
    ``generated_prompt_embeds``. Output: WAV, array (n_samples,) float32 at the vocoder's rate.

    Both make ``int(audio_length_s / hop_s)`` mel frames (hop: the vocoder's upsampling, 64
    samples in the tiny preset), rounded up to a multiple of the VAE's scale factor, and cut the
    waveform to ``int(audio_length_s * rate)`` samples: 16000 for one second of the tiny preset.
    The float quotient can fall just below a whole number and lose a frame: 0.7 s gives 174
    frames, so 11136 samples instead of 11200.
    """

    component = "audio_generator"
    modality = "audio"
    config: AudioGeneratorConfig

    def __init__(self, config: AudioGeneratorConfig):
        super().__init__(config)
        if not isinstance(self.pipeline, (AudioLDMPipeline, AudioLDM2Pipeline)):
            raise ValueError(
                f"expected an AudioLDMPipeline or AudioLDM2Pipeline checkpoint for the audio generator, got "
                f"{type(self.pipeline).__name__} in {str(self.checkpoint)!r}"
            )
        self.two_conditionings = isinstance(self.pipeline, AudioLDM2Pipeline)
        if self.two_conditionings:
            self.prompt_width, self.generated_width = _audioldm2_widths(self.pipeline.unet.config.cross_attention_dim)
            # Given both conditionings, AudioLDM2Pipeline still reads text_encoder_2.dtype (to cast
            # prompt_embeds), text_encoder_2.config.model_type (a VITS encoder would need a
            # transcription) and language_model.dtype (to cast generated_prompt_embeds); it runs neither.
            if self.pipeline.text_encoder_2 is None:
                self.pipeline.text_encoder_2 = SimpleNamespace(dtype=self.dtype, config=SimpleNamespace(model_type=None))
            if self.pipeline.language_model is None:
                self.pipeline.language_model = SimpleNamespace(dtype=self.dtype)
        elif self.pipeline.text_encoder is None:
            # AudioLDMPipeline._encode_prompt casts given prompt_embeds to text_encoder.dtype
            # even without a text encoder (AttributeError on None); dtype is all it reads.
            self.pipeline.text_encoder = SimpleNamespace(dtype=self.dtype)

    @property
    def conditioning_shape(self) -> tuple[int | None, int]:
        """AudioLDM: (1, width), its UNet takes one pooled CLAP embedding as its class label.
        AudioLDM 2: (any, Flan-T5 width); under guidance the negative prompt is padded to the
        conditioning's own length, so any length still fits."""
        if self.two_conditionings:
            return None, self.prompt_width
        return 1, self.pipeline.unet.config.projection_class_embeddings_input_dim

    @property
    def generated_shape(self) -> tuple[int | None, int] | None:
        """AudioLDM 2: (any, GPT-2 width); under guidance the negative side is GPT-2's own
        generation of ``max_new_tokens`` states, concatenated with these, so that many."""
        if not self.two_conditionings:
            return None
        seq_len = self.pipeline.language_model.config.max_new_tokens if self.config.guidance_scale > 1 else None
        return seq_len, self.generated_width

    def _pipeline_inputs(self, embeds: torch.Tensor, generated: torch.Tensor | None) -> dict[str, Any]:
        if self.two_conditionings:
            return {
                "prompt_embeds": embeds,
                "generated_prompt_embeds": generated,
                "audio_length_in_s": self.config.audio_length_s,
            }
        return {"prompt_embeds": embeds[:, 0], "audio_length_in_s": self.config.audio_length_s}

    def _to_media(self, output: Any) -> list[GeneratedMedia]:
        # output.audios: (batch, n_samples) float32
        rate = self.pipeline.vocoder.config.sampling_rate
        return [
            GeneratedMedia(
                modality="audio", mime_type=MIME_TYPES["wav"], data=encode_wav(audio, rate), array=audio, rate=rate
            )
            for audio in output.audios
        ]
