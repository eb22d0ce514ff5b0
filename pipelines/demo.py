"""A one-shot tour of the whole path: media questions in, text out; prompts in, media out.

The sample media come from the shapes world (a red circle, a green square moving to the right, two
short high whistles) and are sent the way an API user sends them, as encoded files in data URLs,
so decoding runs too.
"""

from __future__ import annotations

import base64
import random
from pathlib import Path

import numpy as np

from omnistage.actors.media import encode_png, encode_video, encode_wav
from omnistage.pipelines.shapes import MotionSpec, ShapeSpec, SoundSpec, render, render_clip, synthesize

EXTENSIONS = {"image/png": "png", "image/gif": "gif", "video/mp4": "mp4", "audio/wav": "wav"}


SAMPLE_SHAPE = ShapeSpec("red", "circle", "left", "big")
SAMPLE_MOTION = MotionSpec("green", "square", "right")
SAMPLE_SOUND = SoundSpec("two", "short", "high", "whistle")


def sample_image(size: int = 64) -> np.ndarray:
    """(size, size, 3) uint8: a picture of the shapes world, a big red circle on the left."""
    return render(SAMPLE_SHAPE, size, random.Random(0))


def sample_video(n_frames: int = 12, size: int = 48) -> np.ndarray:
    """(n_frames, size, size, 3) uint8: a clip of the shapes world, a green square moving to the right."""
    return render_clip(SAMPLE_MOTION, n_frames, size, random.Random(0))


def sample_audio(rate: int = 22050) -> tuple[np.ndarray, int]:
    """A sound of the shapes world, two short high whistles, at a rate other than 16 kHz by
    default, so the encoder's resampling runs."""
    return synthesize(SAMPLE_SOUND, random.Random(0), rate=rate)


def sample_files() -> dict[str, bytes]:
    """The sample media as ordinary files: file name -> encoded bytes."""
    return {
        "sample.png": encode_png(sample_image()),
        "sample.mp4": encode_video(sample_video(), fps=8),
        "sample.wav": encode_wav(*sample_audio()),
    }


def write_samples(out_dir: Path) -> list[Path]:
    """Write the sample media as ordinary files (sample.png, sample.mp4, sample.wav)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = sample_files()
    for name, data in files.items():
        (out_dir / name).write_bytes(data)
    return [out_dir / name for name in files]


def _data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def demo_requests() -> list[tuple[str, list[dict], list[str]]]:
    """(title, messages, modalities) for each demo request."""
    samples, rate = sample_audio()
    image = {"type": "image_url", "image_url": {"url": _data_url("image/png", encode_png(sample_image()))}}
    video = {"type": "video_url", "video_url": {"url": _data_url("video/mp4", encode_video(sample_video(), fps=8))}}
    audio = {
        "type": "input_audio",
        "input_audio": {"data": base64.b64encode(encode_wav(samples, rate)).decode(), "format": "wav"},
    }

    def ask(text: str, *parts: dict) -> list[dict]:
        return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]

    return [
        ("image question", ask("What is in this image?", image), ["text"]),
        ("video question", ask("What happens in this video?", video), ["text"]),
        ("audio question", ask("What do you hear?", audio), ["text"]),
        ("image generation", ask("Draw a blue square."), ["text", "image"]),
        ("video generation", ask("Make a video of a red circle moving up."), ["text", "video"]),
        ("audio generation", ask("Play a long low buzz."), ["text", "audio"]),
    ]


def run_demo(config: str, out_dir: Path, seed: int = 0) -> list[Path]:
    """Run every demo request the config can serve through a ``LocalPipeline``; print answers,
    write media files."""
    from omnistage.pipelines.local import LocalPipeline
    from omnistage.pipelines.schemas import PART_MODALITY

    pipeline = LocalPipeline.from_config(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for title, messages, modalities in demo_requests():
        inputs = [PART_MODALITY[part["type"]] for part in messages[0]["content"] if part["type"] in PART_MODALITY]
        missing = [f"{m} input" for m in inputs if m not in pipeline.encoders]
        missing += [f"{m} output" for m in modalities if m != "text" and m not in pipeline.generators]
        if missing:
            print(f"[{title}] skipped: config {config!r} has no {', '.join(missing)}")
            continue
        result = pipeline.chat(messages, max_tokens=24, seed=seed, modalities=modalities)
        print(f"[{title}] {messages[0]['content'][-1]['text']}\n  answer: {result.text!r}")
        for item in result.media:
            path = out_dir / f"{item.modality}.{EXTENSIONS.get(item.mime_type, 'bin')}"
            path.write_bytes(item.data)
            written.append(path)
            print(f"  wrote {path} ({item.mime_type}, {len(item.data)} bytes, array {item.array.shape})")
    return written
