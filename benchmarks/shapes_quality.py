"""Quality of the trained shapes preset, per modality and direction, on media it never saw.

    .venv/bin/python benchmarks/shapes_quality.py                    # the shipped preset
    .venv/bin/python benchmarks/shapes_quality.py --preset-dir DIR   # one `omnistage train shapes DIR` wrote
    .venv/bin/python benchmarks/shapes_quality.py -n 50              # a quick look

Understanding, on two sets per modality, each item sent as an encoded file (PNG or JPEG, MP4 or
GIF, WAV or FLAC) through the whole path, as an API user sends it:

- held-out: the training renderers (``omnistage.pipelines.shapes``), half in the house style and
  half varied, with seeds the training never uses;
- foreign: renderers written here, which the training never ran: pictures rasterised from signed
  distances with numpy (other proportions, backgrounds from any light colour to pure white, any
  size up to 512x512, hard or smooth edges, rotations, JPEG at any quality); clips from the same
  rasteriser at 12 to 30 frames per second in MP4 or GIF, 40 to 128 pixels, other paths and
  speeds; sounds with attack-decay envelopes, vibrato, sawtooth-like buzzes, at 8 to 48 kHz, mono
  or stereo, WAV or FLAC, with noise.

An answer is parsed for each attribute (``shapes.parse_caption`` and its siblings); each is scored.

Generation: instructions through the LLM, signal tokens, output projector and generator; the media
judged by code that uses no model of the preset: a picture's colour (palette colour nearest its
saturated pixels), place (third of the width holding their centre) and size (their area); its shape
by a small CNN trained here on renders (its accuracy is printed); a clip's colour and its direction
of motion (the saturated pixels' centre from the first frames to the last); a sound's pitch (the
strongest frequency of its spectrum), length and count (runs of its 10 ms RMS envelope). Earlier
turns: a picture captioned, then a drawing in another colour asked for in the same chat (n/2
chats); the drawing's colour is scored.
Everything runs in this process, seeded.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from omnistage.actors.media import encode_png, encode_video, encode_wav
from omnistage.pipelines import shapes
from omnistage.pipelines.local import LocalPipeline
from omnistage.pipelines.train import IMAGE_SIZE, preset_config

# The targets: a key of ``results`` -> the least share right.
TARGETS = {
    "image captions, foreign: colour and shape": 0.90,
    "drawings: colour": 0.95,
    "drawings: shape": 0.90,
    "drawings: place": 0.80,
    "video captions, held-out: colour, shape and motion": 0.85,
    "video captions, foreign: colour, shape and motion": 0.85,
    "generated video: colour and motion": 0.70,
    "audio captions, held-out: all four": 0.90,
    "audio captions, foreign: all four": 0.90,
    "generated audio: pitch and length": 0.80,
}


# --- foreign renderers -----------------------------------------------------------------------------


def _signed_distance(shape: str, x: np.ndarray, y: np.ndarray, r: float, angle: float) -> np.ndarray:
    """Distance outside the shape (negative inside), in pixels, at pixel centres (x, y) relative to
    the shape's centre. Proportions differ from the training renderer's on purpose."""
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = cos * x + sin * y, -sin * x + cos * y
    if shape == "circle":
        return np.hypot(x, y) - r
    if shape == "square":
        h = 0.8 * r
        return np.maximum(np.abs(u), np.abs(v)) - h
    if shape == "cross":
        arm, w = 0.95 * r, 0.25 * r
        bar = lambda a, b: np.maximum(np.abs(a) - arm, np.abs(b) - w)  # noqa: E731
        return np.minimum(bar(u, v), bar(v, u))
    # An equilateral triangle, point up (y grows downwards): three half-planes, the outward
    # normals of its base and two sides.
    edges = [np.array([0.0, 1.0]), np.array([np.sqrt(3) / 2, -0.5]), np.array([-np.sqrt(3) / 2, -0.5])]
    return np.max([n[0] * u + n[1] * (v - 0.1 * r) - 0.5 * r for n in edges], axis=0)


def _foreign_style(rng: random.Random) -> dict:
    if rng.random() < 0.4:
        background = (255, 255, 255)
    else:
        background = tuple(rng.randint(200, 255) for _ in range(3))
    return {
        "background": np.array(background, np.float64),
        "soft": rng.random() < 0.5,
        "angle": rng.uniform(-0.35, 0.35),
        "jitter": np.array([rng.randint(-20, 20) for _ in range(3)]),
    }


def _rasterise(shape: str, colour: str, cx: float, cy: float, r: float, size: int, style: dict) -> np.ndarray:
    """(size, size, 3) uint8; centre and radius as fractions of the side."""
    coords = np.arange(size) + 0.5
    x, y = np.meshgrid(coords - cx * size, coords - cy * size)
    distance = _signed_distance(shape, x, y, r * size, style["angle"])
    # Coverage: a one-pixel linear ramp across the edge (smooth), or a hard threshold.
    cover = np.clip(0.5 - distance, 0, 1) if style["soft"] else (distance <= 0).astype(np.float64)
    fill = np.clip(np.array(shapes.COLOURS[colour]) + style["jitter"], 0, 255)
    image = style["background"] * (1 - cover[..., None]) + fill * cover[..., None]
    return image.round().astype(np.uint8)


def _encode_picture(image: np.ndarray, rng: random.Random) -> tuple[str, bytes]:
    from PIL import Image

    if rng.random() < 0.5:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=rng.randint(40, 95))
        return "image/jpeg", buffer.getvalue()
    return "image/png", encode_png(image)


def foreign_picture(spec: shapes.ShapeSpec, rng: random.Random) -> tuple[str, bytes]:
    size = rng.choice((48, 64, 100, 128, 200, 256, 512))
    style = _foreign_style(rng)
    cx = shapes.CENTRES[spec.position] + rng.uniform(-0.05, 0.05)
    cy = 0.5 + rng.uniform(-0.08, 0.08)
    r = shapes.RADII[spec.size] * rng.uniform(0.85, 1.15)
    return _encode_picture(_rasterise(spec.shape, spec.colour, cx, cy, r, size, style), rng)


def foreign_clip(spec: shapes.MotionSpec, rng: random.Random) -> tuple[str, bytes]:
    fps = rng.choice((12, 15, 24, 30))
    n_frames = int(fps * rng.uniform(0.8, 1.5))
    size = rng.choice((40, 64, 96, 128))
    style = _foreign_style(rng)
    r = shapes.CLIP_RADIUS * rng.uniform(0.8, 1.1)
    start = np.array([rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65)])
    step = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}[spec.motion]
    travel = rng.uniform(0.35, 0.5)
    frames = []
    for t in np.linspace(-0.5, 0.5, n_frames):
        x, y = start + np.array(step) * travel * t
        frames.append(_rasterise(spec.shape, spec.colour, x, y, r, size, style))
    fmt = rng.choice(("mp4", "gif"))
    return f"video/{fmt}", encode_video(np.stack(frames), fps=fps, fmt=fmt)


def foreign_sound(spec: shapes.SoundSpec, rng: random.Random) -> tuple[str, bytes]:
    """Beeps with an attack-decay envelope and vibrato; a buzz is a sawtooth-like stack of every
    harmonic, not the training's odd ones."""
    import soundfile as sf

    rate = rng.choice((8000, 11025, 22050, 32000, 44100, 48000))
    n = rate
    t = np.arange(n) / rate
    pitch = shapes.PITCHES[spec.pitch] * rng.uniform(0.97, 1.03)
    phase = 2 * np.pi * pitch * t + rng.uniform(0, 0.3) * np.sin(2 * np.pi * 5 * t)
    harmonics = [(1, 1.0)] if spec.timbre == "whistle" else [(k, 1 / k) for k in range(1, 7)]
    tone = sum(a * np.sin(k * phase) for k, a in harmonics)
    tone /= np.abs(tone).max()
    envelope = np.zeros(n)
    start = rng.uniform(0.03, 0.1)
    length = shapes.LENGTHS[spec.length] * rng.uniform(0.9, 1.1)
    gap = rng.uniform(0.06, 0.09)
    for _ in range(shapes.COUNTS.index(spec.count) + 1):
        a, b = int(start * rate), min(n, int((start + length) * rate))
        k = np.arange(b - a) / rate
        envelope[a:b] = np.minimum(1, k / 0.01) * np.exp(-k * rng.uniform(0.5, 3))
        start += length + gap
    samples = rng.uniform(0.2, 0.9) * tone * envelope
    samples = samples + rng.uniform(0, 0.01) * np.random.default_rng(rng.randrange(2**32)).standard_normal(n)
    if rng.random() < 0.5:
        samples = np.stack([samples, samples * rng.uniform(0.5, 1)], axis=1)
    if rng.random() < 0.5:
        buffer = io.BytesIO()
        sf.write(buffer, np.clip(samples, -1, 1).astype(np.float32), rate, format="FLAC")
        return "flac", buffer.getvalue()
    return "wav", encode_wav(samples.astype(np.float32), rate)


