"""The shapes world: coloured shapes on plain backgrounds, shapes that move, and beeps; their
captions, instructions, renderers, and measures that judge media without any model.

It is small enough to learn on a CPU in minutes and rich enough that each stage has a job: the
encoders must see colour, shape, place, size and motion and hear pitch, length, count and
timbre; the LLM must say them; the generators must draw and play them. Three kinds of media:

    >>> caption(ShapeSpec("red", "circle", "left", "big"))
    'a big red circle on the left'
    >>> motion_caption(MotionSpec("blue", "square", "right"))
    'a blue square moving to the right'
    >>> sound_caption(SoundSpec("two", "short", "high", "whistle"))
    'two short high whistles'

Drawing instructions ("draw a blue square") may leave size and place out; the picture they ask
for then has the defaults, a big shape in the middle (``canonical``), and that is what the
trained preset draws. ``render``, ``render_clip`` and ``synthesize`` make the media the
generators learn (one house style); ``varied=True`` makes them as other people's tools would
(any light background, any size, hard or soft edges, small rotations, JPEG artefacts; other
sample rates, stereo, quiet noise), which is what the encoders learn from.
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
# Where a picture's place and size put the shape: centre as a fraction of the width, radius as a
# fraction of the side.
CENTRES = {"left": 0.25, "middle": 0.5, "right": 0.75}
RADII = {"small": 0.11, "big": 0.2}

# Video: a shape moving one way, or standing still, over the clip.
MOTIONS = ("left", "right", "up", "down", "still")
MOTION_PHRASES = {
    "left": "moving to the left",
    "right": "moving to the right",
    "up": "moving up",
    "down": "moving down",
    "still": "standing still",
}
# Audio: one to three beeps of a pitch, a length and a timbre. Pitches an octave apart, so a
# spectrum names them without doubt; lengths three times apart, so an envelope does.
# Whole cycles in every 10 ms (the audio generator's mel hop): a tone's phase at each frame's start
# is then the same, so the vocoder can learn each frame's waveform from that frame's spectrum. At
# 220/440/880 Hz the phase drifts from frame to frame and is not in the spectrum: trained on them,
# the vocoder learned to stay nearly silent.
PITCHES = {"low": 200.0, "middle": 400.0, "high": 800.0}
LENGTHS = {"short": 0.08, "long": 0.22}
COUNTS = ("one", "two", "three")
TIMBRES = ("whistle", "buzz")
PLURALS = {"whistle": "whistles", "buzz": "buzzes"}
SOUND_RATE = 16000
SOUND_SECONDS = 1.0
GAP_S = 0.07  # silence between two beeps
ONSET_S = 0.05  # silence before the first

QUESTIONS = (
    "What is in this image?",
    "Describe the image.",
    "What do you see?",
    "Caption this picture.",
    "Describe this picture.",
    "Describe this image.",
    "",
)
VIDEO_QUESTIONS = (
    "What happens in this video?",
    "Describe the video.",
    "What do you see?",
    "What is moving?",
    "Caption this video.",
    "Describe this video.",
    "",
)
AUDIO_QUESTIONS = ("What do you hear?", "Describe the sound.", "What is this sound?", "Caption this sound.", "Describe this audio.", "")
DRAW_VERBS = ("draw", "paint", "make a picture of", "show me", "generate an image of", "create a picture of")
VIDEO_VERBS = ("make a video of", "show me a video of", "generate a video of", "animate")
SOUND_VERBS = ("play", "make a sound of", "let me hear", "generate a sound of")

# Every word the captions, questions and instructions use; the word-level tokenizers know these
# and map anything else to <unk>.
WORDS = sorted(
    {
        *COLOURS,
        *SHAPES,
        *POSITIONS,
        *SIZES,
        *MOTIONS,
        *PITCHES,
        *LENGTHS,
        *COUNTS,
        *TIMBRES,
        *PLURALS.values(),
        *"a an the on in of is it this that me what do you see here please picture image photo".split(),
        *"describe caption draw paint make show generate create there shape".split(),
        *"video moving to standing happens animate sound audio hear play let are".split(),
        *"? . , !".split(),
    }
)


@dataclass(frozen=True)
class ShapeSpec:
    colour: str
    shape: str
    position: str
    size: str


@dataclass(frozen=True)
class MotionSpec:
    colour: str
    shape: str
    motion: str


@dataclass(frozen=True)
class SoundSpec:
    count: str
    length: str
    pitch: str
    timbre: str


def caption(spec: ShapeSpec) -> str:
    place = "in the middle" if spec.position == "middle" else f"on the {spec.position}"
    return f"a {spec.size} {spec.colour} {spec.shape} {place}"


def motion_caption(spec: MotionSpec) -> str:
    return f"{_article(spec.colour)} {spec.colour} {spec.shape} {MOTION_PHRASES[spec.motion]}"


def sound_caption(spec: SoundSpec) -> str:
    noun = spec.timbre if spec.count == "one" else PLURALS[spec.timbre]
    return f"{spec.count} {spec.length} {spec.pitch} {noun}"


def canonical(colour: str, shape: str, position: str | None = None, size: str | None = None) -> ShapeSpec:
    """The picture an instruction asks for: attributes it leaves out take their defaults."""
    return ShapeSpec(colour, shape, position or DEFAULT_POSITION, size or DEFAULT_SIZE)


def random_spec(rng: random.Random) -> ShapeSpec:
    return ShapeSpec(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(POSITIONS), rng.choice(SIZES))


def random_motion(rng: random.Random) -> MotionSpec:
    return MotionSpec(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(MOTIONS))


def random_sound(rng: random.Random) -> SoundSpec:
    return SoundSpec(rng.choice(COUNTS), rng.choice(list(LENGTHS)), rng.choice(list(PITCHES)), rng.choice(TIMBRES))


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _sentence(words: list[str], rng: random.Random) -> str:
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choice(("", "."))


def instruction(rng: random.Random) -> tuple[str, ShapeSpec]:
    """A drawing instruction, each optional attribute said half the time, and the picture it asks for."""
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    size = rng.choice(SIZES) if rng.random() < 0.5 else None
    position = rng.choice(POSITIONS) if rng.random() < 0.5 else None
    words = [size] if size else []
    words += [colour, shape]
    words = [rng.choice(DRAW_VERBS), _article(words[0]), *words]
    if position:
        words.append("in the middle" if position == "middle" else f"on the {position}")
    return _sentence(words, rng), canonical(colour, shape, position, size)


def video_instruction(rng: random.Random) -> tuple[str, MotionSpec]:
    """"Make a video of a blue square moving up", and the clip it asks for."""
    spec = random_motion(rng)
    return _sentence([rng.choice(VIDEO_VERBS), motion_caption(spec)], rng), spec


def sound_instruction(rng: random.Random) -> tuple[str, SoundSpec]:
    """"Play a long low buzz" or "Play two short high whistles", and the sound it asks for."""
    spec = random_sound(rng)
    words = sound_caption(spec).split()
    if spec.count == "one" and rng.random() < 0.5:
        words[0] = "a"
    return _sentence([rng.choice(SOUND_VERBS), *words], rng), spec


# --- pictures and clips --------------------------------------------------------------------------


@dataclass(frozen=True)
class Proportions:
    """How a renderer draws each shape, relative to its radius r: the square's half side, the
    triangle's half base and how far below the centre its base lies (its apex is r above), the
    cross's half arm width."""

    square: float = 0.85
    triangle_base: float = 1.0
    triangle_drop: float = 0.8
    cross: float = 0.3

    @classmethod
    def draw(cls, rng: random.Random) -> Proportions:
        """Another renderer's: squares of 0.75 to 0.9 r, flat to tall triangles, thin to thick
        crosses, each with about the house shape's area, so that its size still reads as small or
        big. The house proportions alone taught the encoder one square and one triangle, and it
        named 42% of the shapes another renderer drew wrongly."""
        drop = rng.uniform(0.55, 0.95)
        # the house triangle's area, b * (1 + d) * r^2 = 1.8 r^2, or up to a tenth more
        base = 1.8 * rng.uniform(1.0, 1.1) / (1 + drop)
        return cls(rng.uniform(0.75, 0.9), base, drop, rng.uniform(0.26, 0.4))


