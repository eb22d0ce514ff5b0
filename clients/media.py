"""Client-side media: what users pass in -> request content parts; response files -> decoded objects.

Codecs are the server's own (``omnistage.actors.media``, which imports no torch, ray or scipy at
import time), so what the client encodes is exactly what the server decodes. They load av,
soundfile and PIL, so they are imported where a medium is first encoded or decoded: a client that
sends only text never loads them.
"""

from __future__ import annotations

import base64
import io
import os
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

Modality = Literal["image", "video", "audio"]

# Content part type of each input modality, as the server's chat format names them.
PART_TYPES: dict[str, str] = {"image": "image_url", "video": "video_url", "audio": "input_audio"}
AUDIO_FORMATS = ("wav", "flac", "mp3", "ogg")
DEFAULT_FPS = 8.0


# --- results ------------------------------------------------------------------------------------


@dataclass
class Audio:
    """Decoded audio: ``samples`` float32, ``(n,)`` mono or ``(n, channels)``, at ``sampling_rate``.

    ``data`` and ``mime_type`` are the file as the server sent it; :meth:`save` writes it.
    """

    samples: np.ndarray
    sampling_rate: int
    data: bytes = field(default=b"", repr=False)
    mime_type: str = "audio/wav"

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.sampling_rate

    def save(self, path: str | os.PathLike) -> Path:
        """Write the file; an extension other than the server's format (.flac, .ogg) re-encodes."""
        import soundfile as sf

        path = Path(path)
        if self.data and _extension_matches(path, self.mime_type):
            path.write_bytes(self.data)
        else:
            sf.write(path, self.samples, self.sampling_rate)
        return path


@dataclass
class Video:
    """Decoded video: ``frames`` ``(T, H, W, 3)`` uint8 RGB at ``fps``.

    ``data`` and ``mime_type`` are the file as the server sent it; :meth:`save` writes it.
    """

    frames: np.ndarray
    fps: float
    data: bytes = field(default=b"", repr=False)
    mime_type: str = "video/mp4"

    def save(self, path: str | os.PathLike) -> Path:
        """Write the file; ``.gif`` or ``.mp4`` when the server sent the other re-encodes."""
        from omnistage.actors import media as codecs

        path = Path(path)
        if self.data and _extension_matches(path, self.mime_type):
            path.write_bytes(self.data)
        elif path.suffix.lower() in (".gif", ".mp4"):
            path.write_bytes(codecs.encode_video(self.frames, self.fps, fmt=path.suffix.lower()[1:]))
        else:
            raise ValueError(f"expected a video file name ending in .mp4 or .gif, got {path.name!r}")
        return path


def _extension_matches(path: Path, mime_type: str) -> bool:
    from omnistage.actors import media as codecs

    suffix = path.suffix.lower().lstrip(".")
    suffix = {"jpg": "jpeg", "mpeg": "mp3"}.get(suffix, suffix)
    return codecs.MIME_TYPES.get(suffix) == mime_type


def decode_image(data: bytes) -> Image.Image:
    """A PIL image, fully loaded (no file handle left open)."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def decode_audio(data: bytes, mime_type: str = "audio/wav") -> Audio:
    from omnistage.actors import media as codecs

    clip = codecs.decode_audio(data)
    return Audio(samples=clip.samples, sampling_rate=clip.sampling_rate, data=data, mime_type=mime_type)


def decode_video(data: bytes, mime_type: str = "video/mp4") -> Video:
    import av

    from omnistage.actors import media as codecs

    with av.open(io.BytesIO(data)) as container:
        rate = container.streams.video[0].average_rate if container.streams.video else None
    return Video(frames=codecs.decode_video(data), fps=float(rate) if rate else DEFAULT_FPS, data=data, mime_type=mime_type)


def decode_media(modality: str, data: bytes, mime_type: str) -> Image.Image | Audio | Video | bytes:
    """A generated medium as the SDK returns it: a PIL image, an :class:`Audio` or a :class:`Video`."""
    if modality == "image":
        return decode_image(data)
    if modality == "audio":
        return decode_audio(data, mime_type)
    if modality == "video":
        return decode_video(data, mime_type)
    return data


# --- inputs -------------------------------------------------------------------------------------


def _sniff(data: bytes) -> str | None:
    """The MIME type of a media file from its first bytes, or None."""
    head = data[:16]
    if head.startswith(b"\x89PNG"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "image/webp"
    if head.startswith(b"BM"):
        return "image/bmp"
    if head.startswith(b"RIFF") and head[8:12] == b"WAVE":
        return "audio/wav"
    if head.startswith(b"fLaC"):
        return "audio/flac"
    if head.startswith(b"OggS"):
        return "audio/ogg"
    if head.startswith(b"ID3") or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "audio/mpeg"
    if head[4:8] == b"ftyp":
        return "video/mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "video/webm"
    return None


def _is_url(value: str) -> bool:
    return value.lower().startswith(("data:", "http://", "https://"))


def _local_path(value: str | os.PathLike) -> Path:
    """A path, or a ``file://`` URL (what a file manager copies, or ``Path.as_uri()``) of a file here."""
    text = os.fspath(value)
    if not isinstance(text, str) or not text.lower().startswith("file://"):
        return Path(text).expanduser()
    url = urllib.parse.urlsplit(text)
    if url.netloc not in ("", "localhost"):
        raise ValueError(f"expected a file:// URL of a file on this machine, got one on host {url.netloc!r}")
    from urllib.request import url2pathname  # percent-escapes, and drive letters on Windows

    return Path(url2pathname(url.path))


