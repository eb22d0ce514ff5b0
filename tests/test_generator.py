"""Generator stages on tiny random checkpoints: encoded sizes, seeding, batching and validation."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
import soundfile as sf
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from omnistage.actors.errors import InvalidInputError
from omnistage.actors.generator import AudioGenerator, ImageGenerator, VideoGenerator
from omnistage.actors.payloads import Conditioning, GenerationRequest
from omnistage.actors.tiny import TINY_DIMS, build_audio_generator, build_image_generator, build_video_generator
from omnistage.cluster.config import AudioGeneratorConfig, ImageGeneratorConfig, VideoGeneratorConfig

BUILDERS = {
    "image": build_image_generator,
    "video": build_video_generator,
    "audio": build_audio_generator,
}
STEPS = 2
IMAGE_HW = (32, 48)
VIDEO_THW = (3, 16, 24)
VIDEO_FPS = 4
AUDIO_SECONDS = 1.0


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("generators")
    for modality, build in BUILDERS.items():
        build(root / modality, seed=0)
    return {modality: root / modality for modality in BUILDERS}


@pytest.fixture(scope="module")
def image_stage(checkpoints):
    height, width = IMAGE_HW
    return ImageGenerator(
        ImageGeneratorConfig(model=str(checkpoints["image"]), num_inference_steps=STEPS, height=height, width=width)
    )


def video_config(checkpoints, fmt="mp4"):
    frames, height, width = VIDEO_THW
    return VideoGeneratorConfig(
        model=str(checkpoints["video"]),
        num_inference_steps=STEPS,
        num_frames=frames,
        height=height,
        width=width,
        fps=VIDEO_FPS,
        format=fmt,
    )


@pytest.fixture(scope="module")
def video_stage(checkpoints):
    return VideoGenerator(video_config(checkpoints))


@pytest.fixture(scope="module")
def audio_stage(checkpoints):
    config = AudioGeneratorConfig(
        model=str(checkpoints["audio"]), num_inference_steps=STEPS, audio_length_s=AUDIO_SECONDS
    )
    return AudioGenerator(config)


def stage_for(request, modality):
    return request.getfixturevalue(f"{modality}_stage")


def make_request(modality, seed, values_seed=0, shape=None):
    shape = shape or TINY_DIMS[f"{modality}_cond"]
    embeds = np.random.default_rng(values_seed).standard_normal(shape).astype(np.float32)
    return GenerationRequest(conditioning=Conditioning(modality=modality, embeds=embeds), seed=seed)


def test_conditioning_shape_fits_tiny_dims(image_stage, video_stage, audio_stage):
    # Cross-attention takes any number of tokens; AudioLDM takes exactly one pooled vector.
    assert image_stage.conditioning_shape == (None, TINY_DIMS["image_cond"][1])
    assert video_stage.conditioning_shape == (None, TINY_DIMS["video_cond"][1])
    assert audio_stage.conditioning_shape == TINY_DIMS["audio_cond"]


def test_image_is_png_of_configured_size(image_stage):
    [media] = image_stage([make_request("image", seed=0)])
    assert media.modality == "image" and media.mime_type == "image/png" and media.rate is None
    assert media.array.shape == (*IMAGE_HW, 3) and media.array.dtype == np.uint8
    decoded = Image.open(io.BytesIO(media.data))
    assert decoded.format == "PNG" and decoded.mode == "RGB"
    assert (decoded.height, decoded.width) == IMAGE_HW
    np.testing.assert_array_equal(np.asarray(decoded), media.array)  # PNG is lossless


def test_image_size_defaults_to_unet_native_size(checkpoints):
    stage = ImageGenerator(ImageGeneratorConfig(model=str(checkpoints["image"]), num_inference_steps=1))
    [media] = stage([make_request("image", seed=0, shape=(4, 32))])
    # sample_size 32 latents x VAE scale factor 2
    assert media.array.shape == (64, 64, 3)


@pytest.mark.parametrize("fmt", ["mp4", "gif"])
def test_video_decodes_to_configured_frames_and_size(checkpoints, fmt):
    frames, height, width = VIDEO_THW
    [media] = VideoGenerator(video_config(checkpoints, fmt))([make_request("video", seed=0)])
    assert media.modality == "video" and media.mime_type == {"mp4": "video/mp4", "gif": "image/gif"}[fmt]
    assert media.rate == VIDEO_FPS
    assert media.array.shape == (*VIDEO_THW, 3) and media.array.dtype == np.uint8
    with av.open(io.BytesIO(media.data)) as container:
        stream = container.streams.video[0]
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        assert container.format.name.split(",")[0] in {"mp4": ("mov", "mp4"), "gif": ("gif",)}[fmt]
    assert len(decoded) == frames
    assert all(frame.shape == (height, width, 3) for frame in decoded)


def test_audio_is_wav_of_configured_length(audio_stage):
    [media] = audio_stage([make_request("audio", seed=0)])
    rate = audio_stage.pipeline.vocoder.config.sampling_rate
    n_samples = int(rate * AUDIO_SECONDS)
    assert media.modality == "audio" and media.mime_type == "audio/wav" and media.rate == rate == 16000
    assert media.array.shape == (n_samples,) and media.array.dtype == np.float32
    samples, decoded_rate = sf.read(io.BytesIO(media.data), dtype="float32")
    assert decoded_rate == rate and samples.shape == (n_samples,)
    # Audible noise, not silence, once quantised to 16-bit PCM.
    assert np.abs(samples).max() > 0.01


@pytest.mark.parametrize("modality", ["image", "video", "audio"])
def test_same_seed_same_bytes_other_seed_differs(request, modality):
    stage = stage_for(request, modality)
    first, second, other = (stage([make_request(modality, seed=seed)])[0] for seed in (7, 7, 8))
    assert first.data == second.data
    np.testing.assert_array_equal(first.array, second.array)
    assert not np.array_equal(first.array, other.array)


@pytest.mark.parametrize("modality", ["image", "video", "audio"])
def test_batch_matches_single_calls(request, modality):
    stage = stage_for(request, modality)
    requests = [make_request(modality, seed=1, values_seed=1), make_request(modality, seed=2, values_seed=2)]
    batched = stage(requests)
    singles = [stage([item])[0] for item in requests]
    assert len(batched) == 2
    for together, alone in zip(batched, singles, strict=True):
        # Not bit-exact: batched CPU kernels sum in another order. The float32 differences
        # (about 1e-7) flip some pixels' rounding to uint8 by one.
        if modality == "audio":
            np.testing.assert_allclose(together.array, alone.array, rtol=0, atol=1e-5)
        else:
            diff = np.abs(together.array.astype(np.int16) - alone.array.astype(np.int16))
            assert diff.max() <= 1
    assert not np.array_equal(batched[0].array, batched[1].array)


def test_unset_seed_is_random(image_stage):
    first, second = (image_stage([make_request("image", seed=None)])[0] for _ in range(2))
    assert not np.array_equal(first.array, second.array)


@pytest.mark.parametrize("modality", ["image", "video", "audio"])
def test_builder_is_deterministic(tmp_path, modality):
    BUILDERS[modality](tmp_path / "a", seed=3)
    BUILDERS[modality](tmp_path / "b", seed=3)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b
    assert any(p.suffix == ".safetensors" for p in files_a)
    assert "model_index.json" in {str(p) for p in files_a}
    for relative in files_a:
        assert (tmp_path / "a" / relative).read_bytes() == (tmp_path / "b" / relative).read_bytes(), relative


@pytest.mark.parametrize(
    ("modality", "shape", "expected"),
    [("image", (77, 16), "(seq_len, 32)"), ("video", (77, 16), "(seq_len, 32)"), ("audio", (1, 16), "(1, 32)")],
)
def test_wrong_conditioning_width_is_rejected(request, modality, shape, expected):
    stage = stage_for(request, modality)
    with pytest.raises(InvalidInputError) as raised:
        stage([make_request(modality, seed=0, shape=shape)])
    assert expected in str(raised.value) and str(shape) in str(raised.value)


def test_audio_conditioning_must_be_one_pooled_vector(audio_stage):
    with pytest.raises(InvalidInputError, match=r"\(1, 32\).*\(77, 32\)"):
        audio_stage([make_request("audio", seed=0, shape=(77, 32))])


def test_conditioning_must_be_2d_float(image_stage):
    bad = make_request("image", seed=0)
    bad.conditioning.embeds = bad.conditioning.embeds.astype(np.int64)
    with pytest.raises(InvalidInputError, match="2-D float array"):
        image_stage([bad])
    flat = make_request("image", seed=0, shape=(32,))
    with pytest.raises(InvalidInputError, match=r"shape \(32,\)"):
        image_stage([flat])


def test_batch_must_share_seq_len(image_stage):
    requests = [make_request("image", seed=0, shape=(77, 32)), make_request("image", seed=1, shape=(8, 32))]
    with pytest.raises(InvalidInputError, match=r"\(77, 32\).*\(8, 32\)"):
        image_stage(requests)


def test_empty_batch_gives_no_media(image_stage):
    assert image_stage([]) == []


def test_guidance_with_text_encoder_takes_tokenizer_length(tmp_path, checkpoints):
    """Under guidance the empty negative prompt is padded to the tokenizer's length and
    concatenated with the conditioning, so the conditioning must have that length too."""
    (tmp_path / "vocab.json").write_text('{"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2}')
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        vocab_file=str(tmp_path / "vocab.json"), merges_file=str(tmp_path / "merges.txt"), model_max_length=8
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=3, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4
        )
    )
    guided = tmp_path / "guided"
    pipeline = DiffusionPipeline.from_pretrained(checkpoints["image"], text_encoder=text_encoder, tokenizer=tokenizer)
    pipeline.save_pretrained(guided)

    config = ImageGeneratorConfig(model=str(guided), num_inference_steps=1, guidance_scale=7.5, height=16, width=16)
    stage = ImageGenerator(config)
    assert stage.conditioning_shape == (8, 32)
    [media] = stage([make_request("image", seed=0, shape=(8, 32))])
    assert media.array.shape == (16, 16, 3)
    with pytest.raises(InvalidInputError, match=r"\(8, 32\).*\(77, 32\)"):
        stage([make_request("image", seed=0)])


@pytest.mark.parametrize(
    ("modality", "config_class"),
    [("image", ImageGeneratorConfig), ("video", VideoGeneratorConfig), ("audio", AudioGeneratorConfig)],
)
def test_guidance_without_text_encoder_fails_at_load(checkpoints, modality, config_class):
    stage_class = {"image": ImageGenerator, "video": VideoGenerator, "audio": AudioGenerator}[modality]
    config = config_class(model=str(checkpoints[modality]), guidance_scale=7.5)
    with pytest.raises(ValueError, match="text encoder") as raised:
        stage_class(config)
    assert "7.5" in str(raised.value) and str(checkpoints[modality]) in str(raised.value)