HOUSE = Proportions()


def _outline(shape: str, cx: float, cy: float, r: float, angle: float, proportions: Proportions) -> list[tuple[float, float]] | None:
    """The shape's polygon, turned by ``angle`` radians about its centre; None for a circle."""
    if shape == "circle":
        return None
    if shape == "square":
        h = proportions.square * r
        points = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif shape == "triangle":
        b, d = proportions.triangle_base * r, proportions.triangle_drop * r
        points = [(0, -r), (b, d), (-b, d)]
    elif shape == "cross":
        w = proportions.cross * r
        points = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
    else:
        raise ValueError(f"expected a shape in {SHAPES}, got {shape!r}")
    cos, sin = np.cos(angle), np.sin(angle)
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in points]


@dataclass(frozen=True)
class _Style:
    """How one picture is drawn: the house style, or one of many others (``varied``)."""

    background: tuple[int, int, int]
    colour_jitter: int
    scale: int  # drawn this many times larger and reduced: anti-aliased edges; 1 for hard edges
    angle: float  # radians
    jpeg_quality: int | None
    proportions: Proportions = HOUSE

    @classmethod
    def draw(cls, rng: random.Random, varied: bool) -> _Style:
        if not varied:
            grey = rng.randint(200, 245)
            return cls((grey, grey, grey), 12, 4, 0.0, None)
        if rng.random() < 0.3:
            background = (255, 255, 255)
        else:
            # Any light colour: each channel high, so the shape stands out in saturation.
            background = tuple(rng.randint(205, 255) for _ in range(3))
        return cls(
            background,
            25,
            rng.choice((1, 4)),
            rng.uniform(-0.3, 0.3),
            rng.randint(30, 95) if rng.random() < 0.5 else None,
            Proportions.draw(rng),
        )


