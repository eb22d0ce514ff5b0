"""Tests for omnistage.actors.media. Every input is built here; nothing is read from disk."""

import base64
import hashlib
import io
import json
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from omnistage.actors.errors import InvalidInputError, PayloadTooLargeError, UnsupportedMediaError
from omnistage.actors.media import (
    MIME_TYPES,
    decode_audio,
    decode_image,
    decode_video,
    encode_png,
    encode_video,
    encode_wav,
    parse_data_url,
    probe,
    to_audio_clip,
    to_image_array,
    to_mono_16k,
    to_video_array,
)
from omnistage.actors.payloads import AudioClip, EncodedMedia

RED = (200, 30, 100)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def pil_bytes(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR says width x height (CRC recomputed, so the header is valid)."""
    data = bytearray(pil_bytes(Image.new("L", (1, 1)), "PNG"))
    ihdr = 8 + 4  # signature, then the IHDR chunk's length field
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


def wav_bytes(samples: np.ndarray, rate: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def flat_video(n_frames: int = 4, height: int = 16, width: int = 16) -> np.ndarray:
    frames = np.empty((n_frames, height, width, 3), dtype=np.uint8)
    frames[...] = RED
    return frames


def matroska_video(n_video_frames: int) -> bytes:
    """An MKV with one video stream (no frame count in the header) and one audio packet."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="matroska") as container:
        video = container.add_stream("mpeg4", rate=10)
        video.width, video.height, video.pix_fmt = 16, 16, "yuv420p"
        audio = container.add_stream("pcm_s16le", rate=8000)
        audio_frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        audio_frame.sample_rate, audio_frame.pts = 8000, 0
        container.mux(audio.encode(audio_frame))
        container.mux(audio.encode(None))
        for index in range(n_video_frames):
            frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
            frame.pts = index
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
    return buffer.getvalue()


# --- encoders and round trips ------------------------------------------------------------------


def test_mime_types_cover_encoder_outputs():
    assert MIME_TYPES["png"] == "image/png"
    assert MIME_TYPES["wav"] == "audio/wav"
    assert MIME_TYPES["mp4"] == "video/mp4"
    assert MIME_TYPES["gif"] == "image/gif"


def test_png_round_trip_is_exact(rng):
    image = rng.integers(0, 256, size=(13, 17, 3), dtype=np.uint8)
    data = encode_png(image)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    np.testing.assert_array_equal(decode_image(data), image)


def test_wav_round_trip_within_one_lsb(rng):
    samples = rng.uniform(-1, 1, size=4000).astype(np.float32)
    clip = decode_audio(encode_wav(samples, 22050))
    assert clip.sampling_rate == 22050
    assert clip.samples.dtype == np.float32 and clip.samples.shape == samples.shape
    assert np.abs(clip.samples - samples).max() <= 1 / 32767


def test_wav_clips_out_of_range_samples():
    clip = decode_audio(encode_wav(np.array([2.0, -3.0, 0.5], dtype=np.float32), 8000))
    np.testing.assert_allclose(clip.samples, [1.0, -1.0, 0.5], atol=1 / 32767)


def test_mp4_round_trip_flat_colour():
    frames = flat_video(n_frames=5, height=16, width=24)
    data = encode_video(frames, fps=8)
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
    decoded = decode_video(data)
    assert decoded.shape == (5, 16, 24, 3)
    assert np.abs(decoded.astype(int) - frames).max() <= 4


def test_mp4_pads_odd_size_to_even():
    decoded = decode_video(encode_video(flat_video(n_frames=3, height=9, width=11), fps=10))
    assert decoded.shape == (3, 10, 12, 3)
    assert np.abs(decoded.astype(int) - RED).max() <= 4  # the padding repeats the edge colour


def _moving_square(seed: int, n_frames: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    frames = np.empty((n_frames, size, size, 3), np.uint8)
    frames[:] = rng.integers(180, 256, 3, dtype=np.uint8)
    x, y = rng.integers(0, size // 2, 2)
    colour = rng.integers(0, 256, 3, dtype=np.uint8)
    for t in range(n_frames):
        frames[t, y : y + size // 4, x + 2 * t : x + 2 * t + size // 4] = colour
    return frames


def test_mp4_bytes_depend_only_on_the_frames():
    """Seeded training encodes clips as MP4; x264's defaults gave the same frames different
    bytes from one call to the next. The held buffers leave the heap different between calls."""
    clips = [_moving_square(seed, n, size) for seed, (n, size) in enumerate([(13, 96), (14, 96), (18, 32), (5, 48)])]
    rng = np.random.default_rng(0)
    held, digests = [], [set() for _ in clips]
    for _ in range(6):
        held = [rng.bytes(int(rng.integers(1_000, 2_000_000)))] + held[:4]
        for seen, frames in zip(digests, clips):
            seen.add(hashlib.sha256(encode_video(frames, fps=24)).digest())
    assert [len(seen) for seen in digests] == [1] * len(clips)


def test_gif_round_trip_keeps_colours():
    frames = flat_video(n_frames=3, height=9, width=11)
    frames[1, :, :5] = (10, 240, 60)
    data = encode_video(frames, fps=10, fmt="gif")
    assert data.startswith(b"GIF8")
    np.testing.assert_array_equal(decode_video(data), frames)
    np.testing.assert_array_equal(decode_image(data), frames[0])  # an image decode takes frame 0


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda: encode_png(np.zeros((4, 4, 2), np.float32)),
            r"shape \(height, width, 3\) and dtype uint8, got shape \(4, 4, 2\) and dtype float32",
        ),
        (lambda: encode_wav(np.zeros((2, 3, 4), np.float32), 16000), r"\(n_samples,\).*got shape \(2, 3, 4\)"),
        (lambda: encode_wav(np.zeros(3, np.int16), 16000), r"float dtype, got shape \(3,\) and dtype int16"),
        (lambda: encode_wav(np.array([np.nan], np.float32), 16000), r"finite.*got 1 non-finite"),
        (lambda: encode_wav(np.zeros(3, np.float32), 0), r"positive integer sampling rate, got 0"),
        (lambda: encode_video(np.zeros((2, 4, 4, 3), np.uint8), fps=0), r"positive finite fps, got 0"),
        (lambda: encode_video(np.zeros((2, 4, 4, 3), np.uint8), fps=5, fmt="avi"), r"\('mp4', 'gif'\), got 'avi'"),
        (
            lambda: encode_video(np.zeros((4, 4, 3), np.uint8), fps=5),
            r"\(n_frames, height, width, 3\) and dtype uint8, got shape \(4, 4, 3\)",
        ),
    ],
)
def test_encoders_reject_bad_arrays_as_server_errors(call, match):
    # A bad array from our own generator is a 500, not a client error.
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert not isinstance(info.value, InvalidInputError)


# --- data URLs -----------------------------------------------------------------------------------


def test_parse_data_url():
    payload = b"\x00\x01binary\xff"
    url = "data:Image/PNG;base64," + base64.b64encode(payload).decode()
    assert parse_data_url(url) == ("image/png", payload)


def test_parse_data_url_with_parameters_and_wrapped_lines():
    url = "DATA:audio/wav;rate=16000;base64," + base64.encodebytes(bytes(range(100))).decode()
    assert "\n" in url
    assert parse_data_url(url) == ("audio/wav", bytes(range(100)))


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("https://example.com/cat.png", r"data:<mime>;base64,<data>.*got a URL with scheme 'https'"),
        ("just text", r"got a string without a scheme"),
        (b"data:image/png;base64,aGVsbG8=", r"got bytes"),
        ("data:image/png,aGVsbG8=", r"got a data URL without ';base64,'"),
        ("data:image/png;base64", r"got a data URL without ';base64,'"),
        ("data:;base64,aGVsbG8=", r"got a data URL with an empty media type"),
        ("data:image/png;base64,not*base64!", r"got 11 characters of data that are not valid base64"),
    ],
)
def test_parse_data_url_rejects(url, match):
    with pytest.raises(InvalidInputError, match=match):
        parse_data_url(url)


