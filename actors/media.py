"""Media bytes <-> numpy arrays: the project's only place that decodes or encodes media files.

Decoders take untrusted request bytes and return arrays (image ``(H, W, 3)`` uint8, video
``(T, H, W, 3)`` uint8, audio :class:`AudioClip`). They check sizes from headers before decoding
pixels or samples, and raise only the project's errors: :class:`InvalidInputError` (400),
:class:`UnsupportedMediaError` (415) and :class:`PayloadTooLargeError` (413).

Encoders turn generated arrays into response files. A bad array there is a bug in our own
generator, not in the request, so they raise a plain ``ValueError`` (500).

The HTTP ingress and the client SDK (``omnistage.clients``) import this module: it must not import
torch, transformers, diffusers or ray, and imports scipy only where it resamples (the client-only
install has no scipy).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import math
import numbers
from collections.abc import Iterator
from fractions import Fraction

import av
import numpy as np
import soundfile as sf
from PIL import Image, ImageOps

from omnistage.actors.errors import InvalidInputError, PayloadTooLargeError, UnsupportedMediaError
from omnistage.actors.payloads import AudioClip, DecodeLimits, EncodedMedia

MIME_TYPES = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "gif": "image/gif",
    "bmp": "image/bmp",
    "wav": "audio/wav",
    "flac": "audio/flac",
    "mp3": "audio/mpeg",
    "ogg": "audio/ogg",
    "mp4": "video/mp4",
    "webm": "video/webm",
}

IMAGE_FORMATS = DecodeLimits.image_formats

# Pillow opens a JPEG that carries extra pictures (common in phone photos) as "MPO"; its first
# frame is a plain JPEG, so it is accepted wherever JPEG is.
_FORMAT_ALIASES = {"MPO": "JPEG"}
_ALPHA_MODES = ("LA", "P", "PA", "RGBA", "RGBa")
# Grayscale modes wider than 8 bits, which Pillow's convert() would clip rather than scale.
_WIDE_GRAY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_VIDEO_FORMATS = ("mp4", "gif")


def _shape_and_dtype(array: np.ndarray) -> str:
    return f"shape {array.shape} and dtype {array.dtype}"


def _is_rgb(array: np.ndarray, ndim: int) -> bool:
    """Whether ``array`` is ``(..., H, W, 3)`` uint8 with ``ndim`` dimensions, none of them 0."""
    return array.ndim == ndim and array.shape[-1] == 3 and array.dtype == np.uint8 and 0 not in array.shape


def _audio_problem(samples: np.ndarray, sampling_rate: object) -> str | None:
    """What is wrong with these samples and rate, or None if they make a valid AudioClip."""
    if samples.ndim not in (1, 2) or not np.issubdtype(samples.dtype, np.floating):
        return (
            "expected audio samples of shape (n_samples,) or (n_samples, n_channels) and a float "
            f"dtype, got {_shape_and_dtype(samples)}"
        )
    if samples.size == 0:
        return f"expected at least one audio sample, got shape {samples.shape}"
    if not np.isfinite(samples).all():
        return f"expected finite audio samples, got {np.count_nonzero(~np.isfinite(samples))} non-finite values"
    if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, numbers.Integral) or sampling_rate <= 0:
        return f"expected a positive integer sampling rate, got {sampling_rate!r}"
    return None


# --- encoding ------------------------------------------------------------------------------------


def encode_png(image: np.ndarray) -> bytes:
    """Encode an ``(H, W, 3)`` uint8 RGB array as PNG."""
    image = np.asarray(image)
    if not _is_rgb(image, ndim=3):
        raise ValueError(
            f"expected an image array of shape (height, width, 3) and dtype uint8, got {_shape_and_dtype(image)}"
        )
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_wav(samples: np.ndarray, sampling_rate: int) -> bytes:
    """Encode float samples (``(n,)``, or ``(n, channels)``) as 16-bit PCM WAV, clipped to [-1, 1]."""
    samples = np.asarray(samples)
    problem = _audio_problem(samples, sampling_rate)
    if problem:
        raise ValueError(problem)
    buffer = io.BytesIO()
    clipped = np.clip(samples, -1.0, 1.0).astype(np.float32)
    sf.write(buffer, clipped, int(sampling_rate), format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def encode_video(frames: np.ndarray, fps: float, fmt: str = "mp4") -> bytes:
    """Encode ``(T, H, W, 3)`` uint8 RGB frames as H.264 MP4 (yuv420p) or as GIF.

    yuv420p needs even sizes: an odd height or width is padded by repeating the last row or
    column, so the MP4 decodes one pixel larger in that dimension.
    """
    frames = np.asarray(frames)
    if not _is_rgb(frames, ndim=4):
        raise ValueError(
            "expected video frames of shape (n_frames, height, width, 3) and dtype uint8, "
            f"got {_shape_and_dtype(frames)}"
        )
    if not (isinstance(fps, numbers.Real) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"expected a positive finite fps, got {fps!r}")
    if fmt not in _VIDEO_FORMATS:
        raise ValueError(f"expected fmt to be one of {_VIDEO_FORMATS}, got {fmt!r}")
    if fmt == "mp4":
        _, height, width, _ = frames.shape
        frames = np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=fmt) as container:
        stream = container.add_stream("libx264" if fmt == "mp4" else "gif", rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p" if fmt == "mp4" else "pal8"
        if fmt == "mp4":
            # With x264's macroblock-tree rate control on, the same frames encoded to different
            # bytes from call to call (threading off did not help). Off, the bytes are a function
            # of the frames, which seeded training relies on.
            stream.options = {"x264-params": "mbtree=0"}
        for index, video_frame in enumerate(_mp4_frames(frames) if fmt == "mp4" else _gif_frames(frames)):
            video_frame.pts = index
            container.mux(stream.encode(video_frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def _mp4_frames(frames: np.ndarray) -> Iterator[av.VideoFrame]:
    for frame in frames:
        yield av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")


def _gif_frames(frames: np.ndarray) -> Iterator[av.VideoFrame]:
    """pal8 frames sharing one 256-colour palette that Pillow computes over the whole clip.

    The gif encoder accepts only palette formats, and rgb8 (3-3-2 bits) bands visibly. The
    palette must be shared: the encoder treats a pixel as unchanged when its palette index is,
    so per-frame palettes would leave the previous frame's colours behind.
    """
    n_frames, height, width, _ = frames.shape
    mosaic = Image.fromarray(np.ascontiguousarray(frames).reshape(n_frames * height, width, 3))
    quantized = mosaic.quantize(colors=256)
    rgb = np.asarray(quantized.getpalette(), dtype=np.uint8).reshape(-1, 3)
    palette = np.zeros((256, 4), dtype=np.uint8)  # ARGB rows, as PyAV's pal8 expects
    palette[:, 0] = 255
    palette[: len(rgb), 1:] = rgb
    for indices in np.asarray(quantized).reshape(n_frames, height, width):
        yield av.VideoFrame.from_ndarray((indices, palette), format="pal8")


# --- decoding ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _decoder_errors(kind: str, data: bytes) -> Iterator[None]:
    """Reject empty input, and turn a decoder library's own exceptions into 400/413, not 500."""
    if not data:
        raise InvalidInputError(f"expected {kind} bytes, got 0 bytes")
    try:
        yield
    except InvalidInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLargeError(
            f"expected an image within Pillow's decompression-bomb limit, got one it rejects: {exc}"
        ) from exc
    except Exception as exc:
        # Only the exception's type: library messages may quote bytes of the payload.
        raise InvalidInputError(
            f"expected a decodable {kind} file, got {len(data)} bytes that could not be decoded "
            f"({type(exc).__name__})"
        ) from exc