def _draw(shape: str, colour: str, cx: float, cy: float, r: float, size: int, style: _Style, rng: random.Random) -> np.ndarray:
    """(size, size, 3) uint8: one shape, centre (cx, cy) and radius r as fractions of the side."""
    from PIL import Image, ImageDraw

    big = size * style.scale
    image = Image.new("RGB", (big, big), style.background)
    fill = tuple(int(np.clip(c + rng.randint(-style.colour_jitter, style.colour_jitter), 0, 255)) for c in COLOURS[colour])
    x, y, radius = cx * big, cy * big, r * big
    draw = ImageDraw.Draw(image)
    outline = _outline(shape, x, y, radius, style.angle, style.proportions)
    if outline is None:
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=fill)
    else:
        draw.polygon(outline, fill=fill)
    if style.scale > 1:
        image = image.resize((size, size), Image.Resampling.BOX)
    if style.jpeg_quality is not None:
        import io

        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=style.jpeg_quality)
        image = Image.open(buffer).convert("RGB")
    return np.asarray(image)


def render(spec: ShapeSpec, size: int, rng: random.Random, varied: bool = False) -> np.ndarray:
    """(size, size, 3) uint8: ``spec`` with small random jitter in place, size and colour, so that
    no two pictures are the same. The house style is a light grey background; ``varied`` draws as
    someone else might (see ``_Style``), with a little more jitter."""
    style = _Style.draw(rng, varied)
    jitter = 0.05 if varied else 0.03
    cx = CENTRES[spec.position] + rng.uniform(-jitter, jitter)
    cy = 0.5 + rng.uniform(-0.06, 0.06) * (1.5 if varied else 1)
    r = RADII[spec.size] * rng.uniform(0.85, 1.15) if varied else RADII[spec.size] * rng.uniform(0.9, 1.1)
    return _draw(spec.shape, spec.colour, cx, cy, r, size, style, rng)


