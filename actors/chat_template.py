"""A checkpoint's own chat template, rendered the way its processor renders it.

Two kinds of template are in use. Published multimodal checkpoints (llava-hf's LLaVA 1.5 and
LLaVA-NeXT, Qwen2-VL, Qwen2-Audio, Idefics2, Video-LLaVA) ship templates that read each message's
content as a list of typed parts (``{"type": "image"}``, ``{"type": "text", "text": ...}``) and write
the checkpoint's own media tokens themselves. Plain chat templates (this project's tiny and shapes
presets, most text-only LLMs) read content as one string, in which ``<image>``, ``<video>`` and
``<audio>`` already stand where the media go.

The kind is decided by rendering, not by reading the template's source: a user message whose
content is one typed text part is rendered, and the template reads typed parts if the output holds
that part's text verbatim. The probe text contains a newline, which a template that prints the
content list as a string (Python's repr, or JSON) would escape, so such a template is not mistaken
for one that reads parts.

Contents are converted both ways, so a chat means the same whichever form it came in:

- for a typed template, string content becomes parts: each placeholder a media part, the text
  between placeholders a text part (stripped; empty text dropped);
- for a string template, parts become one string: each part's text or placeholder, joined by
  newlines (the layout ``<image>\\nWhat is it?`` the presets were trained on).

A media part is given to the template as ``{"type": "image", "image": "<image>"}``: the modality as
both type and key, since some published templates test the type (LLaVA, Idefics2) and others the
key (Qwen2-Audio's ``'audio' in content``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

from omnistage.actors.payloads import PLACEHOLDERS

PROBE_TEXT = "omnistage\nprobe"
# Where a checkpoint keeps its processor's template, in the order transformers' processors read
# them; the tokenizer's own template (tokenizer_config.json, or its chat_template.jinja) comes last.
PROCESSOR_TEMPLATE_FILES = ("chat_template.json", "chat_template.jinja", "processor_config.json")


def checkpoint_chat_template(checkpoint: str | Path, tokenizer: Any) -> str | None:
    """The template the checkpoint's processor uses, else the tokenizer's; None if it has neither."""
    for name in PROCESSOR_TEMPLATE_FILES:
        path = Path(checkpoint) / name
        if not path.is_file():
            continue
        if name.endswith(".jinja"):
            return path.read_text(encoding="utf-8")
        template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
        if template is not None:
            return template
    template = tokenizer.chat_template
    # A tokenizer may keep several named templates; the processor's choice is "default".
    return template.get("default") if isinstance(template, dict) else template


def content_problem(content: Any) -> str | None:
    """What is wrong with a message's content, or None: text, or a list of typed parts."""
    if isinstance(content, str):
        return None
    if not isinstance(content, list):
        return f"content of type {type(content).__name__}"
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str) or kind in PLACEHOLDERS:
            continue
        if kind == "text":
            return f"part {k}, a text part whose text is of type {type(part.get('text')).__name__}"
        return f"part {k} of type {kind!r}" if isinstance(part, dict) else f"part {k} of type {type(part).__name__}"
    return None


def media_part(modality: str) -> dict[str, str]:
    return {"type": modality, modality: PLACEHOLDERS[modality]}


def to_parts(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Content as typed parts; string content is split at its placeholders."""
    if not isinstance(content, str):
        return [part if part["type"] == "text" else media_part(part["type"]) for part in content]
    by_token = {token: modality for modality, token in PLACEHOLDERS.items()}
    parts, text, rest = [], "", content
    while rest:
        hits = [(rest.find(token), token) for token in by_token if token in rest]
        if not hits:
            text, rest = text + rest, ""
            break
        at, token = min(hits)
        text, rest = text + rest[:at], rest[at + len(token) :]
        if text.strip():
            parts.append({"type": "text", "text": text.strip()})
        text = ""
        parts.append(media_part(by_token[token]))
    if text.strip():
        parts.append({"type": "text", "text": text.strip()})
    return parts


def to_text(content: str | list[dict[str, Any]]) -> str:
    """Content as one string; each media part becomes its placeholder."""
    if isinstance(content, str):
        return content
    return "\n".join(part["text"] if part["type"] == "text" else PLACEHOLDERS[part["type"]] for part in content)


class ChatTemplate:
    """Renders chats with one template, in the form that template reads (see the module's doc)."""

    def __init__(self, tokenizer: Any, template: str):
        self.tokenizer = tokenizer
        self.template = template
        try:
            probe = self._apply([{"role": "user", "content": [{"type": "text", "text": PROBE_TEXT}]}])
        except (TemplateError, TypeError, ValueError):
            # A template that fails on a list of parts (string concatenation, string filters) reads strings.
            probe = ""
        self.typed = PROBE_TEXT in probe

    def _apply(self, messages: list[dict[str, Any]]) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=True
        )

    def render(self, messages: list[dict[str, Any]]) -> str:
        convert = to_parts if self.typed else to_text
        return self._apply([{**message, "content": convert(message["content"])} for message in messages])

    def count(self, modality: str, token_id: int) -> int:
        """How often ``token_id`` occurs in a user turn holding one media part of ``modality`` and
        a question: once, for the token the template writes for that medium."""
        text = self.render([{"role": "user", "content": [media_part(modality), {"type": "text", "text": "x"}]}])
        return self.tokenizer(text, add_special_tokens=False)["input_ids"].count(token_id)