def parse_data_url(url: str) -> tuple[str, bytes]:
    """Split ``data:<mime>;base64,<data>`` into ``(lower-case mime, raw bytes)``."""
    expected = "expected a data URL of the form 'data:<mime>;base64,<data>'"
    if not isinstance(url, str):
        raise InvalidInputError(f"{expected}, got {type(url).__name__}")
    scheme, colon, rest = url.partition(":")
    if not colon or scheme.lower() != "data":
        received = f"a URL with scheme {scheme[:16]!r}" if colon else "a string without a scheme"
        raise InvalidInputError(f"{expected}, got {received}")
    header, comma, payload = rest.partition(",")
    mime, *params = header.split(";")
    if not comma or "base64" not in params:
        raise InvalidInputError(f"{expected}, got a data URL without ';base64,'")
    if not mime.strip():
        raise InvalidInputError(f"{expected}, got a data URL with an empty media type")
    payload = "".join(payload.split())  # some clients wrap base64 lines
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInputError(
            f"{expected}, got {len(payload)} characters of data that are not valid base64"
        ) from exc
    return mime.strip().lower(), raw


def _gray_to_uint8(image: Image.Image) -> np.ndarray:
    """A 16-bit, 32-bit integer or float grayscale image -> ``(H, W)`` uint8, scaled to 8 bits.

    Integer modes are read on the 16-bit scale (Pillow widens 16-bit files to ``I``), ``F`` on
    the [0, 1] scale of float images; only values beyond that scale saturate. Pillow's own
    ``convert("L")`` keeps the values and clips them at 255, so most of a 16-bit image turns white.
    """
    values = np.asarray(image)
    if image.mode == "F":
        if not np.isfinite(values).all():
            raise InvalidInputError(
                f"expected finite pixel values in a mode 'F' image, got {np.count_nonzero(~np.isfinite(values))} "
                "non-finite values"
            )
        gray = np.rint(np.clip(values, 0.0, 1.0) * 255)
    else:
        gray = (np.clip(values, 0, 65535).astype(np.uint32) * 255 + 32767) // 65535
    gray = gray.astype(np.uint8)
    if "transparency" in image.info:  # a 16-bit grayscale PNG keys one value as transparent
        gray[values == image.info["transparency"]] = 255
    return gray


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    """Convert a PIL image of any Pillow mode to ``(H, W, 3)`` uint8 RGB, upright as its EXIF
    orientation says; transparency is composited on white."""
    if image.width == 0 or image.height == 0:
        raise InvalidInputError(
            f"expected an image with nonzero width and height, got {image.width}x{image.height}"
        )
    image = ImageOps.exif_transpose(image)
    if image.mode in _WIDE_GRAY_MODES:
        return np.repeat(_gray_to_uint8(image)[:, :, None], 3, axis=2)
    if image.mode == "La":  # premultiplied alpha: Pillow reaches RGBA from it only through LA
        image = image.convert("LA")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    return np.array(image.convert("RGB"), dtype=np.uint8)