# --- the same, from the training renderers ---------------------------------------------------------


def held_out_picture(spec: shapes.ShapeSpec, rng: random.Random) -> tuple[str, bytes]:
    varied = rng.random() < 0.5
    image = shapes.render(spec, rng.choice((48, 64, 96, 128)) if varied else IMAGE_SIZE, rng, varied)
    return "image/png", encode_png(image)


def held_out_clip(spec: shapes.MotionSpec, rng: random.Random) -> tuple[str, bytes]:
    varied = rng.random() < 0.5
    clip = shapes.render_clip(spec, rng.randint(6, 16) if varied else 8, rng.choice((32, 48, 64)) if varied else 32, rng, varied)
    return "video/mp4", encode_video(clip, fps=8)


def held_out_sound(spec: shapes.SoundSpec, rng: random.Random) -> tuple[str, bytes]:
    return "wav", encode_wav(*shapes.synthesize(spec, rng, varied=rng.random() < 0.5))


# --- understanding ----------------------------------------------------------------------------------


def _part(modality: str, mime: str, data: bytes) -> dict:
    encoded = base64.b64encode(data).decode()
    if modality == "audio":
        return {"type": "input_audio", "input_audio": {"data": encoded, "format": mime}}
    key = "image_url" if modality == "image" else "video_url"
    return {"type": key, key: {"url": f"data:{mime};base64,{encoded}"}}