def _to_bytes(modality: str, value: Any, fps: float) -> bytes:
    """A path or ``file://`` URL, bytes, PIL image, numpy array (or for audio ``(samples, rate)``)
    -> file bytes."""
    if isinstance(value, (str, os.PathLike)):
        return _local_path(value).read_bytes()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    from PIL import Image

    from omnistage.actors import media as codecs

    if modality == "image":
        if isinstance(value, Image.Image):
            buffer = io.BytesIO()
            if value.mode not in ("1", "L", "LA", "P", "RGB", "RGBA"):
                value = value.convert("RGBA" if "A" in value.mode or "transparency" in value.info else "RGB")
            value.save(buffer, format="PNG")
            return buffer.getvalue()
        if isinstance(value, np.ndarray):
            return codecs.encode_png(codecs.to_image_array(value))
    elif modality == "video":
        if isinstance(value, Video):
            return value.data or codecs.encode_video(value.frames, value.fps)
        if isinstance(value, (np.ndarray, list, tuple)):
            return codecs.encode_video(codecs.to_video_array(value if isinstance(value, np.ndarray) else list(value)), fps)
    elif modality == "audio":
        if isinstance(value, Audio):
            return value.data or codecs.encode_wav(value.samples, value.sampling_rate)
        if isinstance(value, tuple) and len(value) == 2:
            samples, rate = value
            return codecs.encode_wav(np.asarray(samples, dtype=np.float32), rate)
        if isinstance(value, np.ndarray):
            raise ValueError(f"expected audio samples with their rate as (samples, sampling_rate), got an array of shape {value.shape} alone")
    kinds = {
        "image": "a path or file:// URL, bytes, a PIL image or an (H, W, 3) uint8 array",
        "video": "a path or file:// URL, bytes, a (T, H, W, 3) uint8 array or a list of frames",
        "audio": "a path or file:// URL, bytes or (samples, sampling_rate)",
    }
    raise TypeError(f"expected {modality} as {kinds[modality]}, got {type(value).__name__}")


def content_part(modality: str, value: Any, *, binary: bool, fps: float = DEFAULT_FPS) -> dict[str, Any]:
    """One chat content part for ``value``: raw bytes when ``binary`` (msgpack), else base64.

    A string that is a ``data:`` or ``http(s)://`` URL is passed on as it is (images and videos);
    a ``file://`` URL or any other string is a file here, read and sent.
    """
    if modality not in PART_TYPES:
        raise ValueError(f"expected a modality among {list(PART_TYPES)}, got {modality!r}")
    kind = PART_TYPES[modality]
    if isinstance(value, str) and _is_url(value):
        if modality == "audio":
            raise ValueError("expected audio as a path, bytes or (samples, sampling_rate); URLs are not accepted for audio")
        return {"type": kind, kind: {"url": value}}
    data = _to_bytes(modality, value, fps)
    if not data:
        raise ValueError(f"expected {modality} bytes, got an empty file")
    mime = _sniff(data)
    if modality == "audio":
        fmt = {"audio/wav": "wav", "audio/flac": "flac", "audio/ogg": "ogg", "audio/mpeg": "mp3"}.get(mime or "")
        if fmt is None:
            raise ValueError(f"expected a WAV, FLAC, OGG or MP3 audio file, got {len(data)} bytes of {mime or 'an unknown type'}")
        return {"type": kind, kind: {"data": data if binary else base64.b64encode(data).decode(), "format": fmt}}
    if binary:
        return {"type": kind, kind: {"url": data}}
    if modality == "image":
        mime = mime if mime and mime.startswith("image/") else "image/png"
    else:
        mime = mime if mime and (mime.startswith("video/") or mime == "image/gif") else "video/mp4"
    return {"type": kind, kind: {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"}}


def prepare_messages(messages: list[dict[str, Any]], *, binary: bool) -> list[dict[str, Any]]:
    """OpenAI-style messages as given by the user, made sendable.

    A media part may carry the medium itself, in place of the wire form or inside it (a path,
    bytes, PIL image, numpy array, or for audio ``(samples, rate)``): it is encoded like the
    convenience arguments. Data and remote URLs pass through unchanged.
    """
    if not isinstance(messages, list):
        raise TypeError(f"expected messages as a list of dicts, got {type(messages).__name__}")
    out = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            out.append(message)
            continue
        out.append({**message, "content": [_prepare_part(part, binary) for part in content]})
    return out


def _prepare_part(part: Any, binary: bool) -> Any:
    kind = part.get("type") if isinstance(part, dict) else None
    modality = next((m for m, k in PART_TYPES.items() if k == kind), None)
    if modality is None:
        return part
    value = part.get(kind)
    if modality == "audio":
        if isinstance(value, dict) and "data" in value and "format" in value:
            data = value["data"]
            if not binary and isinstance(data, (bytes, bytearray)):
                return {**part, kind: {**value, "data": base64.b64encode(data).decode()}}
            return part
    elif isinstance(value, dict) and "url" in value:
        if isinstance(value["url"], str) and _is_url(value["url"]):
            return part
        value = value["url"]  # bytes or a path in the url field
    return content_part(modality, value, binary=binary)
