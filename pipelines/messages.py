"""OpenAI-style chat messages to the LLM's form: text and typed media parts, plus the media.

Content parts follow OpenAI's chat format (``text``, ``image_url``, ``input_audio``) with
``video_url`` added the same way; their schema is ``omnistage.pipelines.schemas.Message``. In
Python, a part's value may also be the medium itself: bytes, a PIL image or a numpy array
(``(H, W, 3)`` uint8 images, ``(T, H, W, 3)`` uint8 videos, an ``AudioClip`` or
``(samples, sampling_rate)`` for audio).

Media files are not decoded here: their headers are checked (format, declared size, pixel, frame
and duration limits) and the bytes go on as ``EncodedMedia`` to the modality's encoder, which
decodes them. So the HTTP ingress, which runs this, holds a request's bytes, never its pixels.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from pydantic import TypeAdapter, ValidationError

from omnistage.actors.errors import InvalidInputError, PayloadTooLargeError, UnsupportedMediaError
from omnistage.actors.media import parse_data_url, probe, to_audio_clip, to_image_array, to_video_array
from omnistage.actors.payloads import AudioClip, EncodedMedia, Modality
from omnistage.cluster.config import InputLimits
from omnistage.pipelines.schemas import PART_MODALITY, InputAudio, MediaURL, Message, TextPart, describe_validation_error

AUDIO_FORMATS = ("wav", "flac", "mp3", "ogg")
_MESSAGES = TypeAdapter(list[Message])


@dataclass
class ParsedChat:
    """``messages`` hold text and typed parts in the caller's order (``{"type": "text", "text":
    ...}``, ``{"type": "image"}`` where an image stood: the LLM's ``LLMRequest`` form, which the LLM
    stage renders with the checkpoint's own chat template); ``media`` lists the media in part
    order: files as ``EncodedMedia`` (header checked), objects from Python callers as image
    (H, W, 3) uint8, video (T, H, W, 3) uint8, audio AudioClip. ``instructions`` holds, per medium,
    the text of the message it came in (its text parts, stripped, joined by newlines): what an input
    projector that reads the question gets with the medium's features (``Features.instruction``)."""

    messages: list[dict[str, Any]]
    media: list[tuple[Modality, EncodedMedia | np.ndarray | AudioClip]]
    instructions: list[str]


def parse_messages(
    messages: list[dict[str, Any]] | list[Message],
    accepted: list[Modality],
    remote: RemoteMedia | None = None,
    limits: InputLimits | None = None,
) -> ParsedChat:
    """Check a chat. ``messages`` are dicts (Python callers) or already validated ``Message``
    models (the HTTP request); both meet the same schema. ``accepted`` names the input modalities
    this deployment serves; ``remote`` says which hosts media URLs may be fetched from (none by
    default); ``limits`` bound what the media may cost to decode (checked here from headers, and
    again by the encoder that decodes)."""
    limits = limits or InputLimits()
    if not isinstance(messages, list) or not messages:
        raise InvalidInputError(f"expected a non-empty list of messages, got {_kind(messages)}")
    try:
        checked = _MESSAGES.validate_python(messages)
    except ValidationError as exc:
        raise InvalidInputError(f"invalid messages: {describe_validation_error(exc, root=('messages',))}") from None
    n_media = sum(
        1 for message in checked if isinstance(message.content, list) for part in message.content if part.type in PART_MODALITY
    )
    if n_media > limits.max_media_items:
        raise InvalidInputError(f"expected at most {limits.max_media_items} media items per request, got {n_media}")
    out_messages, media, instructions = [], [], []
    for index, message in enumerate(checked):
        if isinstance(message.content, str):
            out_messages.append({"role": message.role, "content": message.content})
            continue
        # As a string chat template prints the message once its media are taken out.
        text = "\n".join(part.text.strip() for part in message.content if isinstance(part, TextPart)).strip()
        parts = []
        for part_index, part in enumerate(message.content):
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": part.text})
                continue
            where = f"message {index} part {part_index}"
            modality = PART_MODALITY[part.type]
            if modality not in accepted:
                raise UnsupportedMediaError(f"{where} is {modality}, but this model accepts {accepted or 'text only'}")
            media.append((modality, _medium(modality, getattr(part, part.type), where, remote, limits)))
            instructions.append(text)
            parts.append({"type": modality})
        out_messages.append({"role": message.role, "content": parts})
    return ParsedChat(messages=out_messages, media=media, instructions=instructions)