def _open_image(data: bytes, max_pixels: int, formats: tuple[str, ...]) -> Image.Image:
    """The image's header (Pillow opens lazily), checked against the format list and pixel limit."""
    image = Image.open(io.BytesIO(data))
    accepted = tuple(name.upper() for name in formats)
    if _FORMAT_ALIASES.get(image.format, image.format) not in accepted:
        raise UnsupportedMediaError(f"expected an image in one of the formats {accepted}, got {image.format}")
    if image.width * image.height > max_pixels:
        raise PayloadTooLargeError(
            f"expected an image of at most {max_pixels} pixels, "
            f"got {image.width}x{image.height} = {image.width * image.height} pixels"
        )
    return image


def decode_image(
    data: bytes, *, max_pixels: int = 16_777_216, formats: tuple[str, ...] = IMAGE_FORMATS
) -> np.ndarray:
    """Decode an image file to ``(H, W, 3)`` uint8 RGB (an animated image's first frame)."""
    with _decoder_errors("image", data):
        _count_decode("image")
        return _pil_to_rgb(_open_image(data, max_pixels, formats))


def to_image_array(obj: bytes | bytearray | Image.Image | np.ndarray) -> np.ndarray:
    """Image bytes, a PIL image, or an ``(H, W, 3)`` or grayscale ``(H, W)`` uint8 array ->
    C-contiguous ``(H, W, 3)`` uint8 RGB."""
    if isinstance(obj, (bytes, bytearray)):
        return decode_image(bytes(obj))
    if isinstance(obj, Image.Image):
        return _pil_to_rgb(obj)
    if isinstance(obj, np.ndarray):
        if _is_rgb(obj, ndim=3):
            return np.ascontiguousarray(obj)
        if obj.ndim == 2 and obj.dtype == np.uint8 and obj.size:
            return np.repeat(obj[:, :, None], 3, axis=2)
        raise InvalidInputError(
            "expected an image array of shape (height, width, 3) or (height, width) with nonzero "
            f"height and width and dtype uint8, got {_shape_and_dtype(obj)}"
        )
    raise InvalidInputError(f"expected image bytes, a PIL image or a numpy array, got {type(obj).__name__}")


