"""The shapes world: coloured shapes on plain backgrounds, their captions and drawing instructions.

It is small enough to learn on a CPU in minutes and rich enough that each stage has a job: the
encoder must see colour, shape, place and size; the LLM must say them; the generator must draw
them. One object per picture, described by four attributes::

    >>> spec = ShapeSpec("red", "circle", "left", "big")
    >>> caption(spec)
    'a big red circle on the left'

Instructions ("draw a blue square") may leave size and place out; the picture they ask for then
has the defaults, a big shape in the middle (``canonical``), and that is what the trained
preset draws.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = ("left", "middle", "right")
SIZES = ("small", "big")
DEFAULT_POSITION, DEFAULT_SIZE = "middle", "big"

QUESTIONS = (
    "What is in this image?",
    "Describe the image.",
    "What do you see?",
    "Caption this picture.",
    "Describe this picture.",
    "",
)
DRAW_VERBS = ("draw", "paint", "make a picture of", "show me", "generate an image of", "create a picture of")

# Every word the captions, questions and instructions use; the word-level tokenizers know these
# and map anything else to <unk>.
WORDS = sorted(
    {
        *COLOURS,
        *SHAPES,
        *POSITIONS,
        *SIZES,
        *"a an the on in of is it this that me what do you see here please picture image photo".split(),
        *"describe caption draw paint make show generate create there shape".split(),
        *"? . , !".split(),
    }
)


@dataclass(frozen=True)
class ShapeSpec:
    colour: str
    shape: str
    position: str
    size: str


def caption(spec: ShapeSpec) -> str:
    place = "in the middle" if spec.position == "middle" else f"on the {spec.position}"
    return f"a {spec.size} {spec.colour} {spec.shape} {place}"


def canonical(colour: str, shape: str, position: str | None = None, size: str | None = None) -> ShapeSpec:
    """The picture an instruction asks for: attributes it leaves out take their defaults."""
    return ShapeSpec(colour, shape, position or DEFAULT_POSITION, size or DEFAULT_SIZE)


def random_spec(rng: random.Random) -> ShapeSpec:
    return ShapeSpec(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(POSITIONS), rng.choice(SIZES))


def instruction(rng: random.Random) -> tuple[str, ShapeSpec]:
    """A drawing instruction, each optional attribute said half the time, and the picture it asks for."""
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    size = rng.choice(SIZES) if rng.random() < 0.5 else None
    position = rng.choice(POSITIONS) if rng.random() < 0.5 else None
    words = [size] if size else []
    words += [colour, shape]
    words = [rng.choice(DRAW_VERBS), "an" if words[0][0] in "aeiou" else "a", *words]
    if position:
        words.append("in the middle" if position == "middle" else f"on the {position}")
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choice(("", ".")), canonical(colour, shape, position, size)


def render(spec: ShapeSpec, size: int, rng: random.Random) -> np.ndarray:
    """(size, size, 3) uint8: ``spec`` on a light grey background, with small random jitter in
    place, size, colour and background so that no two pictures are the same."""
    from PIL import Image, ImageDraw

    scale = 4  # drawn 4x larger and reduced: anti-aliased edges
    big = size * scale
    grey = rng.randint(200, 245)
    image = Image.new("RGB", (big, big), (grey, grey, grey))
    colour = tuple(int(np.clip(c + rng.randint(-12, 12), 0, 255)) for c in COLOURS[spec.colour])
    cx = big * ({"left": 0.25, "middle": 0.5, "right": 0.75}[spec.position] + rng.uniform(-0.03, 0.03))
    cy = big * (0.5 + rng.uniform(-0.06, 0.06))
    r = big * {"small": 0.11, "big": 0.2}[spec.size] * rng.uniform(0.9, 1.1)
    draw = ImageDraw.Draw(image)
    if spec.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif spec.shape == "square":
        h = 0.85 * r
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=colour)
    elif spec.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=colour)
    elif spec.shape == "cross":
        w = 0.3 * r
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
    else:
        raise ValueError(f"expected a shape in {SHAPES}, got {spec.shape!r}")
    return np.asarray(image.resize((size, size), Image.Resampling.BOX))


_CAPTION = re.compile(
    rf"\b({'|'.join(SIZES)})?\s*({'|'.join(COLOURS)})\s+({'|'.join(SHAPES)})\b"
)


def parse_caption(text: str) -> tuple[str, str] | None:
    """(colour, shape) named in a caption or answer, or None if it names none."""
    match = _CAPTION.search(text.lower())
    return (match.group(2), match.group(3)) if match else None


def saturated(images: np.ndarray, min_saturation: int = 60) -> np.ndarray:
    """Boolean mask, one per pixel of (..., 3) uint8 images: true on the shapes, false on the grey
    background (whose channels are equal)."""
    pixels = images.astype(np.int32)
    return pixels.max(axis=-1) - pixels.min(axis=-1) >= min_saturation


def dominant_colour(image: np.ndarray) -> str | None:
    """The palette colour nearest to the mean of the image's saturated pixels, or None when no
    pixel is saturated."""
    pixels = image.reshape(-1, 3)
    saturated_pixels = pixels[saturated(pixels)]
    if len(saturated_pixels) == 0:
        return None
    mean = saturated_pixels.mean(axis=0)
    names = list(COLOURS)
    distances = [np.linalg.norm(mean - np.array(COLOURS[name])) for name in names]
    return names[int(np.argmin(distances))]


def build_word_tokenizer(extra_special: list[str], model_max_length: int):
    """A word-level fast tokenizer over ``WORDS`` (lower-cased, punctuation split off), with
    ``<pad>``, ``</s>``, ``<unk>`` and ``extra_special`` as special tokens. It needs no vocabulary
    download and keeps captions a handful of tokens long."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate([*specials, *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )
    fast.add_tokens(extra_special, special_tokens=True)
    return fast