QUESTIONS = {"image": "What is in this image?", "video": "What happens in this video?", "audio": "What do you hear?"}


def _question(modality: str, mime: str, data: bytes) -> dict:
    """A user message: the medium and the question about it."""
    return {"role": "user", "content": [_part(modality, mime, data), {"type": "text", "text": QUESTIONS[modality]}]}


def _ask(pipeline: LocalPipeline, modality: str, mime: str, data: bytes) -> str:
    return pipeline.chat([_question(modality, mime, data)], max_tokens=16).text


def _shares(rows: list[dict[str, bool]]) -> dict[str, float]:
    return {key: sum(row[key] for row in rows) / len(rows) for key in rows[0]}


def image_captions(pipeline: LocalPipeline, make: Callable, n: int, seed: str) -> dict[str, float]:
    rng, rows = random.Random(seed), []
    for _ in range(n):
        spec = shapes.random_spec(rng)
        answer = _ask(pipeline, "image", *make(spec, rng))
        named = shapes.parse_caption(answer) or (None, None)
        size, place = shapes.parse_place(answer)
        rows.append({
            "colour": named[0] == spec.colour,
            "shape": named[1] == spec.shape,
            "colour and shape": named == (spec.colour, spec.shape),
            "place": place == spec.position,
            "size": size == spec.size,
        })
    return _shares(rows)