# --- images -------------------------------------------------------------------------------------


def test_decode_image_formats(rng):
    image = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    for fmt in ("PNG", "BMP", "WEBP"):
        kwargs = {"lossless": True} if fmt == "WEBP" else {}
        np.testing.assert_array_equal(decode_image(pil_bytes(Image.fromarray(image), fmt, **kwargs)), image)
    jpeg = decode_image(pil_bytes(Image.new("RGB", (8, 8), RED), "JPEG", quality=95))
    assert jpeg.shape == (8, 8, 3) and np.abs(jpeg.astype(int) - RED).max() <= 3


def test_decode_image_rejects_unlisted_format():
    tiff = pil_bytes(Image.new("RGB", (4, 4)), "TIFF")
    with pytest.raises(UnsupportedMediaError, match=r"formats \('PNG', 'JPEG', 'WEBP', 'GIF', 'BMP'\), got TIFF"):
        decode_image(tiff)
    assert decode_image(tiff, formats=("tiff",)).shape == (4, 4, 3)
    with pytest.raises(UnsupportedMediaError, match=r"\('JPEG',\), got PNG"):
        decode_image(encode_png(np.zeros((2, 2, 3), np.uint8)), formats=("JPEG",))


def test_decode_image_rejects_too_many_pixels_before_decoding():
    # The claimed 5000x5000 pixels are not in the file: decoding would fail, so getting 413
    # shows the limit is checked from the header first.
    data = png_claiming_size(5000, 5000)
    assert len(data) < 100
    with pytest.raises(PayloadTooLargeError, match=r"at most 16777216 pixels, got 5000x5000 = 25000000 pixels"):
        decode_image(data)
    with pytest.raises(PayloadTooLargeError, match=r"at most 100 pixels, got 5000x5000"):
        decode_image(data, max_pixels=100)