def _checked_clip(samples: np.ndarray, sampling_rate: object) -> AudioClip:
    samples = np.asarray(samples)
    problem = _audio_problem(samples, sampling_rate)
    if problem:
        raise InvalidInputError(problem)
    return AudioClip(samples=np.ascontiguousarray(samples, dtype=np.float32), sampling_rate=int(sampling_rate))


def _check_audio_length(frames: int, samplerate: int, max_seconds: float) -> None:
    seconds = frames / samplerate
    if seconds > max_seconds:
        raise PayloadTooLargeError(f"expected audio of at most {max_seconds:g} s, got {seconds:.1f} s")


def decode_audio(data: bytes, *, max_seconds: float = 600.0) -> AudioClip:
    """Decode WAV, FLAC, MP3 or OGG (what libsndfile reads) to float32 samples.

    Mono gives shape ``(n,)``, more channels ``(n, channels)``.
    """
    with _decoder_errors("audio", data), sf.SoundFile(io.BytesIO(data)) as audio:
        _check_audio_length(audio.frames, audio.samplerate, max_seconds)
        _count_decode("audio")
        samples = audio.read(dtype="float32", always_2d=False)
        sampling_rate = audio.samplerate
    return _checked_clip(samples, sampling_rate)


def to_audio_clip(
    obj: bytes | bytearray | AudioClip | np.ndarray, sampling_rate: int | None = None
) -> AudioClip:
    """Audio bytes, an AudioClip or a float array -> validated float32 AudioClip.

    ``sampling_rate`` is required for arrays and ignored otherwise (files and clips carry theirs).
    """
    if isinstance(obj, (bytes, bytearray)):
        return decode_audio(bytes(obj))
    if isinstance(obj, AudioClip):
        return _checked_clip(obj.samples, obj.sampling_rate)
    if isinstance(obj, np.ndarray):
        if sampling_rate is None:
            raise InvalidInputError(
                f"expected a sampling rate with an audio array of shape {obj.shape}, got None"
            )
        return _checked_clip(obj, sampling_rate)
    raise InvalidInputError(f"expected audio bytes, an AudioClip or a numpy array, got {type(obj).__name__}")


def to_mono_16k(clip: AudioClip, target_rate: int = 16000) -> np.ndarray:
    """Average channels to mono and resample to ``target_rate`` -> ``(n,)`` float32."""
    samples = clip.samples.mean(axis=1) if clip.samples.ndim == 2 else clip.samples
    divisor = math.gcd(clip.sampling_rate, target_rate)
    up, down = target_rate // divisor, clip.sampling_rate // divisor
    if up != down:
        # Imported here: the client SDK reuses this module's codecs and installs without scipy.
        from scipy.signal import resample_poly

        samples = resample_poly(samples, up, down)
    return np.asarray(samples, dtype=np.float32)


