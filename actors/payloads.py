"""Typed payloads that cross stage boundaries.

They hold numpy arrays only (no torch tensors): numpy arrays are read zero-copy from Ray's object
store on the same node, while tensors would be pickled. Shapes are given in each docstring.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Modality = Literal["image", "video", "audio"]
MODALITIES: tuple[Modality, ...] = ("image", "video", "audio")

# Signal tokens per output modality, as in NExT-GPT: [IMG0..3], [VID0..23], [AUD0..7].
NEXTGPT_SIGNAL_TOKENS: dict[Modality, int] = {"image": 4, "video": 24, "audio": 8}
SIGNAL_PREFIX: dict[Modality, str] = {"image": "IMG", "video": "VID", "audio": "AUD"}
PLACEHOLDERS: dict[Modality, str] = {"image": "<image>", "video": "<video>", "audio": "<audio>"}


def signal_token_names(modality: Modality, count: int) -> list[str]:
    return [f"[{SIGNAL_PREFIX[modality]}{i}]" for i in range(count)]


@dataclass
class AudioClip:
    """Decoded audio.

    Dimensions:
        samples: (n_samples,) mono or (n_samples, n_channels), float32 in [-1, 1]
    """

    samples: np.ndarray
    sampling_rate: int


@dataclass(frozen=True)
class DecodeLimits:
    """What decoding one request's media may cost (the server's ``limits``), checked from headers
    before pixels or samples are decoded."""

    max_image_pixels: int = 16_777_216
    image_formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
    max_audio_seconds: float = 600.0
    max_video_frames: int = 3600
    max_video_frame_pixels: int = 4_194_304


@dataclass
class EncodedMedia:
    """A media file as the request sent it. The HTTP ingress reads only its header; the modality's
    encoder pool decodes it (of a video, only the frames it samples), within ``limits``."""

    modality: Modality
    data: bytes = field(repr=False)  # request bytes never reach a log line
    limits: DecodeLimits = field(default_factory=DecodeLimits)


@dataclass
class Features:
    """One media item's encoder output (F_X in the survey's notation).

    ``instruction`` is the text the medium came with (its message's text), for input projectors
    that read it (InstructBLIP's Q-Former). Encoders leave it None; whoever routes the features to
    the input projector sets it (``LocalPipeline``, the HTTP ingress's call to the projector pool,
    the caption job's ``instruction`` column).

    ``image_size`` is the image's original (height, width), for input projectors whose packing
    depends on it (LLaVA-NeXT's: the tiles' padding it cuts away). The image encoder sets it where
    it tiles the image; None otherwise.

    Dimensions:
        features: (n_tokens, d_encoder) float32; for a tiled image, every view's tokens in turn
    """

    modality: Modality
    features: np.ndarray
    instruction: str | None = None
    image_size: tuple[int, int] | None = None


# How the LLM reads a medium's projected embeddings: spliced into the prompt as tokens (LLaVA,
# BLIP-2: its placeholder expanded to one position per embedding), or through the language model's
# cross-attention layers (Flamingo, IDEFICS: the prompt keeps the checkpoint's own media token, and
# the embeddings travel beside it). The checkpoint decides, never the request: the input projector
# sets it from its head, and the LLM stage refuses embeddings meant for the other way.
Fusion = Literal["splice", "cross_attention"]


@dataclass
class Embeddings:
    """One media item projected into the LLM's embedding space (P_X), or, for ``fusion``
    ``"cross_attention"``, into what the LLM's cross-attention layers read.

    Dimensions:
        embeds: (n_tokens, d_llm) float32; for cross-attention (n_tokens, d_cross), IDEFICS's
            (n_latents, d_vision) resampled image
    """

    modality: Modality
    embeds: np.ndarray
    fusion: Fusion = "splice"


@dataclass
class LLMRequest:
    """A chat for the LLM. A message's content is a list of typed parts (``{"type": "text",
    "text": ...}``, ``{"type": "image"}``, ``"video"``, ``"audio"``), or text in which placeholders
    (``<image>``, ``<video>``, ``<audio>``) stand for the media parts. The k-th media part of a
    modality stands for the k-th item of that modality in ``media``.

    Dimensions:
        media[i].embeds: (n_tokens_i, d_llm) float32
    """

    messages: list[dict[str, Any]]
    media: list[Embeddings] = field(default_factory=list)
    # None: the LLM's configured default (``llm.defaults``), filled in by the LLM stage.
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    # Output modalities whose signal-token group is appended if the model does not emit it.
    force_modalities: list[Modality] = field(default_factory=list)


@dataclass
class SignalGroup:
    """The hidden states behind one emitted signal-token group (``[IMG0]..[IMG3]`` and so on).

    Row k is the last layer's hidden state at the position that predicted signal token k, plus
    that token's input embedding (as in GILL and NExT-GPT).

    Dimensions:
        hidden: (n_signal_tokens, d_llm) float32
    """

    modality: Modality
    hidden: np.ndarray


@dataclass
class LLMResult:
    """The LLM's answer: text with signal tokens removed, and one entry per emitted group."""

    text: str
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    # Every generated token, signal tokens included, in order.
    token_ids: list[int] = field(default_factory=list)
    signals: list[SignalGroup] = field(default_factory=list)
    # A grounding model's (Kosmos-2's) phrases and their boxes, which ``text`` is left without:
    # [{"text", "span": [start, end] in ``text``, "boxes": [[x0, y0, x1, y1], ...] normalised to 0..1}].
    # None for models that do not ground.
    entities: list[dict[str, Any]] | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class Conditioning:
    """A generator's conditioning (H_X), in the space of its own text encoder.

    ``generated_embeds`` is a second conditioning, for generators that take two: AudioLDM 2's
    ``generated_prompt_embeds`` (the sequence its GPT-2 language model generates), next to
    ``embeds`` as its Flan-T5 ``prompt_embeds``. None for generators that take one.

    Dimensions:
        embeds: (seq_len, d_cond) float32; seq_len is 1 for pooled conditioning (AudioLDM)
        generated_embeds: (n_generated, d_generated) float32, or None
    """

    modality: Modality
    embeds: np.ndarray
    generated_embeds: np.ndarray | None = None


@dataclass
class GenerationRequest:
    conditioning: Conditioning
    seed: int | None = None


@dataclass
class GeneratedMedia:
    """An encoded media file plus the raw array it was made from (None where only the file is
    sent on, as from a generator pool to the HTTP ingress).

    Dimensions:
        array: image (height, width, 3) uint8; video (n_frames, height, width, 3) uint8;
            audio (n_samples,) float32
    """

    modality: Modality
    mime_type: str
    data: bytes
    array: np.ndarray | None
    # Frames per second for video, samples per second for audio; None for images.
    rate: float | None = None