def test_decode_image_maps_pillow_decompression_bomb():
    data = png_claiming_size(100_000, 100_000)
    with pytest.raises(PayloadTooLargeError, match=r"decompression-bomb limit.*10000000000 pixels"):
        decode_image(data, max_pixels=10**12)


def test_decode_image_maps_decompression_bomb_warning_raised_as_error():
    data = png_claiming_size(10_000, 10_000)  # above Pillow's warning limit, below its error limit
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(PayloadTooLargeError, match=r"100000000 pixels"):
            decode_image(data, max_pixels=10**12)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", r"expected image bytes, got 0 bytes"),
        (b"definitely not an image", r"expected a decodable image file, got 23 bytes that could not be decoded"),
        (png_claiming_size(0, 1), r"got \d+ bytes that could not be decoded"),  # Pillow refuses 0x1
    ],
)
def test_decode_image_rejects_bad_bytes(data, match):
    with pytest.raises(InvalidInputError, match=match) as info:
        decode_image(data)
    assert type(info.value) is InvalidInputError


def test_decode_image_rejects_truncated_file(rng):
    data = encode_png(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8))
    truncated = data[: len(data) // 2]
    with pytest.raises(InvalidInputError, match=rf"got {len(truncated)} bytes that could not be decoded \(OSError\)"):
        decode_image(truncated)


def test_error_messages_never_quote_payload():
    payload = b"SECRET-PAYLOAD-" * 10
    for decode in (decode_image, decode_audio, decode_video):
        with pytest.raises(InvalidInputError) as info:
            decode(payload)
        assert "SECRET" not in str(info.value)


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (Image.new("L", (3, 2), 77), (77, 77, 77)),
        (Image.new("1", (3, 2), 1), (255, 255, 255)),
        (Image.new("LA", (3, 2), (10, 0)), (255, 255, 255)),  # fully transparent -> white
        (Image.new("RGBA", (3, 2), (200, 30, 100, 255)), RED),
        (Image.new("RGBA", (3, 2), (0, 0, 0, 128)), (127, 127, 127)),  # half black over white
        (Image.new("RGB", (3, 2), RED).quantize(4), RED),
        (Image.new("CMYK", (3, 2), (0, 0, 0, 0)), (255, 255, 255)),
        (Image.new("RGB", (3, 2), (128, 128, 128)).convert("YCbCr"), (128, 128, 128)),
        (Image.new("HSV", (3, 2), (0, 255, 255)), (255, 0, 0)),  # hue 0 at full saturation: red
        (Image.new("LAB", (3, 2), (255, 128, 128)), (255, 255, 255)),  # full lightness, a = b = 0
        (Image.new("RGB", (3, 2), RED).convert("RGBX"), RED),
        (Image.new("RGBa", (3, 2), (0, 0, 0, 0)), (255, 255, 255)),
        (Image.new("La", (3, 2), (0, 0)), (255, 255, 255)),
        (Image.new("PA", (3, 2), (0, 0)), (255, 255, 255)),
    ],
    ids=lambda value: getattr(value, "mode", None),
)
def test_modes_convert_to_rgb(image, expected):
    array = to_image_array(image)
    assert array.shape == (2, 3, 3) and array.dtype == np.uint8
    assert np.abs(array.astype(int) - expected).max() <= 1


def test_png_with_palette_transparency_composites_on_white():
    palette_image = Image.new("P", (2, 1), 0)
    palette_image.putpalette([0, 0, 0, 200, 30, 100] + [0] * 762)
    palette_image.putpixel((1, 0), 1)
    data = pil_bytes(palette_image, "PNG", transparency=0)
    np.testing.assert_array_equal(decode_image(data), [[(255, 255, 255), RED]])


def test_mpo_is_accepted_as_jpeg():
    first = Image.new("RGB", (4, 4), RED)
    data = pil_bytes(first, "MPO", save_all=True, append_images=[Image.new("RGB", (4, 4))])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    assert np.abs(decode_image(data).astype(int) - RED).max() <= 8
    with pytest.raises(UnsupportedMediaError, match=r"got MPO"):
        decode_image(data, formats=("PNG",))


def test_animated_gif_decodes_first_frame():
    frames = [Image.new("RGB", (4, 4), RED), Image.new("RGB", (4, 4), (10, 240, 60))]
    data = pil_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert np.abs(decode_image(data).astype(int) - RED).max() <= 8


