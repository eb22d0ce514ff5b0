"""The five stages chained in one process.

This is the monolithic baseline the benchmarks compare the Serve app against, and what notebooks
use. The stages are the same classes the Serve deployments and Ray Data jobs run.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from omnistage.actors.errors import UnsupportedMediaError
from omnistage.actors.payloads import Embeddings, GeneratedMedia, GenerationRequest, LLMRequest, SignalGroup
from omnistage.actors.registry import create_stage
from omnistage.cluster.config import OmnistageConfig, load_config
from omnistage.pipelines.graph import Graph, ports
from omnistage.pipelines.messages import parse_messages


@dataclass
class ChatResult:
    """The answer to one chat: text, generated media (encoded files), and token usage."""

    text: str
    media: list[GeneratedMedia] = field(default_factory=list)
    finish_reason: str = "stop"
    usage: dict[str, int] = field(default_factory=dict)
    # A grounding model's (Kosmos-2's) phrases and their boxes in ``text``; None for the others.
    entities: list[dict[str, Any]] | None = None


class LocalPipeline:
    """Encoders -> input projector -> LLM -> output projector -> generators, in this process.

    >>> p = LocalPipeline.from_config("tiny")
    >>> r = p.chat([{"role": "user", "content": [{"type": "text", "text": "Draw a cat"}]}], modalities=["image"])
    >>> r.media[0].mime_type
    'image/png'
    """

    def __init__(self, config: OmnistageConfig, loaded: dict[str, Any] | None = None):
        """``loaded``: stages already loaded elsewhere in this process (by stage name), used as
        they are instead of loading them again."""
        self.config = config
        graph = Graph.of(config)
        loaded = loaded or {}
        stages = {
            name: loaded.get(name) or create_stage(name, getattr(config.stages, name), config.cache) for name in graph.stages
        }
        # Each stage's output must fit the next stage's input: fail at load, naming both sides.
        graph.check({name: ports(name, stage) for name, stage in stages.items()})
        self.encoders = {m: stages[f"{m}_encoder"] for m in graph.encoders}
        self.input_projector = stages.get("input_projector")
        self.llm = stages["llm"]
        self.output_projector = stages.get("output_projector")
        self.generators = {m: stages[f"{m}_generator"] for m in graph.generators}

    @classmethod
    def from_config(cls, name_or_path: str | Path = "shapes") -> LocalPipeline:
        """Load a shipped preset by name (``"shapes"``, ``"tiny"``) or a YAML config by path."""
        return cls(load_config(name_or_path))

    @classmethod
    def from_pretrained(cls, path: str | Path, name: str | None = None) -> LocalPipeline:
        """Serve a LLaVA, LLaVA-NeXT, BLIP-2, InstructBLIP, Qwen2-Audio, IDEFICS, Kosmos-2, Video-LLaVA,
        LLaVA-NeXT-Video, InstructBLIP-Video or LLaVA-OneVision checkpoint directory, split into encoder
        (image and video for Video-LLaVA, LLaVA-NeXT-Video and LLaVA-OneVision, video alone for
        InstructBLIP-Video), projector and LLM stages."""
        from omnistage.actors.multimodal import pretrained_config

        return cls(pretrained_config(path, name))

    def chat(
        self,
        messages: list[dict[str, Any]],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: list[str] | None = None,
        modalities: list[str] | None = None,
    ) -> ChatResult:
        """Answer one chat.

        ``messages`` are OpenAI chat messages; see ``omnistage.pipelines.messages`` for the media
        forms accepted. ``modalities`` (e.g. ``["text", "image"]``) makes the answer include those
        media: their signal tokens are forced if the model does not emit them. Sampling fields
        left unset take the LLM config's ``defaults``, as over HTTP.
        """
        # 1-3. Check inputs, encode each medium, project into the LLM's embedding space
        request = self.llm_request(
            messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop, modalities=modalities
        )
        # 4. Generate text and signal tokens
        result = self.llm([request])[0]
        # 5. Signal states -> conditioning -> media
        media = self.generate_media(result.signals, seed)
        return ChatResult(
            text=result.text,
            media=media,
            finish_reason=result.finish_reason,
            entities=result.entities,
            usage={
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens,
            },
        )

    def llm_request(
        self,
        messages: list[dict[str, Any]],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: list[str] | None = None,
        modalities: list[str] | None = None,
    ) -> LLMRequest:
        """Steps 1-3 of :meth:`chat`: the LLM's request, with every medium encoded and projected.
        For callers that drive the LLM themselves (a stream, an engine shared by requests)."""
        # 1. Check inputs (media files are decoded by their encoders)
        wanted = [m for m in (modalities or []) if m != "text"]
        unknown = [m for m in wanted if m not in self.generators]
        if unknown:
            raise UnsupportedMediaError(
                f"expected output modalities among {['text', *self.generators]}, got {unknown}"
            )
        chat = parse_messages(messages, accepted=list(self.encoders), limits=self.config.server.limits)

        # 2. Decode and encode each medium, one batched call per modality
        features: list = [None] * len(chat.media)
        for modality, encoder in self.encoders.items():
            indices = [i for i, (m, _) in enumerate(chat.media) if m == modality]
            if indices:
                for i, f in zip(indices, encoder([chat.media[i][1] for i in indices])):
                    features[i] = f

        # 3. Project into the LLM's embedding space, each medium's features with its question's
        #    text (which InstructBLIP's projector reads)
        features = [replace(f, instruction=text) for f, text in zip(features, chat.instructions)]
        embeddings: list[Embeddings] = self.input_projector(features) if features else []
        return LLMRequest(
            messages=chat.messages,
            media=embeddings,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=list(stop or []),
            force_modalities=wanted,
        )

    def generate_media(self, signals: list[SignalGroup], seed: int | None = None) -> list[GeneratedMedia]:
        """Step 5 of :meth:`chat`: each signal group the LLM emitted -> output projector -> its
        generator; the i-th medium is seeded ``seed + i``."""
        signals = [s for s in signals if s.modality in self.generators]
        conditioning = self.output_projector(signals) if signals else []
        media: list = [None] * len(conditioning)
        for modality, generator in self.generators.items():
            indices = [i for i, c in enumerate(conditioning) if c.modality == modality]
            if indices:
                requests = [
                    GenerationRequest(conditioning=conditioning[i], seed=None if seed is None else seed + i)
                    for i in indices
                ]
                for i, item in zip(indices, generator(requests)):
                    media[i] = item
        return media
