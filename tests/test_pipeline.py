"""The five stages chained in process: questions about media, generation, and bad input."""

import base64
import io

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from omnistage.actors.errors import InvalidInputError, UnsupportedMediaError
from omnistage.actors.media import encode_png, encode_video, encode_wav
from omnistage.pipelines.demo import sample_audio, sample_image, sample_video

pytestmark = pytest.mark.slow


def _url(mime, data):
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _ask(text, *parts):
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


IMAGE_PART = {"type": "image_url", "image_url": {"url": _url("image/png", encode_png(sample_image()))}}
VIDEO_PART = {"type": "video_url", "video_url": {"url": _url("video/mp4", encode_video(sample_video(), fps=8))}}
AUDIO_PART = {
    "type": "input_audio",
    "input_audio": {"data": base64.b64encode(encode_wav(*sample_audio())).decode(), "format": "wav"},
}


@pytest.mark.parametrize("part", [IMAGE_PART, VIDEO_PART, AUDIO_PART], ids=["image", "video", "audio"])
def test_media_question_gives_text(pipeline, part):
    result = pipeline.chat(_ask("What is this?", part), max_tokens=8, seed=0)
    assert result.media == []
    assert 0 < result.usage["completion_tokens"] <= 8
    assert result.usage["total_tokens"] == result.usage["prompt_tokens"] + result.usage["completion_tokens"]


def test_media_change_the_answer_path(pipeline):
    """The features reach the LLM: the prompt grows by the projected tokens of each medium."""
    text_only = pipeline.chat(_ask("What is this?"), max_tokens=4, seed=0).usage["prompt_tokens"]
    image = pipeline.chat(_ask("What is this?", IMAGE_PART), max_tokens=4, seed=0).usage["prompt_tokens"]
    both = pipeline.chat(_ask("What is this?", IMAGE_PART, AUDIO_PART), max_tokens=4, seed=0).usage["prompt_tokens"]
    # +225 image patches (mlp2x_gelu keeps length) and +8 Q-Former queries, minus each placeholder
    # token and the "\n" that joins it to the text.
    assert image - text_only == 225 + 1
    assert both - image == 8 + 1


def test_raw_python_media_equal_data_urls(pipeline):
    image = sample_image()
    via_url = pipeline.chat(_ask("Describe.", IMAGE_PART), max_tokens=6, seed=1)
    via_array = pipeline.chat(_ask("Describe.", {"type": "image_url", "image_url": image}), max_tokens=6, seed=1)
    via_pil = pipeline.chat(_ask("Describe.", {"type": "image_url", "image_url": Image.fromarray(image)}), max_tokens=6, seed=1)
    assert via_url.text == via_array.text == via_pil.text


def test_image_generation_gives_a_png(pipeline):
    result = pipeline.chat(_ask("Draw a cat."), max_tokens=4, seed=0, modalities=["text", "image"])
    (item,) = result.media
    assert (item.modality, item.mime_type) == ("image", "image/png")
    image = Image.open(io.BytesIO(item.data))
    assert image.format == "PNG" and image.size == (64, 64)
    np.testing.assert_array_equal(np.array(image.convert("RGB")), item.array)


def test_video_generation_gives_an_mp4(pipeline):
    result = pipeline.chat(_ask("Film a cat."), max_tokens=4, seed=0, modalities=["video"])
    (item,) = result.media
    assert item.mime_type == "video/mp4"
    with av.open(io.BytesIO(item.data)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == pipeline.config.stages.video_generator.num_frames == item.array.shape[0]
    assert frames[0].shape == item.array.shape[1:]


def test_audio_generation_gives_a_wav(pipeline):
    result = pipeline.chat(_ask("Sing."), max_tokens=4, seed=0, modalities=["audio"])
    (item,) = result.media
    samples, rate = sf.read(io.BytesIO(item.data))
    assert item.mime_type == "audio/wav" and rate == 16000
    assert len(samples) == int(pipeline.config.stages.audio_generator.audio_length_s * 16000)


def test_any_to_any_is_seeded(pipeline):
    def run():
        r = pipeline.chat(_ask("Show and tell.", IMAGE_PART, AUDIO_PART), max_tokens=5, seed=7, modalities=["image", "audio"])
        return r.text, [(m.modality, m.data) for m in r.media]

    first = run()
    assert [m for m, _ in first[1]] == ["image", "audio"]
    assert run() == first


@pytest.mark.parametrize(
    "part,error,message",
    [
        ({"type": "image_url", "image_url": {"url": _url("image/png", b"not an image")}}, InvalidInputError, "could not be decoded"),
        ({"type": "image_url", "image_url": np.zeros((0, 4, 3), np.uint8)}, InvalidInputError, r"got shape \(0, 4, 3\)"),
        ({"type": "image_url", "image_url": np.zeros((4, 4, 3), np.float32)}, InvalidInputError, "dtype float32"),
        ({"type": "image_url", "image_url": {"url": _url("audio/wav", b"x")}}, UnsupportedMediaError, "'audio/wav'"),
        ({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, InvalidInputError, "remote URLs are not fetched"),
        ({"type": "input_audio", "input_audio": (np.zeros((2, 2, 2), np.float32), 16000)}, InvalidInputError, r"\(2, 2, 2\)"),
        ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "aiff"}}, UnsupportedMediaError, "'aiff'"),
        ({"type": "video_url", "video_url": np.zeros((0, 8, 8, 3), np.uint8)}, InvalidInputError, r"got shape \(0, 8, 8, 3\)"),
        ({"type": "hologram", "hologram": "x"}, InvalidInputError, "'hologram'"),
    ],
    ids=["undecodable", "zero-size", "float-image", "wrong-mime", "remote-url", "audio-shape", "audio-format", "empty-video", "unknown-part"],
)
def test_bad_media_are_refused_with_a_clear_message(pipeline, part, error, message):
    with pytest.raises(error, match=message):
        pipeline.chat(_ask("?", part), max_tokens=2)


def test_placeholders_must_match_media(pipeline):
    with pytest.raises(InvalidInputError, match=r"ask for 2 image .*media given are 1 image"):
        pipeline.chat(_ask("compare <image> with", IMAGE_PART), max_tokens=2)


def test_unknown_output_modality(pipeline):
    with pytest.raises(UnsupportedMediaError, match=r"got \['smell'\]"):
        pipeline.chat(_ask("hi"), modalities=["text", "smell"])