def wide_gray(mode: str, values: list[float]) -> Image.Image:
    """A one-row image of ``mode`` holding ``values``, built from bytes in that mode's layout."""
    dtype = {"I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2", "I;16N": "=u2", "I": "<i4", "F": "<f4"}[mode]
    return Image.frombytes(mode, (len(values), 1), np.array(values, dtype=dtype).tobytes())


@pytest.mark.parametrize(
    ("mode", "values"),
    [
        ("I;16", [65535, 32768, 1000, 0]),
        ("I;16L", [65535, 32768, 1000, 0]),
        ("I;16B", [65535, 32768, 1000, 0]),
        ("I;16N", [65535, 32768, 1000, 0]),
        ("I", [65535, 32768, 1000, 0]),
        ("F", [1.0, 0.5, 1000 / 65535, 0.0]),
    ],
)
def test_wide_gray_modes_scale_to_eight_bits(mode, values):
    array = to_image_array(wide_gray(mode, values))
    assert array.shape == (1, 4, 3) and array.dtype == np.uint8
    # 1000 of 65535 is 4 of 255: clipping, as Pillow's convert("L") does, would give 255.
    np.testing.assert_array_equal(array[0, :, 0], [255, 128, 4, 0])
    np.testing.assert_array_equal(array[..., 0], array[..., 2])


def test_wide_gray_values_beyond_the_scale_saturate():
    np.testing.assert_array_equal(to_image_array(wide_gray("I", [-5, 70000]))[0, :, 0], [0, 255])
    np.testing.assert_array_equal(to_image_array(wide_gray("F", [-0.5, 2.0]))[0, :, 0], [0, 255])


def test_float_image_with_non_finite_pixels_rejected():
    with pytest.raises(InvalidInputError, match=r"finite pixel values in a mode 'F' image, got 2 non-finite"):
        to_image_array(wide_gray("F", [0.5, float("nan"), float("inf")]))


def test_sixteen_bit_png_decodes_scaled():
    white = pil_bytes(Image.fromarray(np.full((4, 5), 65535, np.uint16)), "PNG")
    assert Image.open(io.BytesIO(white)).mode == "I;16"
    array = decode_image(white)
    assert array.shape == (4, 5, 3) and array.dtype == np.uint8
    assert (array == 255).all()
    dark = pil_bytes(Image.fromarray(np.full((2, 2), 257 * 40, np.uint16)), "PNG")
    assert (decode_image(dark) == 40).all()
    probe(EncodedMedia("image", white))  # the ingress's header check accepts it too