def video_captions(pipeline: LocalPipeline, make: Callable, n: int, seed: str) -> dict[str, float]:
    rng, rows = random.Random(seed), []
    for _ in range(n):
        spec = shapes.random_motion(rng)
        named = shapes.parse_motion(_ask(pipeline, "video", *make(spec, rng))) or shapes.MotionSpec("", "", "")
        rows.append({
            "colour": named.colour == spec.colour,
            "shape": named.shape == spec.shape,
            "motion": named.motion == spec.motion,
            "colour, shape and motion": named == spec,
        })
    return _shares(rows)


def audio_captions(pipeline: LocalPipeline, make: Callable, n: int, seed: str) -> dict[str, float]:
    rng, rows = random.Random(seed), []
    for _ in range(n):
        spec = shapes.random_sound(rng)
        named = shapes.parse_sound(_ask(pipeline, "audio", *make(spec, rng))) or shapes.SoundSpec("", "", "", "")
        rows.append({
            "pitch": named.pitch == spec.pitch,
            "length": named.length == spec.length,
            "count": named.count == spec.count,
            "timbre": named.timbre == spec.timbre,
            "all four": named == spec,
        })
    return _shares(rows)


# --- generation ---------------------------------------------------------------------------------------


def shape_classifier(seed: int = 0, steps: int = 600) -> tuple[nn.Module, float]:
    """A small CNN that names the shape in a picture of the shapes world, and its accuracy on
    500 held-out renders."""
    rng = random.Random(f"classifier/{seed}")
    torch.manual_seed(seed)

    def data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        specs = [shapes.random_spec(rng) for _ in range(n)]
        images = np.stack([shapes.render(s, IMAGE_SIZE, rng) for s in specs])
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        return x, torch.tensor([shapes.SHAPES.index(s.shape) for s in specs])

    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(64, len(shapes.SHAPES)),
    )
    x, y = data(4000)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    test_x, test_y = data(500)
    with torch.no_grad():
        accuracy = float((model(test_x).argmax(1) == test_y).float().mean())
    return model, accuracy


def classify(model: nn.Module, images: list[np.ndarray]) -> list[str]:
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        return [shapes.SHAPES[i] for i in model(x).argmax(1).tolist()]


def _make(pipeline: LocalPipeline, prompt: str, modality: str, seed: int):
    result = pipeline.chat([{"role": "user", "content": prompt}], max_tokens=16, seed=seed, modalities=[modality])
    return result.media[0]


def drawings(pipeline: LocalPipeline, classifier: nn.Module, n: int, seed: int) -> dict[str, float]:
    rng = random.Random(f"held-out prompts/{seed}")
    asked, images = [], []
    for i in range(n):
        prompt, spec = shapes.instruction(rng)
        asked.append(spec)
        images.append(_make(pipeline, prompt, "image", i).array)
    drawn = classify(classifier, images)
    rows = [
        {
            "colour": shapes.dominant_colour(image) == spec.colour,
            "shape": shape == spec.shape,
            "place": shapes.place(image) == spec.position,
            "size": shapes.size_of(image) == spec.size,
        }
        for image, shape, spec in zip(images, drawn, asked)
    ]
    for row in rows:
        row["colour and shape"] = row["colour"] and row["shape"]
    return _shares(rows)