CLIP_RADIUS = 0.16
# Start and end of each motion's path (centre, as fractions of the side); a still shape stays at
# its start, anywhere near the middle.
_PATHS = {
    "left": ((0.75, 0.5), (0.25, 0.5)),
    "right": ((0.25, 0.5), (0.75, 0.5)),
    "up": ((0.5, 0.75), (0.5, 0.25)),
    "down": ((0.5, 0.25), (0.5, 0.75)),
}


def clip_path(spec: MotionSpec, n_frames: int, rng: random.Random, varied: bool = False) -> np.ndarray:
    """(n_frames, 2) centres (x, y), fractions of the side: evenly along the motion's path,
    shifted and stretched a little. ``varied`` paths, as other people's clips run, are shorter or
    longer and start anywhere that keeps both ends between 0.15 and 0.85 of the side. When every
    clip moving down went from the top third to the bottom third, the video projector read where
    a clip started more than which way it went: of 100 clips drawn elsewhere, it named the motion
    of 85, and 8 of the 15 misses were clips moving down (5 of them from the middle) named as
    moving up."""
    if spec.motion == "still":
        start = end = (rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7))
    else:
        start, end = _PATHS[spec.motion]
    start, end = np.array(start), np.array(end)
    t = np.linspace(-1, 1, n_frames)[:, None]
    if varied and spec.motion != "still":
        half = (end - start) / 2 * rng.uniform(0.6, 1.1)
        reach = np.minimum(0.35 - np.abs(half), 0.15)
        middle = 0.5 + np.array([rng.uniform(-r, r) for r in reach])
        return middle + t * half
    jitter = 0.08 if varied else 0.05
    offset = np.array([rng.uniform(-jitter, jitter), rng.uniform(-jitter, jitter)])
    stretch = rng.uniform(0.8, 1.1) if varied else 1.0
    return (start + end) / 2 + offset + t * (end - start) / 2 * stretch


def render_clip(spec: MotionSpec, n_frames: int, size: int, rng: random.Random, varied: bool = False) -> np.ndarray:
    """(n_frames, size, size, 3) uint8: the shape along its path, one style for the whole clip."""
    style = _Style.draw(rng, varied)
    r = CLIP_RADIUS * (rng.uniform(0.85, 1.15) if varied else 1.0)
    frames = [_draw(spec.shape, spec.colour, x, y, r, size, style, random.Random(rng.random())) for x, y in clip_path(spec, n_frames, rng, varied)]
    return np.stack(frames)


# --- sounds --------------------------------------------------------------------------------------


def beep_times(spec: SoundSpec, rng: random.Random, varied: bool = False) -> list[tuple[float, float]]:
    """(start, end) in seconds of each beep."""
    length = LENGTHS[spec.length] * (rng.uniform(0.9, 1.1) if varied else 1.0)
    gap = GAP_S * (rng.uniform(0.85, 1.15) if varied else 1.0)
    start = ONSET_S + rng.uniform(-0.02, 0.03) if varied else ONSET_S
    times = []
    for _ in range(COUNTS.index(spec.count) + 1):
        times.append((start, start + length))
        start += length + gap
    return times


