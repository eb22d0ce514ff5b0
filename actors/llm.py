"""LLM backbone stage: a transformers causal LM reads text with projected media spliced in at
their placeholders and writes text plus signal tokens that ask for media.

Splicing follows LLaVA: each placeholder token is repeated once per media token, and the media
embeddings are scattered into those positions (``masked_scatter``). A checkpoint whose language
model reads media through cross-attention layers (IDEFICS) keeps one media token per item in the
prompt instead, and its embeddings go to those layers beside the prompt (``cross_attention_media``). Signal tokens follow NExT-GPT:
an output modality has a group (``[IMG0]..[IMG3]``); once the model emits the group's first token
the rest are forced, and the hidden states behind the group go to the output projector.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog
import torch

from omnistage.actors.base import Stage
from omnistage.actors.chat_template import ChatTemplate, checkpoint_chat_template, content_problem
from omnistage.actors.engine import Engine
from omnistage.actors.errors import InvalidInputError, UnsupportedMediaError
from omnistage.actors.multimodal import checkpoint_model_type, cross_attention, is_multimodal_checkpoint, language_part, media_token_ids
from omnistage.actors.payloads import (
    MODALITIES,
    PLACEHOLDERS,
    Embeddings,
    LLMRequest,
    LLMResult,
    signal_token_names,
)

if TYPE_CHECKING:
    # Configs are only annotations here: the config package imports this one's payloads.
    from omnistage.cluster.config import LLMConfig

log = structlog.get_logger(__name__)

ROLES = ("system", "user", "assistant")


class LLM(Stage):
    """Chats with media to text and signal groups.

    Input: ``LLMRequest`` (messages with placeholders, projected media, sampling settings).
    Output: ``LLMResult`` (text without signal tokens, and a ``SignalGroup`` of shape
    (n_signal_tokens, d_llm) per emitted group).

    ``engine`` schedules the decoding (continuous batching): the built-in ``Engine`` or, with
    ``engine.backend: vllm``, ``VLLMEngine``; servers submit to it directly, and ``__call__`` runs a
    list of requests through it to completion.

    ``max_tokens`` bounds the text; forced signal groups come after the text and are not counted
    against it (they are counted in ``completion_tokens``).
    """

    component = "llm"

    def __init__(self, config: LLMConfig):
        super().__init__(config)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.checkpoint)
        template = checkpoint_chat_template(self.checkpoint, self.tokenizer)
        # Kosmos-2 has none: its processor lays the prompt out (Kosmos2Prompt).
        if template is None and checkpoint_model_type(self.checkpoint) != "kosmos-2":
            raise ValueError(
                f"expected a chat template in {str(self.checkpoint)!r} (chat_template.json, chat_template.jinja, "
                "processor_config.json or tokenizer_config.json), found none; add one to its tokenizer_config.json"
            )
        self.chat_template = ChatTemplate(self.tokenizer, template)
        self.placeholders: dict[str, str] = dict(PLACEHOLDERS)
        # Set where the language model reads media through cross-attention layers (IDEFICS).
        self.cross_attention = None
        self.kosmos2 = None  # Kosmos-2's prompt layout and grounded answers
        # What a client is shown of a partial answer, where that is not the text so far.
        self.visible_text = None
        if is_multimodal_checkpoint(self.checkpoint):
            # LLaVA / BLIP-2 / Qwen2-Audio / IDEFICS: serve the language model; the media tokens are the checkpoint's own.
            self.model, model_config = language_part(self.checkpoint, self.dtype)
            self.cross_attention = cross_attention(model_config, self.tokenizer)
            if model_config.model_type == "kosmos-2":
                from omnistage.actors.kosmos2 import Kosmos2Prompt

                self.kosmos2, self.placeholders = Kosmos2Prompt(self.tokenizer, model_config.latent_query_num), {}
                self.visible_text = self.kosmos2.visible
            else:
                if self.cross_attention is None:
                    token_ids = media_token_ids(model_config)
                else:
                    # The config names no image token: the processor's own is the one.
                    token_ids = {self.cross_attention.modality: self.tokenizer.convert_tokens_to_ids(self.cross_attention.token)}
                self.placeholders = self._checkpoint_media_tokens(token_ids)
        elif _is_encoder_decoder(self.checkpoint):
            # Flan-T5 / UL2: the prompt (media spliced in) goes into the encoder; the decoder writes.
            from transformers import AutoModelForSeq2SeqLM

            self.model = AutoModelForSeq2SeqLM.from_pretrained(self.checkpoint, dtype=self.dtype)
        else:
            # The class comes from the checkpoint's model_type (LLaMA, Qwen2, OPT, Persimmon, ...).
            self.model = AutoModelForCausalLM.from_pretrained(self.checkpoint, dtype=self.dtype)
        self.is_encoder_decoder = bool(getattr(self.model.config, "is_encoder_decoder", False))
        # The tokens the checkpoint's tokenizer adds to a text of its own accord (see prompt_ids).
        self.added_specials = set(self.tokenizer("")["input_ids"]) if is_multimodal_checkpoint(self.checkpoint) else set()
        self._add_missing_tokens()
        self.model.to(self.device).eval()
        self.embed_tokens = self.model.get_input_embeddings()
        self.hidden_size = self.embed_tokens.embedding_dim

        vocab = self.tokenizer.get_vocab()
        self.placeholder_ids = {vocab[token]: modality for modality, token in self.placeholders.items()}
        if self.kosmos2 is not None:
            from omnistage.actors.kosmos2 import IMAGE_SLOTS

            self.placeholder_ids[IMAGE_SLOTS] = "image"
        self.fusion = {m: "cross_attention" if self.cross_attention and m == self.cross_attention.modality else "splice" for m in MODALITIES}
        # The placeholders expanded into media tokens; a cross-attention medium's stays one token.
        self.spliced_ids = {t for t, m in self.placeholder_ids.items() if self.fusion[m] == "splice"}
        self.groups = {m: [vocab[t] for t in signal_token_names(m, n)] for m, n in config.signal_tokens.items()}
        self.signal_modality = {t: m for m, ids in self.groups.items() for t in ids}
        # The sampler never picks a placeholder or a group's later tokens (those are forced).
        # (A placeholder outside the vocabulary, as Kosmos-2's, cannot be sampled anyway.)
        banned = [t for t in self.placeholder_ids if t >= 0] + [t for ids in self.groups.values() for t in ids[1:]]
        self.banned = torch.tensor(banned, dtype=torch.long, device=self.device)
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.eos_ids.add(self.tokenizer.eos_token_id)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)
        self.max_context = getattr(self.model.config, "max_position_embeddings", None)
        if config.engine.backend == "vllm" and self.cross_attention is not None:
            raise ValueError(
                f"expected engine.backend 'builtin' for {str(self.checkpoint)!r}: its language model reads media through "
                "cross-attention layers, which only the built-in engine feeds"
            )
        if config.engine.backend == "vllm":
            # Imported here: only the vLLM pool's own environment (engine.vllm.python) has vLLM.
            from omnistage.actors.vllm_engine import VLLMEngine

            self.engine = VLLMEngine(self, config.engine)
        else:
            self.engine = Engine(self, config.engine)

    def _checkpoint_media_tokens(self, token_ids: dict[str, int]) -> dict[str, str]:
        """The checkpoint's own media token per modality, checked against its tokenizer and template."""
        tokens = {}
        for modality, token_id in token_ids.items():
            token = self.tokenizer.convert_ids_to_tokens(token_id)
            if not self.chat_template.typed:
                # A string template reads the chat's placeholders as they are: the checkpoint's
                # token must be that placeholder.
                got = self.tokenizer.convert_tokens_to_ids(PLACEHOLDERS[modality])
                if got != token_id:
                    raise ValueError(
                        f"the tokenizer in {str(self.checkpoint)!r} maps {PLACEHOLDERS[modality]!r} to id {got}, "
                        f"but the checkpoint's config names {modality} token id {token_id}"
                    )
            elif (n := self.chat_template.count(modality, token_id)) != 1:
                raise ValueError(
                    f"expected the chat template in {str(self.checkpoint)!r} to write the checkpoint's {modality} token "
                    f"{token!r} (id {token_id}) once for one {modality} part, got {n} times"
                )
            tokens[modality] = token
        return tokens

    def _add_missing_tokens(self) -> None:
        needed = list(self.placeholders.values()) + [
            token for m, n in self.config.signal_tokens.items() for token in signal_token_names(m, n)
        ]
        vocab = self.tokenizer.get_vocab()
        missing = [token for token in needed if token not in vocab]
        self.added_tokens = missing
        if not missing:
            return
        self.tokenizer.add_tokens(missing, special_tokens=True)
        # Never shrink: many checkpoints pad their embedding matrix beyond the tokenizer's size.
        size = max(len(self.tokenizer), self.model.get_input_embeddings().num_embeddings)
        self.model.resize_token_embeddings(size)
        log.warning(
            "llm_tokens_added",
            tokens=missing,
            reason="checkpoint lacks them; their embeddings are untrained, so signal tokens need a tuned checkpoint",
        )

    # 1. Check inputs

    def check(self, request: LLMRequest) -> None:
        self.prepare(request)

    def with_defaults(self, request: LLMRequest) -> LLMRequest:
        """``request`` with its unset sampling fields taken from ``llm.defaults``: the one place a
        request's defaults come from, whichever entry point it came through."""
        unset = {
            name: getattr(self.config.defaults, name)
            for name in ("max_tokens", "temperature", "top_p")
            if getattr(request, name) is None
        }
        return dataclasses.replace(request, **unset) if unset else request

    def prepare(self, request: LLMRequest) -> tuple[list[int], int]:
        """Check ``request`` (unset fields as ``with_defaults`` fills them) and tokenise its prompt
        once: the prompt's token ids (one per placeholder) and its length with each placeholder
        expanded to its medium's tokens."""
        request = self.with_defaults(request)
        if not request.messages:
            raise InvalidInputError("expected at least one message, got none")
        for i, message in enumerate(request.messages):
            if message.get("role") not in ROLES:
                raise InvalidInputError(f"expected message {i} to have a role in {ROLES}, got {message.get('role')!r}")
            if problem := content_problem(message.get("content")):
                raise InvalidInputError(
                    f"expected message {i} to have text content or a list of parts ({{'type': 'text', 'text': str}} "
                    f"or {{'type': m}} with m in {MODALITIES}), got {problem}"
                )
        if not 1 <= request.max_tokens <= self.config.max_tokens_limit:
            raise InvalidInputError(f"expected max_tokens in [1, {self.config.max_tokens_limit}], got {request.max_tokens}")
        if request.temperature < 0:
            raise InvalidInputError(f"expected temperature >= 0, got {request.temperature}")
        if not 0 < request.top_p <= 1:
            raise InvalidInputError(f"expected top_p in (0, 1], got {request.top_p}")
        unknown = [m for m in request.force_modalities if m not in self.groups]
        if unknown:
            raise UnsupportedMediaError(
                f"expected output modalities among {sorted(self.groups)}, got {unknown}"
            )
        ids = self.prompt_ids(request)
        return ids, self._check_media(request, ids)

    # 2. Embed the prompt with media spliced in

    def render_prompt(self, messages: list[dict[str, Any]]) -> str:
        """The prompt as the checkpoint's processor renders it (``actors/chat_template.py``)."""
        if self.kosmos2 is not None:
            return self.kosmos2.render(messages)
        return self.chat_template.render(messages)

    def prompt_ids(self, request: LLMRequest) -> list[int]:
        """The rendered prompt's token ids. A text model's template writes every special token
        itself (as ``tokenizer.apply_chat_template`` assumes); a multimodal checkpoint's processor
        lets its tokenizer add them (LLaVA's ``<s>``, T5's closing ``</s>``) unless the template
        wrote them. transformers' processors check only for a leading BOS; BLIP-2's layout puts the
        queries before it, so any of those tokens already in the prompt counts. Kosmos-2's prompt
        is laid out as its processor lays it out (``Kosmos2Prompt``)."""
        if self.kosmos2 is not None:
            return self.kosmos2.ids(request.messages)
        text = self.render_prompt(request.messages)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.added_specials and not self.added_specials.intersection(ids):
            ids = self.tokenizer(text)["input_ids"]
        return ids

    def media_in_prompt_order(self, request: LLMRequest, ids: list[int]) -> list[Embeddings]:
        """``request.media`` in the order of the prompt's placeholders: the k-th placeholder of a
        modality takes the k-th item of that modality, as the models' own processors pair them
        (some templates write a message's images before its videos, whatever the parts' order)."""
        queues = {m: [item for item in request.media if item.modality == m] for m in MODALITIES}
        return [queues[self.placeholder_ids[t]].pop(0) for t in ids if t in self.placeholder_ids]

    def _check_media(self, request: LLMRequest, ids: list[int]) -> int:
        """The prompt's length with media; raises unless the media match its placeholders."""
        wanted = [self.placeholder_ids[t] for t in ids if t in self.placeholder_ids]
        given = [item.modality for item in request.media]
        if sorted(wanted) != sorted(given):
            raise InvalidInputError(
                f"the prompt's placeholders ask for {_describe(wanted)}, but the media given are {_describe(given)}"
            )
        for item in request.media:
            if item.fusion != self.fusion[item.modality]:
                raise InvalidInputError(
                    f"expected {item.modality} embeddings read by {self.fusion[item.modality]} (as this checkpoint's "
                    f"language model reads them), got embeddings meant for {item.fusion!r}"
                )
            # Cross-attention reads every item's latents as one block: their number is the checkpoint's.
            rows, width = (self.cross_attention.tokens_per_item, self.cross_attention.width) if item.fusion == "cross_attention" else (None, self.hidden_size)
            if (
                not isinstance(item.embeds, np.ndarray)
                or item.embeds.ndim != 2
                or item.embeds.shape[1] != width
                or (rows is not None and item.embeds.shape[0] != rows)
            ):
                raise InvalidInputError(
                    f"expected {item.modality} embeddings of shape ({rows or 'n_tokens'}, {width}), "
                    f"got {getattr(item.embeds, 'shape', type(item.embeds).__name__)}"
                )
        spliced = [item for item in request.media if item.fusion == "splice"]
        length = len(ids) - len(spliced) + sum(item.embeds.shape[0] for item in spliced)
        if self.max_context is not None and length + request.max_tokens > self.max_context:
            raise InvalidInputError(
                f"expected the prompt ({length} tokens with media) plus max_tokens "
                f"({request.max_tokens}) to fit the model's context of {self.max_context} tokens"
            )
        return length

    def embed_prompt(self, request: LLMRequest, ids: list[int] | None = None) -> torch.Tensor:
        """(n_tokens, d_llm) input embeddings of a checked request: the prompt's tokens (``ids``,
        from ``prepare``), each placeholder expanded to its medium's embeddings."""
        ids = self.prompt_ids(request) if ids is None else ids
        media = [item for item in self.media_in_prompt_order(request, ids) if item.fusion == "splice"]
        input_ids = torch.tensor(self.expand(ids, [item.embeds.shape[0] for item in media]), device=self.device)
        if not media:
            return self.embed_tokens(input_ids)
        # concatenate() copies: arrays read from Ray's object store are read-only.
        return self.splice(input_ids, torch.from_numpy(np.concatenate([item.embeds for item in media])))

    def expand(self, ids: list[int], lengths: list[int]) -> list[int]:
        """``ids`` with the k-th placeholder repeated ``lengths[k]`` times: one position per token
        of its medium."""
        remaining = iter(lengths)
        return [t for t in ids for _ in range(next(remaining) if t in self.spliced_ids else 1)]

    def splice(self, input_ids: torch.Tensor, media: torch.Tensor) -> torch.Tensor:
        """Token embeddings of expanded ``input_ids`` (..., n) with the placeholder positions
        filled, in order, by the rows of ``media`` (n_media_tokens, d_llm), or (batch,
        n_media_tokens, d_llm) for a batch. Differentiable in ``media``, so training splices as
        serving does."""
        is_media = torch.isin(input_ids, torch.tensor(list(self.spliced_ids), device=input_ids.device))
        # A placeholder outside the vocabulary (Kosmos-2's) is looked up as id 0: its row is overwritten.
        embeds = self.embed_tokens(input_ids.masked_fill(is_media, 0))
        return embeds.masked_scatter(is_media[..., None], media.to(embeds.device, embeds.dtype))

    def cross_attention_media(self, request: LLMRequest, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """What a checked request's cross-attention layers read: its media, (max(1, n_items),
        tokens_per_item, width), in the order of the prompt's tokens for them (zeros where it has
        none), and which of them each prompt position reads, (len(ids), max(1, n_items)) 0/1."""
        media = [item.embeds for item in self.media_in_prompt_order(request, ids)]
        tokens, width = self.cross_attention.tokens_per_item, self.cross_attention.width
        states = torch.zeros(max(1, len(media)), tokens, width, dtype=self.dtype)
        if media:
            states[: len(media)] = torch.from_numpy(np.stack(media))
        return states.to(self.device), self.cross_attention.prompt_mask(ids, len(media)).to(self.device)

    # 3. Decode, continuously batched (actors/engine.py)

    def answer(self, text: str) -> dict[str, Any]:
        """A finished sequence's ``LLMResult`` text fields: its decoded text; for Kosmos-2, the
        text without its grounding tokens and the ``entities`` they box."""
        if self.kosmos2 is None:
            return {"text": text}
        text, entities = self.kosmos2.entities(text)
        return {"text": text, "entities": entities}

    def __call__(self, requests: list[LLMRequest]) -> list[LLMResult]:
        return self.engine.generate(requests)


def _is_encoder_decoder(checkpoint: Path) -> bool:
    from transformers import AutoConfig

    return bool(getattr(AutoConfig.from_pretrained(checkpoint), "is_encoder_decoder", False))


def _describe(modalities: list[str]) -> str:
    if not modalities:
        return "no media"
    counts = {m: modalities.count(m) for m in MODALITIES if m in modalities}
    return ", ".join(f"{n} {m}" for m, n in counts.items()) + f" ({' '.join(modalities)})"