def test_sixteen_bit_png_transparent_value_becomes_white():
    data = pil_bytes(wide_gray("I;16", [0, 0]).resize((2, 1)), "PNG", transparency=0)
    assert Image.open(io.BytesIO(data)).info["transparency"] == 0
    assert (decode_image(data) == 255).all()


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I", "F"])
def test_wide_gray_tiff_files_decode(mode):
    top = 1.0 if mode == "F" else 65535
    data = pil_bytes(wide_gray(mode, [top, 0]), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == mode
    np.testing.assert_array_equal(decode_image(data, formats=("TIFF",))[0, :, 0], [255, 0])


@pytest.mark.parametrize("mode", Image.MODES)
def test_every_pillow_mode_converts(mode):
    array = to_image_array(Image.new(mode, (3, 2)))
    assert array.shape == (2, 3, 3) and array.dtype == np.uint8


def test_exif_orientation_is_applied():
    stored = np.zeros((2, 4, 3), np.uint8)
    stored[0, 0] = RED
    exif = Image.Exif()
    exif[0x0112] = 6  # the viewer turns the stored picture 90 degrees clockwise
    data = pil_bytes(Image.fromarray(stored), "PNG", exif=exif)
    array = decode_image(data)
    assert array.shape == (4, 2, 3)
    np.testing.assert_array_equal(array[0, -1], RED)  # top-left turned to top-right
    assert decode_image(encode_png(stored)).shape == (2, 4, 3)


def test_transparent_pixels_in_files_become_white():
    rgba = np.array([[(0, 0, 0, 0), (*RED, 255)]], np.uint8)
    np.testing.assert_array_equal(decode_image(pil_bytes(Image.fromarray(rgba), "PNG")), [[(255, 255, 255), RED]])
    webp = pil_bytes(Image.fromarray(rgba), "WEBP", lossless=True, exact=True)
    np.testing.assert_array_equal(decode_image(webp), [[(255, 255, 255), RED]])


@pytest.mark.parametrize(("fmt", "kwargs"), [("PNG", {}), ("WEBP", {"lossless": True})])
def test_animated_png_and_webp_decode_first_frame(fmt, kwargs):
    frames = [Image.new("RGB", (4, 4), RED), Image.new("RGB", (4, 4), (10, 240, 60))]
    data = pil_bytes(frames[0], fmt, save_all=True, append_images=frames[1:], **kwargs)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    np.testing.assert_array_equal(decode_image(data), np.full((4, 4, 3), RED, np.uint8))


def test_to_image_array_arrays():
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    assert to_image_array(image) is image
    strided = np.zeros((4, 6, 3), np.uint8)[:, ::2]
    result = to_image_array(strided)
    assert result.flags.c_contiguous and result.shape == (4, 3, 3)
    gray = np.array([[0, 100], [200, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(to_image_array(gray), np.stack([gray] * 3, axis=-1))
    np.testing.assert_array_equal(to_image_array(bytearray(encode_png(image))), image)


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        (np.zeros((4, 4, 2), np.float32), r"dtype uint8, got shape \(4, 4, 2\) and dtype float32"),
        (np.zeros((4, 4, 3), np.float32), r"got shape \(4, 4, 3\) and dtype float32"),
        (np.zeros((4, 4, 4), np.uint8), r"got shape \(4, 4, 4\) and dtype uint8"),
        (np.zeros((0, 4, 3), np.uint8), r"nonzero height and width.*got shape \(0, 4, 3\)"),
        (np.zeros(5, np.uint8), r"got shape \(5,\) and dtype uint8"),
        ("cat.png", r"expected image bytes, a PIL image or a numpy array, got str"),
        (Image.new("RGB", (0, 0)), r"nonzero width and height, got 0x0"),
    ],
)
def test_to_image_array_rejects(obj, match):
    with pytest.raises(InvalidInputError, match=match):
        to_image_array(obj)


# --- audio --------------------------------------------------------------------------------------


def test_decode_audio_stereo_flac(rng):
    samples = rng.uniform(-0.5, 0.5, size=(1000, 2)).astype(np.float32)
    clip = decode_audio(wav_bytes(samples, 44100, fmt="FLAC"))
    assert clip.sampling_rate == 44100 and clip.samples.shape == (1000, 2)
    assert clip.samples.dtype == np.float32
    assert np.abs(clip.samples - samples).max() <= 1 / 32767


def test_decode_audio_too_long():
    data = wav_bytes(np.zeros(16000, np.float32), 8000)  # 2 s
    with pytest.raises(PayloadTooLargeError, match=r"at most 1.5 s, got 2.0 s"):
        decode_audio(data, max_seconds=1.5)
    assert decode_audio(data, max_seconds=2).samples.shape == (16000,)


@pytest.mark.parametrize(
    ("data", "match", "error"),
    [
        (b"", r"expected audio bytes, got 0 bytes", InvalidInputError),
        (wav_bytes(np.zeros(0, np.float32), 8000), r"at least one audio sample, got shape \(0,\)", InvalidInputError),
        (b"RIFF not really a wave file", r"decodable audio file, got 27 bytes that could not be", InvalidInputError),
        (
            wav_bytes(np.array([0.0, np.inf, np.nan], np.float32), 8000, subtype="FLOAT"),
            r"finite audio samples, got 2 non-finite values",
            InvalidInputError,
        ),
    ],
)
def test_decode_audio_rejects(data, match, error):
    with pytest.raises(error, match=match):
        decode_audio(data)


def test_to_audio_clip_inputs(rng):
    samples = rng.uniform(-1, 1, size=100)
    clip = to_audio_clip(samples, sampling_rate=np.int64(16000))
    assert clip.samples.dtype == np.float32 and clip.sampling_rate == 16000 and type(clip.sampling_rate) is int
    np.testing.assert_allclose(clip.samples, samples, atol=1e-7)
    assert to_audio_clip(AudioClip(samples.astype(np.float32), 8000)).sampling_rate == 8000
    assert to_audio_clip(encode_wav(samples.astype(np.float32), 8000)).samples.shape == (100,)
    assert to_audio_clip(np.zeros((10, 2), np.float32), 8000).samples.shape == (10, 2)


@pytest.mark.parametrize(
    ("obj", "rate", "match"),
    [
        (np.zeros(10, np.float32), None, r"sampling rate with an audio array of shape \(10,\), got None"),
        (np.zeros((2, 3, 4), np.float32), 16000, r"\(n_samples,\) or \(n_samples, n_channels\).*got shape \(2, 3, 4\)"),
        (np.zeros(10, np.int16), 16000, r"float dtype, got shape \(10,\) and dtype int16"),
        (np.zeros(0, np.float32), 16000, r"at least one audio sample, got shape \(0,\)"),
        (np.array([0.0, np.nan]), 16000, r"finite audio samples, got 1 non-finite"),
        (np.zeros(10, np.float32), 0, r"positive integer sampling rate, got 0"),
        (np.zeros(10, np.float32), 16000.5, r"positive integer sampling rate, got 16000.5"),
        (AudioClip(np.zeros(10, np.float32), -1), None, r"positive integer sampling rate, got -1"),
        ([0.0, 0.1], 16000, r"audio bytes, an AudioClip or a numpy array, got list"),
    ],
)
def test_to_audio_clip_rejects(obj, rate, match):
    with pytest.raises(InvalidInputError, match=match):
        to_audio_clip(obj, sampling_rate=rate)


def test_to_mono_16k_resamples_stereo():
    t = np.arange(44100) / 44100
    tone = np.sin(2 * np.pi * 440 * t)
    clip = AudioClip(np.stack([tone, tone * 0.5], axis=1).astype(np.float32), 44100)
    mono = to_mono_16k(clip)
    assert mono.shape == (16000,) and mono.dtype == np.float32
    expected = 0.75 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
    assert np.abs(mono[100:-100] - expected[100:-100]).max() < 0.01  # edges carry filter ramp-up


def test_to_mono_16k_keeps_matching_rate():
    samples = np.linspace(-1, 1, 320, dtype=np.float32)
    np.testing.assert_array_equal(to_mono_16k(AudioClip(samples, 16000)), samples)
    assert to_mono_16k(AudioClip(samples, 8000)).shape == (640,)


TONE_HZ, TONE_SECONDS = 440, 0.5


def tone(rate: int, channels: int) -> np.ndarray:
    """``(n, channels)`` float64: a 440 Hz sine of amplitude 0.5, channel k scaled by a gain
    falling from 1 to 0 (the gains average 0.5 for two or more channels)."""
    wave = 0.5 * np.sin(2 * np.pi * TONE_HZ * np.arange(int(rate * TONE_SECONDS)) / rate)
    return wave[:, None] * np.linspace(1, 0, channels) if channels > 1 else wave[:, None]


def mp3_bytes(samples: np.ndarray, rate: int) -> bytes:
    """An MP3 as an encoder writes it (ID3 tag, LAME header), through PyAV's LAME encoder."""
    if "libmp3lame" not in av.codecs_available:
        pytest.skip("this PyAV build has no libmp3lame encoder to write an MP3 with")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp3") as container:
        stream = container.add_stream("libmp3lame", rate=rate)
        stream.layout, stream.format = ("mono" if samples.shape[1] == 1 else "stereo"), "fltp"
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(samples.T, dtype=np.float32), format="fltp", layout=stream.layout.name
        )
        frame.sample_rate, frame.pts = rate, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def assert_is_the_tone(data: bytes, rate: int, channels: int, lossless: bool):
    """``data`` decodes at ``rate`` with ``channels`` channels, and reaches the encoder as the tone
    at 16 kHz mono: the right length, the channels' mean level, and the pitch still 440 Hz (a
    wrong rate would shift it)."""
    clip = decode_audio(data)
    assert clip.sampling_rate == rate and clip.samples.dtype == np.float32
    assert clip.samples.shape[1:] == ((channels,) if channels > 1 else ())
    mono = to_mono_16k(clip)
    expected_level = 0.5 * (0.5 if channels > 1 else 1.0)
    if lossless:
        assert mono.shape == (int(16000 * TONE_SECONDS),)
        reference = expected_level * np.sin(2 * np.pi * TONE_HZ * np.arange(mono.size) / 16000)
        assert np.abs(mono - reference)[400:-400].max() < 0.02  # the ends carry the filter's ramp
    else:  # lossy codecs pad the start and end by a frame or so
        assert abs(mono.size - 16000 * TONE_SECONDS) <= 0.1 * 16000
    middle = mono[mono.size // 4 : -mono.size // 4]
    assert abs(np.sqrt(np.mean(middle**2)) - expected_level / np.sqrt(2)) < 0.1 * expected_level
    spectrum = np.abs(np.fft.rfft(mono * np.hanning(mono.size)))
    assert abs(np.argmax(spectrum) * 16000 / mono.size - TONE_HZ) <= 4


@pytest.mark.parametrize(
    ("fmt", "subtype"),
    [
        ("WAV", "PCM_U8"),
        ("WAV", "PCM_16"),
        ("WAV", "PCM_24"),
        ("WAV", "PCM_32"),
        ("WAV", "FLOAT"),
        ("WAV", "DOUBLE"),
        ("WAVEX", "PCM_24"),
        ("FLAC", "PCM_S8"),
        ("FLAC", "PCM_16"),
        ("FLAC", "PCM_24"),
    ],
)
def test_lossless_audio_of_every_sample_width_decodes(fmt, subtype):
    assert_is_the_tone(wav_bytes(tone(44100, 2), 44100, fmt=fmt, subtype=subtype), 44100, 2, lossless=True)


@pytest.mark.parametrize("rate", [8000, 11025, 16000, 22050, 32000, 44100, 48000, 88200, 96000])
def test_audio_at_every_common_rate_resamples_to_16k(rate):
    assert_is_the_tone(wav_bytes(tone(rate, 1), rate, subtype="PCM_16"), rate, 1, lossless=True)


@pytest.mark.parametrize("channels", [2, 3, 4, 6, 8])
def test_audio_of_any_channel_count_downmixes(channels):
    data = wav_bytes(tone(48000, channels), 48000, fmt="FLAC", subtype="PCM_24")
    assert_is_the_tone(data, 48000, channels, lossless=True)


@pytest.mark.parametrize(
    ("subtype", "rate", "channels"), [("VORBIS", 44100, 2), ("VORBIS", 96000, 6), ("OPUS", 48000, 2), ("OPUS", 8000, 1)]
)
def test_ogg_audio_decodes(subtype, rate, channels):
    assert_is_the_tone(wav_bytes(tone(rate, channels), rate, fmt="OGG", subtype=subtype), rate, channels, lossless=False)


@pytest.mark.parametrize(("rate", "channels"), [(44100, 2), (48000, 1), (8000, 1)])
def test_mp3_audio_decodes(rate, channels):
    data = mp3_bytes(tone(rate, channels), rate)
    assert data[:3] == b"ID3"
    assert_is_the_tone(data, rate, channels, lossless=False)
    probe(EncodedMedia("audio", data))  # the ingress's header check accepts it too


# --- video --------------------------------------------------------------------------------------


def test_decode_video_too_many_frames_from_header():
    with pytest.raises(PayloadTooLargeError, match=r"at most 3 frames, got 5 frames"):
        decode_video(encode_video(flat_video(n_frames=5), fps=10), max_frames=3)


def test_decode_video_too_many_frames_while_decoding():
    data = matroska_video(5)  # Matroska carries no frame count, so the limit trips mid-decode
    assert decode_video(data).shape == (5, 16, 16, 3)
    with pytest.raises(PayloadTooLargeError, match=r"at most 3 frames, got more"):
        decode_video(data, max_frames=3)


def test_decode_video_frame_too_large():
    with pytest.raises(PayloadTooLargeError, match=r"frames of at most 100 pixels, got 16x16 = 256 pixels"):
        decode_video(encode_video(flat_video(), fps=10), max_pixels_per_frame=100)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", r"expected video bytes, got 0 bytes"),
        (b"\x00" * 100, r"decodable video file, got 100 bytes that could not be decoded"),
        (wav_bytes(np.zeros(100, np.float32), 8000), r"video stream, got streams: audio"),
        (matroska_video(0), r"at least one frame, got 0 frames"),
    ],
)
def test_decode_video_rejects(data, match):
    with pytest.raises(InvalidInputError, match=match) as info:
        decode_video(data)
    assert type(info.value) is InvalidInputError