def synthesize(spec: SoundSpec, rng: random.Random, varied: bool = False, rate: int | None = None) -> tuple[np.ndarray, int]:
    """(samples, rate): one second of the beeps. A whistle is a sine; a buzz adds the odd harmonics
    of a square wave up to the 7th. The house style is 16 kHz mono at a fixed level, each beep
    steady; ``varied`` picks another rate (8 to 48 kHz), level, slight detuning, sometimes
    stereo, and quiet noise, and half the time plays as other instruments do: a buzz with every
    harmonic at another slope, a little vibrato, beeps that fade as they sound. ``rate``
    overrides the rate either picks."""
    picked = rng.choice((8000, 16000, 22050, 44100, 48000)) if varied else SOUND_RATE
    rate = rate or picked
    n = int(SOUND_SECONDS * rate)
    t = np.arange(n) / rate
    pitch = PITCHES[spec.pitch] * (rng.uniform(0.97, 1.03) if varied else 1.0)
    harmonics = [(1, 1.0)] if spec.timbre == "whistle" else [(k, 1 / k) for k in (1, 3, 5, 7)]
    phase = 2 * np.pi * pitch * t
    decay = 0.0  # per second
    if varied and rng.random() < 0.5:
        if spec.timbre == "buzz":
            slope = rng.uniform(0.7, 1.4)
            harmonics = [(k, k**-slope) for k in range(1, rng.randint(4, 9) + 1)]
        phase = phase + rng.uniform(0, 0.4) * np.sin(2 * np.pi * rng.uniform(3, 7) * t)
        decay = rng.uniform(0, 6)
    tone = sum(a * np.sin(k * phase) for k, a in harmonics)
    envelope = np.zeros(n)
    fade = int(0.005 * rate)  # 5 ms ramps: no clicks at the edges
    for start, end in beep_times(spec, rng, varied):
        a, b = int(start * rate), min(n, int(end * rate))
        ramp = np.minimum(1, np.minimum(np.arange(b - a) + 1, b - a - np.arange(b - a)) / fade)
        envelope[a:b] = ramp * np.exp(-decay * np.arange(b - a) / rate)
    level = rng.uniform(0.15, 0.8) if varied else 0.5
    samples = level * tone / np.abs(tone).max() * envelope
    if varied:
        samples = samples + rng.uniform(0.0, 0.01) * np.random.default_rng(rng.randrange(2**32)).standard_normal(n)
        if rng.random() < 0.3:
            samples = np.stack([samples, samples * rng.uniform(0.6, 1.0)], axis=1)
    return samples.astype(np.float32), rate


# --- reading media without a model ---------------------------------------------------------------


_CAPTION = re.compile(rf"\b({'|'.join(SIZES)})?\s*({'|'.join(COLOURS)})\s+({'|'.join(SHAPES)})\b")
_MOTION = re.compile(rf"\b({'|'.join(COLOURS)})\s+({'|'.join(SHAPES)})\s+(moving to the left|moving to the right|moving up|moving down|standing still)\b")
_SOUND = re.compile(
    rf"\b(a|{'|'.join(COUNTS)})\s+({'|'.join(LENGTHS)})\s+({'|'.join(PITCHES)})\s+(whistles|whistle|buzzes|buzz)\b"
)


def parse_caption(text: str) -> tuple[str, str] | None:
    """(colour, shape) named in a caption or answer, or None if it names none."""
    match = _CAPTION.search(text.lower())
    return (match.group(2), match.group(3)) if match else None


def parse_place(text: str) -> tuple[str | None, str | None]:
    """(size, place) named in a picture's caption; None for either it does not name."""
    words = text.lower().replace(".", " ").split()
    size = next((w for w in words if w in SIZES), None)
    place = next((w for w in words if w in POSITIONS), None)
    return size, place


def parse_motion(text: str) -> MotionSpec | None:
    """The moving shape named in a video's caption, or None if it names none."""
    match = _MOTION.search(text.lower())
    if not match:
        return None
    motion = {phrase: motion for motion, phrase in MOTION_PHRASES.items()}[match.group(3)]
    return MotionSpec(match.group(1), match.group(2), motion)


def parse_sound(text: str) -> SoundSpec | None:
    """The beeps named in a sound's caption, or None if it names none ("a" counts as one)."""
    match = _SOUND.search(text.lower())
    if not match:
        return None
    count = "one" if match.group(1) == "a" else match.group(1)
    timbre = "whistle" if match.group(4).startswith("whistle") else "buzz"
    return SoundSpec(count, match.group(2), match.group(3), timbre)


def saturated(images: np.ndarray, min_saturation: int = 60) -> np.ndarray:
    """Boolean mask, one per pixel of (..., 3) uint8 images: true on the shapes, false on the light
    backgrounds (whose channels are near equal)."""
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


