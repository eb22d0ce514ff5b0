"""HTTP request bodies (OpenAI's shapes plus this project's media extensions) and error bodies."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from omnistage.actors.errors import status_of


class _Request(BaseModel):
    # OpenAI clients send fields this server does not use (user, logprobs, ...); they are ignored
    # rather than refused, as other OpenAI-compatible servers do.
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class ChatCompletionRequest(_Request):
    model: str | None = None
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
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
    seed: int | None = None
    response_format: Literal["b64_json"] = "b64_json"
    size: str | None = Field(None, pattern=r"^\d+x\d+$", description="WIDTHxHEIGHT (image, video)")
    num_frames: int | None = Field(None, ge=1, description="video")
    duration_s: float | None = Field(None, gt=0, description="audio")


def error_body(message: str, status: int, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": status_of(status).type, "param": param, "code": status}}