def test_to_video_array_inputs():
    frames = flat_video(n_frames=2, height=4, width=6)
    assert to_video_array(frames) is frames
    from_pil = to_video_array([Image.fromarray(frame) for frame in frames])
    np.testing.assert_array_equal(from_pil, frames)
    np.testing.assert_array_equal(to_video_array(list(frames)), frames)
    np.testing.assert_array_equal(to_video_array(encode_video(frames, fps=5, fmt="gif")), frames)


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ([], r"at least one video frame, got 0 frames"),
        ([np.zeros((4, 6, 3), np.uint8), np.zeros((4, 5, 3), np.uint8)], r"size 6x4, got frame 1 of size 5x4"),
        ([np.zeros((4, 6, 3), np.uint8), np.zeros((4, 6, 3), np.float32)], r"frame 1: .*dtype float32"),
        ([b"frame"], r"frame 0 to be a PIL image or a numpy array, got bytes"),
        (np.zeros((0, 4, 4, 3), np.uint8), r"\(n_frames, height, width, 3\).*got shape \(0, 4, 4, 3\)"),
        (np.zeros((2, 4, 4, 3), np.float32), r"got shape \(2, 4, 4, 3\) and dtype float32"),
        (np.zeros((4, 4, 3), np.uint8), r"got shape \(4, 4, 3\) and dtype uint8"),
        ("video.mp4", r"video bytes, a list of frames or a numpy array, got str"),
    ],
)
def test_to_video_array_rejects(obj, match):
    with pytest.raises(InvalidInputError, match=match):
        to_video_array(obj)