def centre(image: np.ndarray) -> tuple[float, float] | None:
    """(x, y) of the saturated pixels' centre, fractions of the width and height; None if none."""
    rows, columns = np.nonzero(saturated(image))
    if len(columns) == 0:
        return None
    return float(columns.mean() / image.shape[1]), float(rows.mean() / image.shape[0])


def place(image: np.ndarray) -> str | None:
    """left, middle or right: the third of the width holding the saturated pixels' centre."""
    found = centre(image)
    return None if found is None else POSITIONS[min(2, int(found[0] * 3))]


def size_of(image: np.ndarray) -> str | None:
    """small or big: whether the saturated pixels cover more of the picture than a shape halfway
    between the two sizes would (a square of that radius: the shapes' areas lie near it)."""
    area = float(saturated(image).mean())
    if area == 0:
        return None
    threshold = (0.85 * 2 * (RADII["small"] + RADII["big"]) / 2) ** 2 * 0.75
    return "big" if area > threshold else "small"


def motion_of(frames: np.ndarray, still_below: float = 0.15) -> str | None:
    """left, right, up, down or still: the way the saturated pixels' centre travels from the first
    frames to the last (a quarter of the clip each), or still when it moves less than
    ``still_below`` of the side; None when a frame shows no shape."""
    quarter = max(1, len(frames) // 4)
    centres = [centre(frame) for frame in frames]
    if any(c is None for c in centres):
        return None
    first, last = np.mean(centres[:quarter], axis=0), np.mean(centres[-quarter:], axis=0)
    dx, dy = last - first
    if max(abs(dx), abs(dy)) < still_below:
        return "still"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def _mono(samples: np.ndarray) -> np.ndarray:
    return samples.mean(axis=1) if samples.ndim == 2 else samples


def pitch_of(samples: np.ndarray, rate: int) -> str | None:
    """low, middle or high: the world's pitch nearest (in octaves) to the strongest frequency of the
    spectrum between 100 Hz and 2 kHz; None for silence."""
    mono = _mono(samples)
    if np.abs(mono).max() < 1e-3:
        return None
    spectrum = np.abs(np.fft.rfft(mono * np.hanning(len(mono))))
    freqs = np.fft.rfftfreq(len(mono), 1 / rate)
    band = (freqs >= 100) & (freqs <= 2000)
    peak = freqs[band][np.argmax(spectrum[band])]
    names = list(PITCHES)
    return names[int(np.argmin([abs(np.log2(peak / PITCHES[name])) for name in names]))]


def beeps_of(samples: np.ndarray, rate: int) -> list[float]:
    """Each beep's length in seconds, from the 10 ms RMS envelope: runs above a quarter of its
    peak, runs shorter than 30 ms dropped as clicks."""
    mono = _mono(samples)
    hop = rate // 100
    frames = len(mono) // hop
    rms = np.sqrt((mono[: frames * hop].reshape(frames, hop) ** 2).mean(axis=1))
    if frames == 0 or rms.max() < 1e-3:
        return []
    loud = np.concatenate([[False], rms > rms.max() / 4, [False]])
    edges = np.flatnonzero(np.diff(loud.astype(int)))
    runs = (edges[1::2] - edges[::2]) / 100
    return [float(r) for r in runs if r >= 0.03]


def length_of(samples: np.ndarray, rate: int) -> str | None:
    """short or long: the beeps' mean length against the geometric middle of the two lengths."""
    beeps = beeps_of(samples, rate)
    if not beeps:
        return None
    return "long" if np.mean(beeps) > np.sqrt(LENGTHS["short"] * LENGTHS["long"]) else "short"


def count_of(samples: np.ndarray, rate: int) -> str | None:
    """one, two or three beeps (None for none or more than three)."""
    n = len(beeps_of(samples, rate))
    return COUNTS[n - 1] if 1 <= n <= len(COUNTS) else None


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
