"""Kosmos-2 (``Kosmos2ForConditionalGeneration``) in the parts the stage pools serve
(``actors/multimodal.py`` loads them), its prompt as ``Kosmos2Processor`` lays it out, and its
grounded answers' boxes.

The whole model computes, for a prompt ``<s><image>`` + one slot per latent query + ``</image>``
+ text (the processor's layout, with ``image_embeds_position_mask`` marking the slots):

1. ``vision_model``, every token's last hidden state through ``post_layernorm``, L2-normalised
   (the image encoder: ``Kosmos2VisionTower``);
2. ``image_to_text_projection``: latent queries attend to those features and the projected
   patches (the input projector: ``Kosmos2Projection``);
3. ``text_model``: the prompt's token embeddings with the slots overwritten by the projection's
   output, then all of it scaled by ``embed_scale``, plus sinusoidal positions counted from
   ``pad_token_id + 1`` (the LLM: ``Kosmos2TextLM``). The LLM stage splices the image into the
   unscaled token embeddings it passes as ``inputs_embeds``, which the text model scales itself:
   the same order as the model's own ``forward_embedding``.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.kosmos2.modeling_kosmos2 import (
    Kosmos2ImageToTextProjection,
    Kosmos2TextForCausalLM,
    Kosmos2VisionModel,
)

from omnistage.actors.chat_template import to_parts
from omnistage.actors.errors import InvalidInputError

# The image's place in a prompt's token ids (``LLM.expand`` repeats it once per latent query):
# no token of the vocabulary. The processor writes ordinary ids there, which the model overwrites;
# an id outside the vocabulary cannot be mistaken for text, and the sampler need ban nothing the
# model could write.
IMAGE_SLOTS = -1


class Kosmos2VisionTower(Kosmos2VisionModel):
    """The vision model as ``get_image_features`` reads it: every token's last hidden state (CLS
    kept) through ``post_layernorm``, which the tower itself applies to CLS only, then
    L2-normalised."""

    def forward(self, pixel_values: torch.Tensor, **kwargs: Any) -> BaseModelOutput:
        states = super().forward(pixel_values=pixel_values).last_hidden_state
        return BaseModelOutput(last_hidden_state=nn.functional.normalize(self.model.post_layernorm(states), dim=-1))


class Kosmos2Projection(Kosmos2ImageToTextProjection):
    """``image_to_text_projection``: (batch, n_tokens, d_vision) normalised features -> (batch,
    latent_query_num, d_text) image embeddings (its attention weights left out)."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return super().forward(features)[0]