def drawings_after_a_caption(pipeline: LocalPipeline, n: int, seed: int) -> dict[str, float]:
    """A held-out picture captioned, then, in the same chat, a drawing asked for in another colour:
    is the drawing the colour asked, not the picture's?"""
    rng, rows = random.Random(f"earlier turns/{seed}"), []
    for i in range(n):
        shown = shapes.random_spec(rng)
        mime, data = held_out_picture(shown, rng)
        question = _question("image", mime, data)
        caption = pipeline.chat([question], max_tokens=16, seed=i).text
        colour = rng.choice([c for c in shapes.COLOURS if c != shown.colour])
        chat = [question, {"role": "assistant", "content": caption}, {"role": "user", "content": f"Draw a {colour} {rng.choice(shapes.SHAPES)}"}]
        drawing = pipeline.chat(chat, max_tokens=16, seed=i, modalities=["image"]).media[0].array
        rows.append({"colour": shapes.dominant_colour(drawing) == colour})
    return _shares(rows)


def generated_videos(pipeline: LocalPipeline, n: int, seed: int) -> dict[str, float]:
    rng, rows = random.Random(f"held-out video prompts/{seed}"), []
    for i in range(n):
        prompt, spec = shapes.video_instruction(rng)
        frames = _make(pipeline, prompt, "video", i).array
        colour, motion = shapes.dominant_colour(frames), shapes.motion_of(frames)
        rows.append({"colour": colour == spec.colour, "motion": motion == spec.motion})
        rows[-1]["colour and motion"] = rows[-1]["colour"] and rows[-1]["motion"]
    return _shares(rows)


def generated_sounds(pipeline: LocalPipeline, n: int, seed: int) -> dict[str, float]:
    rng, rows = random.Random(f"held-out sound prompts/{seed}"), []
    for i in range(n):
        prompt, spec = shapes.sound_instruction(rng)
        media = _make(pipeline, prompt, "audio", i)
        pitch, length = shapes.pitch_of(media.array, media.rate), shapes.length_of(media.array, media.rate)
        count = shapes.count_of(media.array, media.rate)
        rows.append({"pitch": pitch == spec.pitch, "length": length == spec.length, "count": count == spec.count})
        rows[-1]["pitch and length"] = rows[-1]["pitch"] and rows[-1]["length"]
    return _shares(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset-dir", help="a preset written by `omnistage train shapes` (default: the shipped one)")
    parser.add_argument("-n", type=int, default=200, help="items per set (default: 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(2)

    start = time.monotonic()
    classifier, classifier_accuracy = shape_classifier(args.seed)
    print(f"shape classifier: {classifier_accuracy:.1%} right on 500 held-out renders", flush=True)
    pipeline = LocalPipeline(preset_config(args.preset_dir)) if args.preset_dir else LocalPipeline.from_config("shapes")
    n, seed = args.n, args.seed
    sections = {
        "image captions, held-out": image_captions(pipeline, held_out_picture, n, f"held-out pictures/{seed}"),
        "image captions, foreign": image_captions(pipeline, foreign_picture, n, f"foreign pictures/{seed}"),
        "video captions, held-out": video_captions(pipeline, held_out_clip, n, f"held-out clips/{seed}"),
        "video captions, foreign": video_captions(pipeline, foreign_clip, n, f"foreign clips/{seed}"),
        "audio captions, held-out": audio_captions(pipeline, held_out_sound, n, f"held-out sounds/{seed}"),
        "audio captions, foreign": audio_captions(pipeline, foreign_sound, n, f"foreign sounds/{seed}"),
        "drawings": drawings(pipeline, classifier, n, seed),
        "drawings after a captioned picture": drawings_after_a_caption(pipeline, n // 2, seed),
        "generated video": generated_videos(pipeline, n, seed),
        "generated audio": generated_sounds(pipeline, n, seed),
    }
    results = {f"{section}: {key}": value for section, values in sections.items() for key, value in values.items()}
    record = {
        "n": n,
        "seed": seed,
        "results": results,
        "shape classifier on renders": classifier_accuracy,
        "seconds": round(time.monotonic() - start, 1),
    }
    print(json.dumps(record, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
    for key, target in TARGETS.items():
        got = results[key]
        print(f"{key}: {got:.1%} (target {target:.0%}) {'met' if got >= target else 'MISSED'}")


if __name__ == "__main__":
    main()