def _medium(
    modality: Modality, value: Any, where: str, remote: RemoteMedia | None, limits: InputLimits
) -> EncodedMedia | np.ndarray | AudioClip:
    if modality == "audio":
        return _audio(value, where, limits)
    if isinstance(value, MediaURL):
        value = value.url
    if isinstance(value, str):
        mime, value = (remote or RemoteMedia()).fetch(value, where) if _is_remote(value) else parse_data_url(value)
        allowed = ("image/",) if modality == "image" else ("video/", "image/gif")
        if not mime.startswith(allowed):
            raise UnsupportedMediaError(f"expected {where} to be a {' or '.join(allowed)} data URL, got {mime!r}")
    if isinstance(value, (bytes, bytearray)):
        return _file(modality, value, limits)
    # Arrays and PIL images come from Python callers, already decoded.
    return to_image_array(value) if modality == "image" else to_video_array(value)


def _file(modality: Modality, data: bytes | bytearray, limits: InputLimits) -> EncodedMedia:
    item = EncodedMedia(modality=modality, data=bytes(data), limits=limits.decode_limits())
    probe(item)
    return item


def _audio(value: Any, where: str, limits: InputLimits) -> EncodedMedia | AudioClip:
    if isinstance(value, InputAudio):
        if value.format not in AUDIO_FORMATS:
            raise UnsupportedMediaError(f"expected {where} audio format in {AUDIO_FORMATS}, got {value.format!r}")
        value = value.data
        if isinstance(value, str):
            try:
                value = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidInputError(f"expected {where} audio data as base64, got {len(value)} characters that are not") from None
    if isinstance(value, (bytes, bytearray)):
        return _file("audio", value, limits)
    if isinstance(value, tuple) and len(value) == 2:
        return to_audio_clip(value[0], sampling_rate=value[1])
    return to_audio_clip(value)


def _is_remote(url: str) -> bool:
    return url.lower().startswith(("http://", "https://"))


@dataclass(frozen=True)
class RemoteMedia:
    """Fetching media by URL, off unless hosts are allowed: a server that fetches any URL it is
    given can be made to reach internal services."""

    allowed_hosts: tuple[str, ...] = ()
    max_bytes: int = 32 * 1024 * 1024
    timeout_s: float = 10.0

    def fetch(self, url: str, where: str) -> tuple[str, bytes]:
        host = urlsplit(url).hostname or ""
        if host not in self.allowed_hosts:
            raise InvalidInputError(
                f"expected {where} as a data URL; remote URLs are not fetched from {host!r} "
                f"(allowed hosts: {list(self.allowed_hosts) or 'none'})"
            )
        import httpx

        try:
            # No redirects: a redirect could lead off the allowed hosts.
            with httpx.stream("GET", url, timeout=self.timeout_s, follow_redirects=False) as response:
                if response.status_code != 200:
                    raise InvalidInputError(f"expected {where} URL to answer 200, got {response.status_code}")
                data = bytearray()
                for chunk in response.iter_bytes():
                    data += chunk
                    if len(data) > self.max_bytes:
                        raise PayloadTooLargeError(f"expected {where} of at most {self.max_bytes} bytes, got more")
                mime = response.headers.get("content-type", "").split(";")[0].strip().lower()
        except httpx.HTTPError as exc:
            raise InvalidInputError(f"expected {where} URL to be fetchable, got {type(exc).__name__}") from None
        return mime, bytes(data)


def _kind(value: Any) -> str:
    return type(value).__name__