# --- import cost --------------------------------------------------------------------------------


def test_import_does_not_load_heavy_libraries():
    code = (
        "import sys, omnistage.actors.media\n"
        "print(sorted(m for m in ('torch', 'transformers', 'diffusers', 'ray') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("fmt", ["mp4", "gif"])
@pytest.mark.parametrize("n_frames", [3, 40])
def test_sampled_video_decoding_gives_the_frames_full_decoding_samples(fmt, n_frames):
    from omnistage.actors.media import decode_video, decode_video_frames, sample_frame_indices

    rng = np.random.default_rng(n_frames)
    # Moving content, so that every frame differs and a wrong frame cannot pass.
    frames = np.stack([np.roll(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8), 3 * t, axis=1) for t in range(n_frames)])
    data = encode_video(frames, fps=8, fmt=fmt)
    full = decode_video(data)
    sampled = decode_video_frames(data, 5)
    np.testing.assert_array_equal(sampled, full[sample_frame_indices(len(full), 5)])
    with pytest.raises(PayloadTooLargeError, match=f"at most {n_frames - 1} frames"):
        decode_video_frames(data, 5, max_frames=n_frames - 1)


def test_a_long_video_is_checked_and_sampled_in_little_memory():
    """A 2-minute 360p clip (480 frames, 330 MB decoded): the ingress's header check and the
    encoder's sampled decoding each raise the process's peak memory by a few MB at most."""
    result = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "ingress_memory.py"),
                             "--check", "--seconds", "120", "--fps", "4"],
                            capture_output=True, text=True, check=True)
    grown = json.loads(result.stdout.strip().splitlines()[-1])
    assert grown["frames"] == 480
    assert grown["probe_mb"] < 16 and grown["sampled_mb"] < 64, grown