def _check_frame_size(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise PayloadTooLargeError(
            f"expected video frames of at most {max_pixels} pixels, "
            f"got {width}x{height} = {width * height} pixels"
        )


def _video_stream(container: av.container.InputContainer, max_frames: int, max_pixels_per_frame: int) -> av.video.stream.VideoStream:
    """The first video stream, checked against the limits its header states (the frame count is
    0 where the container keeps none; the count while reading is what holds)."""
    if not container.streams.video:
        kinds = ", ".join(stream.type for stream in container.streams) or "none"
        raise InvalidInputError(f"expected a file with a video stream, got streams: {kinds}")
    stream = container.streams.video[0]
    _check_frame_size(stream.codec_context.width, stream.codec_context.height, max_pixels_per_frame)
    if stream.frames > max_frames:
        raise PayloadTooLargeError(f"expected a video of at most {max_frames} frames, got {stream.frames} frames")
    return stream


def _upright(frame: av.VideoFrame, **size: int) -> np.ndarray:
    """The frame as ``(H, W, 3)`` uint8 RGB, turned the way its container says it is shown.

    Phones store a portrait clip as landscape frames plus a display matrix that rotates them, as
    EXIF does for photos; players apply it, so the encoder must see what a person saw. PyAV reads
    the matrix as a counter-clockwise angle, which ``np.rot90`` turns by in quarter turns."""
    array = frame.to_ndarray(format="rgb24", **size)
    quarters = round(frame.rotation / 90) % 4
    return np.ascontiguousarray(np.rot90(array, quarters)) if quarters else array


def decode_video(
    data: bytes, *, max_frames: int = 3600, max_pixels_per_frame: int = 16_777_216
) -> np.ndarray:
    """Decode the first video stream to ``(T, H, W, 3)`` uint8 RGB, upright.

    Frames whose size changes mid-stream are scaled to the first frame's size.
    """
    frames: list[np.ndarray] = []
    with _decoder_errors("video", data), av.open(io.BytesIO(data), mode="r") as container:
        stream = _video_stream(container, max_frames, max_pixels_per_frame)
        _count_decode("video")
        for frame in container.decode(stream):
            if len(frames) == max_frames:
                raise PayloadTooLargeError(f"expected a video of at most {max_frames} frames, got more")
            _check_frame_size(frame.width, frame.height, max_pixels_per_frame)
            if not frames:
                first = frame
            frames.append(_upright(frame, height=first.height, width=first.width))
    if not frames:
        raise InvalidInputError(f"expected a video with at least one frame, got 0 frames in {len(data)} bytes")
    return np.stack(frames)


def sample_frame_indices(n_frames: int, n_samples: int) -> np.ndarray:
    """``n_samples`` indices spread evenly from the first to the last frame (repeats if too few)."""
    return np.linspace(0, n_frames - 1, n_samples).round().astype(int)


def decode_video_frames(
    data: bytes, n_samples: int, *, max_frames: int = 3600, max_pixels_per_frame: int = 16_777_216
) -> np.ndarray:
    """Decode only the ``n_samples`` frames spread evenly over the video -> ``(n_samples, H, W, 3)``
    uint8 RGB, upright: the same frames as ``decode_video(data)[sample_frame_indices(T, n_samples)]``.

    The frames are counted from the demuxed packets, without decoding; then the decoder seeks to
    the keyframe before each sampled frame and decodes up to it, so memory holds one frame at a time
    whatever the video's length, and a long video costs a few keyframe intervals of decoding.
    """
    with _decoder_errors("video", data), av.open(io.BytesIO(data), mode="r") as container:
        stream = _video_stream(container, max_frames, max_pixels_per_frame)
        times = []
        for packet in container.demux(stream):
            if packet.size:
                if len(times) == max_frames:
                    raise PayloadTooLargeError(f"expected a video of at most {max_frames} frames, got more")
                times.append(packet.pts)
        if not times:
            raise InvalidInputError(f"expected a video with at least one frame, got 0 frames in {len(data)} bytes")
        _count_decode("video")
        indices = sample_frame_indices(len(times), n_samples).tolist()
        if None in times:
            # No timestamps to seek by (some raw streams): read through once, keeping the samples.
            container.seek(0)
            wanted = set(indices)
            kept = {i: frame for i, frame in enumerate(container.decode(stream)) if i in wanted}
            frames = [kept[i] for i in indices]
        else:
            order = sorted(times)
            frames = [_frame_at(container, stream, order[i]) for i in indices]
        first = frames[0]
        for frame in frames:
            _check_frame_size(frame.width, frame.height, max_pixels_per_frame)
        return np.stack([_upright(f, height=first.height, width=first.width) for f in frames])


def _frame_at(container: av.container.InputContainer, stream: av.video.stream.VideoStream, pts: int) -> av.VideoFrame:
    """The frame shown at ``pts``: seek to the keyframe before it, decode forward to it."""
    container.seek(pts, stream=stream, backward=True, any_frame=False)
    last = None
    for frame in container.decode(stream):
        if frame.pts is not None and frame.pts > pts and last is not None:
            return last
        last = frame
        if frame.pts == pts:
            return frame
    if last is None:
        raise InvalidInputError(f"expected a frame at timestamp {pts}, got none")
    return last


def probe(item: EncodedMedia) -> None:
    """What can be checked of ``item`` without decoding a pixel or a sample: that it opens as its
    modality, its format, and the sizes its header declares. Raises the errors decoding would."""
    data, limits = item.data, item.limits
    if item.modality == "image":
        with _decoder_errors("image", data):
            _open_image(data, limits.max_image_pixels, limits.image_formats)
    elif item.modality == "audio":
        with _decoder_errors("audio", data):
            info = sf.info(io.BytesIO(data))
            _check_audio_length(info.frames, info.samplerate, limits.max_audio_seconds)
    else:
        with _decoder_errors("video", data), av.open(io.BytesIO(data), mode="r") as container:
            _video_stream(container, limits.max_video_frames, limits.max_video_frame_pixels)


def decode(item: EncodedMedia, video_frames: int | None = None) -> np.ndarray | AudioClip:
    """Decode ``item`` within its limits; of a video only ``video_frames`` sampled frames (all if None)."""
    data, limits = item.data, item.limits
    if item.modality == "image":
        return decode_image(data, max_pixels=limits.max_image_pixels, formats=limits.image_formats)
    if item.modality == "audio":
        return decode_audio(data, max_seconds=limits.max_audio_seconds)
    video = {"max_frames": limits.max_video_frames, "max_pixels_per_frame": limits.max_video_frame_pixels}
    if video_frames is None:
        return decode_video(data, **video)
    return decode_video_frames(data, video_frames, **video)


_decoded: dict[str, int] = {}


def _count_decode(modality: str) -> None:
    _decoded[modality] = _decoded.get(modality, 0) + 1


def decoded_counts() -> dict[str, int]:
    """Media files this process has decoded, per modality (the ingress shows it decodes none)."""
    return dict(_decoded)


def to_video_array(obj: bytes | bytearray | list | tuple | np.ndarray) -> np.ndarray:
    """Video bytes, a list of frames (PIL images or uint8 arrays, as :func:`to_image_array`
    takes them) or a ``(T, H, W, 3)`` uint8 array -> C-contiguous ``(T, H, W, 3)`` uint8 RGB."""
    if isinstance(obj, (bytes, bytearray)):
        return decode_video(bytes(obj))
    if isinstance(obj, (list, tuple)):
        if not obj:
            raise InvalidInputError("expected at least one video frame, got 0 frames")
        frames = []
        for index, item in enumerate(obj):
            if not isinstance(item, (Image.Image, np.ndarray)):
                raise InvalidInputError(
                    f"expected frame {index} to be a PIL image or a numpy array, got {type(item).__name__}"
                )
            try:
                frames.append(to_image_array(item))
            except InvalidInputError as exc:
                raise InvalidInputError(f"frame {index}: {exc}") from exc
            if frames[-1].shape != frames[0].shape:
                (height, width, _), (got_height, got_width, _) = frames[0].shape, frames[-1].shape
                raise InvalidInputError(
                    f"expected every frame to have frame 0's size {width}x{height}, "
                    f"got frame {index} of size {got_width}x{got_height}"
                )
        return np.stack(frames)
    if isinstance(obj, np.ndarray):
        if _is_rgb(obj, ndim=4):
            return np.ascontiguousarray(obj)
        raise InvalidInputError(
            "expected a video array of shape (n_frames, height, width, 3) with no zero dimension "
            f"and dtype uint8, got {_shape_and_dtype(obj)}"
        )
    raise InvalidInputError(f"expected video bytes, a list of frames or a numpy array, got {type(obj).__name__}")
