"""The five stages chained in one process.

This is the monolithic baseline the benchmarks compare the Serve app against, and what notebooks
use. The stages are the same classes the Serve deployments and Ray Data jobs run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omnistage.actors.errors import UnsupportedMediaError
from omnistage.actors.payloads import Embeddings, GeneratedMedia, GenerationRequest, LLMRequest
from omnistage.actors.registry import create_stage
from omnistage.cluster.config import OmnistageConfig, load_config
from omnistage.pipelines.messages import parse_messages

@dataclass
class ChatResult:
    """The answer to one chat: text, generated media (encoded files), and token usage."""

    text: str
    media: list[GeneratedMedia] = field(default_factory=list)
    finish_reason: str = "stop"
    usage: dict[str, int] = field(default_factory=dict)


def _shape(shape: tuple[int | None, int]) -> str:
    length, width = shape
    return f"({length if length is not None else 'any'}, {width})"


def _check_fits(producer: str, produced: tuple[int, int], consumer: str, expected: tuple[int | None, int]) -> None:
    """Raise ``ValueError`` naming both shapes unless ``produced`` fits ``expected`` (None: any length)."""
    length, width = expected
    if produced[1] != width or (length is not None and produced[0] != length):
        raise ValueError(f"{producer} of shape {produced}, but {consumer} {_shape(expected)}")


class LocalPipeline:
    """Encoders -> input projector -> LLM -> output projector -> generators, in this process.

    >>> p = LocalPipeline.from_config("tiny")
    >>> r = p.chat([{"role": "user", "content": [{"type": "text", "text": "Draw a cat"}]}], modalities=["image"])
    >>> r.media[0].mime_type
    'image/png'
    """

    def __init__(self, config: OmnistageConfig):
        stages = config.stages
        self.config = config
        self.encoders = {
            m: create_stage(f"{m}_encoder", getattr(stages, f"{m}_encoder"), config.cache) for m in stages.input_modalities()
        }
        self.input_projector = create_stage("input_projector", stages.input_projector) if stages.input_projector else None
        self.llm = create_stage("llm", stages.llm)
        self.output_projector = create_stage("output_projector", stages.output_projector) if stages.output_projector else None
        self.generators = {
            m: create_stage(f"{m}_generator", getattr(stages, f"{m}_generator")) for m in stages.output_modalities()
        }
        self._check_compatible()

    @classmethod
    def from_config(cls, name_or_path: str | Path = "shapes") -> LocalPipeline:
        """Load a shipped preset by name (``"shapes"``, ``"tiny"``) or a YAML config by path."""
        return cls(load_config(name_or_path))

    @classmethod
    def from_pretrained(cls, path: str | Path, name: str | None = None) -> LocalPipeline:
        """Serve a LLaVA or BLIP-2 checkpoint directory, split into encoder, projector and LLM stages."""
        from omnistage.actors.multimodal import pretrained_config

        return cls(pretrained_config(path, name))

    def _check_compatible(self) -> None:
        """Each stage's output must fit the next stage's input; fail at load, naming both sides."""
        for modality, encoder in self.encoders.items():
            if modality not in self.input_projector.modalities:
                raise ValueError(f"the input projector has heads for {self.input_projector.modalities}, not {modality!r}")
            head = self.input_projector.head_spec(modality)
            if head["in_dim"] != encoder.feature_dim:
                raise ValueError(
                    f"the {modality} encoder gives features of width {encoder.feature_dim}, "
                    f"but the input projector's {modality} head expects {head['in_dim']}"
                )
            if head["out_dim"] != self.llm.hidden_size:
                raise ValueError(
                    f"the input projector's {modality} head outputs width {head['out_dim']}, "
                    f"but the LLM's embeddings have width {self.llm.hidden_size}"
                )
        for modality, generator in self.generators.items():
            if modality not in self.output_projector.modalities:
                raise ValueError(f"the output projector has heads for {self.output_projector.modalities}, not {modality!r}")
            head = self.output_projector.head_spec(modality)
            if head["in_dim"] != self.llm.hidden_size:
                raise ValueError(
                    f"the output projector's {modality} head reads width {head['in_dim']}, "
                    f"but the LLM's hidden states have width {self.llm.hidden_size}"
                )
            _check_fits(
                f"the output projector's {modality} head produces conditioning",
                self.output_projector.conditioning_shape(modality),
                f"the {modality} generator expects",
                generator.conditioning_shape,
            )
            # A second conditioning (AudioLDM 2's generated_prompt_embeds) must be made exactly
            # where the generator takes one.
            produced = self.output_projector.generated_shape(modality)
            expected = generator.generated_shape
            pipeline = type(generator.pipeline).__name__
            if produced is None and expected is not None:
                raise ValueError(
                    f"the output projector's {modality} head produces no generated conditioning, but the {modality} "
                    f"generator ({pipeline}) expects generated conditioning of shape {_shape(expected)}; give the head "
                    f"a 'generated' head spec"
                )
            if produced is not None and expected is None:
                raise ValueError(
                    f"the output projector's {modality} head produces generated conditioning of shape {produced}, "
                    f"but the {modality} generator ({pipeline}) takes none"
                )
            if produced is not None:
                _check_fits(
                    f"the output projector's {modality} head produces generated conditioning",
                    produced,
                    f"the {modality} generator expects",
                    expected,
                )

    def chat(
        self,
        messages: list[dict[str, Any]],
        *,
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        modalities: list[str] | None = None,
    ) -> ChatResult:
        """Answer one chat.

        ``messages`` are OpenAI chat messages; see ``omnistage.pipelines.messages`` for the media
        forms accepted. ``modalities`` (e.g. ``["text", "image"]``) makes the answer include those
        media: their signal tokens are forced if the model does not emit them.
        """
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

        # 3. Project into the LLM's embedding space
        embeddings: list[Embeddings] = self.input_projector(features) if features else []

        # 4. Generate text and signal tokens
        result = self.llm(
            [
                LLMRequest(
                    messages=chat.messages,
                    media=embeddings,
                    max_tokens=max_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    seed=seed,
                    stop=list(stop or []),
                    force_modalities=wanted,
                )
            ]
        )[0]

        # 5. Signal states -> conditioning -> media
        signals = [s for s in result.signals if s.modality in self.generators]
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
        return ChatResult(
            text=result.text,
            media=media,
            finish_reason=result.finish_reason,
            usage={
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens,
            },
        )