# Video as real files come: other containers and codecs, odd sizes, a display rotation, variable frame rate


def _clip(frames, container="mp4", codec="libx264", *, rotation=None, pts=None, time_base=None):
    """``frames`` written with PyAV as a phone or an editor would: any container and codec, an
    optional display rotation (counter-clockwise degrees), optional timestamps."""
    from fractions import Fraction

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=8)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        if time_base is not None:
            stream.codec_context.time_base = stream.time_base = Fraction(1, time_base)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for index, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            frame.pts = index if pts is None else pts[index]
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return buffer.getvalue()


def _bars(n_frames, height, width):
    """A bright bar that moves right on a dark background: a wrong or misplaced frame cannot pass."""
    frames = np.full((n_frames, height, width, 3), 30, np.uint8)
    for t in range(n_frames):
        column = (3 * t) % (width - 4)
        frames[t, :, column : column + 4] = (220, 200, 40)
    return frames


def _bar_columns(clip):
    """The brightest column of each frame: where the bar is."""
    return clip.mean(axis=(1, 3)).argmax(axis=1)


@pytest.mark.parametrize(
    "container, codec, size",
    [("webm", "libvpx", (32, 48)), ("webm", "libvpx-vp9", (17, 33)), ("matroska", "libx264", (32, 48)),
     ("mov", "libx264", (32, 48)), ("mp4", "mpeg4", (32, 48))],
    ids=["webm-vp8", "webm-vp9-odd-size", "mkv-h264", "mov-h264", "mp4-mpeg4"],
)
def test_video_containers_and_codecs_decode(container, codec, size):
    from omnistage.actors.media import decode_video_frames, sample_frame_indices

    frames = _bars(12, *size)
    data = _clip(frames, container, codec)
    probe(EncodedMedia("video", data))
    full = decode_video(data)
    assert full.shape == frames.shape
    # Lossy codecs: close to what was written, the bar where it was.
    assert np.abs(full.astype(int) - frames).mean() < 12
    assert np.all(np.abs(_bar_columns(full) - _bar_columns(frames)) <= 3), (_bar_columns(full), _bar_columns(frames))
    np.testing.assert_array_equal(decode_video_frames(data, 5), full[sample_frame_indices(len(full), 5)])


@pytest.mark.parametrize("rotation, quarters", [(-90, -1), (90, 1), (180, 2)])
def test_video_display_rotation_is_applied(rotation, quarters):
    from omnistage.actors.media import decode_video_frames

    frames = _bars(6, 16, 32)
    frames[:, :4, :4] = (250, 20, 20)  # a red corner shows which way the clip is turned
    data = _clip(frames, rotation=rotation)
    upright = np.rot90(frames, quarters, axes=(1, 2))
    full = decode_video(data)
    assert full.shape == upright.shape
    assert np.abs(full.astype(int) - upright).mean() < 12
    sampled = decode_video_frames(data, 5)
    assert sampled.shape[1:] == upright.shape[1:]
    red = (sampled[..., 0].astype(int) - sampled[..., 1]) > 120
    expected = (upright[..., 0].astype(int) - upright[..., 1]) > 120
    assert (red[0] == expected[0]).mean() > 0.95


def test_variable_frame_rate_video_samples_the_frames_it_has():
    from omnistage.actors.media import decode_video_frames, sample_frame_indices

    frames = _bars(10, 32, 48)
    # Milliseconds between frames vary from 10 to 500, as a phone's clip in low light does.
    pts = [0, 10, 60, 70, 400, 410, 900, 950, 1000, 1500]
    data = _clip(frames, "mp4", "libx264", pts=pts, time_base=1000)
    full = decode_video(data)
    assert len(full) == len(frames)
    np.testing.assert_array_equal(decode_video_frames(data, 5), full[sample_frame_indices(len(full), 5)])
