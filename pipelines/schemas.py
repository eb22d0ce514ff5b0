"""HTTP request bodies (OpenAI's shapes plus this project's media extensions) and error bodies.

Chat messages are typed by role and their content parts by ``type``, so a malformed chat fails
validation once, here, with the path of what is wrong. A media part's value is OpenAI's wire form
(``{"url": ...}``, ``{"data": ..., "format": ...}``; bytes in place of base64 over msgpack) or,
from Python callers, the medium itself (bytes, a PIL image, an array, ``(samples, rate)``), which
the media checks in ``omnistage.pipelines.messages`` take as it is.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from omnistage.actors.errors import status_of
from omnistage.actors.payloads import Modality


class _Request(BaseModel):
    # OpenAI clients send fields this server does not use (user, logprobs, ...); they are ignored
    # rather than refused, as other OpenAI-compatible servers do.
    model_config = ConfigDict(extra="ignore")


# Chat messages


class MediaURL(_Request):
    """``image_url`` and ``video_url``: a data URL, a remote URL, or (msgpack) the file's bytes."""

    url: str | bytes
    detail: Literal["auto", "low", "high"] | None = None


class InputAudio(_Request):
    """``input_audio``: the file as base64 (or bytes over msgpack). ``format`` is checked with the
    media (an unsupported format is a 415, not a malformed request)."""

    data: str | bytes
    format: str


def _wire_or_object(value: Any) -> str:
    return "wire" if isinstance(value, (dict, BaseModel)) else "object"


def _medium(wire: type[BaseModel]) -> Any:
    """A part's value: ``wire`` for a mapping, else an in-memory medium passed on unchecked."""
    return Annotated[Annotated[wire, Tag("wire")] | Annotated[Any, Tag("object")], Discriminator(_wire_or_object)]


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ImagePart(_Request):
    type: Literal["image_url"]
    image_url: _medium(MediaURL)


class VideoPart(_Request):
    type: Literal["video_url"]
    video_url: _medium(MediaURL)


class AudioPart(_Request):
    type: Literal["input_audio"]
    input_audio: _medium(InputAudio)


ContentPart = Annotated[TextPart | ImagePart | VideoPart | AudioPart, Field(discriminator="type")]
# Media part type -> the modality it carries.
PART_MODALITY: dict[str, Modality] = {"image_url": "image", "input_audio": "audio", "video_url": "video"}


def _content_form(value: Any) -> str | None:
    return "string" if isinstance(value, str) else "parts" if isinstance(value, list) else None


def _content(part: Any) -> Any:
    """A message's content: a string, or a list of ``part``."""
    return Annotated[
        Annotated[str, Tag("string")] | Annotated[list[part], Tag("parts")],
        Discriminator(
            _content_form, custom_error_type="content_type", custom_error_message="expected a string or a list of parts"
        ),
    ]


class UserMessage(_Request):
    role: Literal["user"]
    content: _content(ContentPart)


class _TextMessage(_Request):
    """A system or assistant message: text only, media come from the user."""

    content: _content(TextPart)

    @model_validator(mode="before")
    @classmethod
    def _no_media(cls, data: Any) -> Any:
        parts = data.get("content") if isinstance(data, dict) else None
        kinds = [part.get("type") for part in parts if isinstance(part, dict)] if isinstance(parts, list) else []
        # Only strings can name a part type; anything else fails the part's own validation.
        media = [kind for kind in kinds if isinstance(kind, str) and kind in PART_MODALITY]
        if media:
            raise PydanticCustomError(
                "media_outside_user",
                "expected media only in user messages, got {kind} in a '{role}' message",
                {"kind": media[0], "role": data.get("role")},
            )
        return data


class SystemMessage(_TextMessage):
    role: Literal["system"]


class AssistantMessage(_TextMessage):
    role: Literal["assistant"]


Message = Annotated[SystemMessage | UserMessage | AssistantMessage, Field(discriminator="role")]
# Names pydantic puts in an error's location to say which branch of a union it tried (the tags
# above, and the types of a plain union); the body has no such keys, so users' paths leave them out.
_UNION_TAGS = {"system", "user", "assistant", "string", "parts", "wire", "object", "str", "bytes"}


def describe_validation_error(exc: ValidationError, root: tuple[str, ...] = ()) -> str:
    """Each problem as ``path: what was expected``, and for a wrong type the type received.
    ``root`` is the path of what was validated within the body."""
    problems = []
    for err in exc.errors(include_input=True):
        path: list[str] = []
        for item in (*root, *err["loc"]):
            # A tagged union's tag is followed by the field of the same name (``image_url``).
            if item not in _UNION_TAGS and (not path or str(item) != path[-1]):
                path.append(str(item))
        got = f", got {type(err['input']).__name__}" if err["type"].endswith("_type") else ""
        problems.append(f"{'.'.join(path) or 'body'}: {err['msg']}{got}")
    return "; ".join(problems)


# Requests


# Torch's generators take a seed as a signed or unsigned 64-bit integer; media generation adds
# the item's index (under 8), so the top stays that far below the limit.
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1 - 8)]


class StreamOptions(_Request):
    include_usage: bool = False


class ChatCompletionRequest(_Request):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    # Unset: the served model's defaults (the LLM config's ``defaults``).
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: Seed | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    modalities: list[str] | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"only n=1 is supported, got n={n}")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError(f"at most 4 stop sequences, got {len(stop)}")
        return stop

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class MediaGenerationRequest(_Request):
    """``/v1/images/generations`` and its video and audio siblings."""

    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(1, ge=1, le=8)
    seed: Seed | None = None
    response_format: Literal["b64_json"] = "b64_json"
    size: str | None = Field(None, pattern=r"^\d+x\d+$", description="WIDTHxHEIGHT (image, video)")
    num_frames: int | None = Field(None, ge=1, description="video")
    duration_s: float | None = Field(None, gt=0, description="audio")


def error_body(message: str, status: int, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": status_of(status).type, "param": param, "code": status}}