def kosmos2_projection(config: Any, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> Kosmos2Projection:
    """The projection built from the whole checkpoint's config and its tensors (named without
    their ``image_to_text_projection.`` prefix)."""
    # Its attention is a module outside any PreTrainedModel, so nothing picks its implementation;
    # from_pretrained gives the whole model SDPA, which the answers must match.
    config.text_config._attn_implementation = "sdpa"
    projection = Kosmos2Projection(config).to(dtype)
    projection.load_state_dict(tensors, strict=True)
    return projection.eval()


class Kosmos2TextLM(Kosmos2TextForCausalLM):
    """Kosmos-2's text model, taking position ids counted from 0 as every other causal LM the
    engine runs: its sinusoidal table starts at ``pad_token_id + 1``, where the model itself counts
    from when it is given none. Positions so counted from each row's first token are the
    unpadded prompt's, whatever left padding a batch gives the row."""

    def forward(self, *args: Any, position_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if position_ids is not None:
            position_ids = position_ids + self.model.embed_positions.padding_idx + 1
        return super().forward(*args, position_ids=position_ids, **kwargs)


class Kosmos2Prompt:
    """Kosmos-2's prompt, laid out as ``Kosmos2Processor`` lays it out, and its answers' entities.

    Kosmos-2 continues a text; it has no chat template. A chat for it is one user message: at
    most one image and text, the text parts joined by spaces. As the processor does, the image
    comes first whatever the parts' order: ``<s><image>``, one slot per latent query,
    ``</image>``, a space, then the text (``<grounding>`` at its start asks for grounded
    phrases). The slots are one ``IMAGE_SLOTS`` in the prompt's ids.
    """

    def __init__(self, tokenizer: Any, n_slots: int):
        self.tokenizer = tokenizer
        self.n_slots = n_slots
        self.boi = tokenizer.convert_tokens_to_ids("<image>")
        # The location tokens <patch_index_0000>.. tile the image in a square grid (32 x 32 in the
        # published tokenizer, the processor's post-processing default).
        n_patches = sum(1 for token in tokenizer.get_vocab() if re.fullmatch(r"<patch_index_\d+>", token))
        self.patches_per_side = math.isqrt(n_patches)

    def _text_and_image(self, messages: list[dict[str, Any]]) -> tuple[str, bool]:
        if len(messages) != 1 or messages[0].get("role") != "user":
            raise InvalidInputError(
                "expected one user message for Kosmos-2 (it continues a text, with at most one image before it), "
                f"got messages with roles {[m.get('role') for m in messages]}"
            )
        parts = to_parts(messages[0]["content"])
        media = [part["type"] for part in parts if part["type"] != "text"]
        if media not in ([], ["image"]):
            raise InvalidInputError(f"expected at most one image in a Kosmos-2 prompt, got {media}")
        return " ".join(part["text"].strip() for part in parts if part["type"] == "text"), bool(media)

    def render(self, messages: list[dict[str, Any]]) -> str:
        """The processor's text: ``preprocess_examples``, then BOS."""
        text, image = self._text_and_image(messages)
        text = text.strip()
        if image:
            text = " ".join(["<image>"] * (self.n_slots + 1) + ["</image>"]) + f" {text}"
        return f"{self.tokenizer.bos_token}{text}"

    def ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """The processor's ``input_ids``, its image slots one ``IMAGE_SLOTS``."""
        ids = self.tokenizer(self.render(messages), add_special_tokens=False)["input_ids"]
        if not self._text_and_image(messages)[1]:
            return ids
        # The processor overwrites the ids after <s><image> with its slots: one <image> each.
        slots = ids[2 : 2 + self.n_slots]
        if ids[1] != self.boi or slots != [self.boi] * self.n_slots:
            raise ValueError(
                f"expected the tokenizer to write <s>, then <image> (id {self.boi}) {self.n_slots + 1} times for "
                f"Kosmos-2's image, as its processor lays it out; got ids {ids[: 2 + self.n_slots]}"
            )
        return ids[:2] + [IMAGE_SLOTS] + ids[2 + self.n_slots :]

    def visible(self, text: str, done: bool) -> str:
        """What a streamed answer shows of ``text``: its clean text (as ``entities`` gives it),
        less, until the answer is ``done``, a tag still being written. It only grows as ``text``
        does, so a stream's deltas add up to the whole answer's clean text."""
        from transformers.models.kosmos2.processing_kosmos2 import clean_text_and_extract_entities_with_bboxes

        # Tags are single tokens, but a "<" the model writes as text may open one of its own.
        opened = text.rfind("<")
        if not done and opened >= 0 and ">" not in text[opened:]:
            text = text[:opened]
        return clean_text_and_extract_entities_with_bboxes(text, num_patches_per_side=self.patches_per_side)[0]

    def entities(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """``text`` without its grounding tokens, and the phrases they box, by the processor's own
        ``clean_text_and_extract_entities_with_bboxes``: each ``{"text", "span": [start, end] in
        the clean text, "boxes": [[x0, y0, x1, y1], ...]}`` with coordinates normalised to 0..1 of
        the image's width and height (a box without a phrase is named by its location tokens)."""
        from transformers.models.kosmos2.processing_kosmos2 import clean_text_and_extract_entities_with_bboxes

        clean, found = clean_text_and_extract_entities_with_bboxes(text, num_patches_per_side=self.patches_per_side)
        return clean, [{"text": name, "span": [start, end], "boxes": [list(box) for box in boxes]} for name, (start, end), boxes in found]
