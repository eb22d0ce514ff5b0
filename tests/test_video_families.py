"""Video-LLaVA and LLaVA-NeXT-Video split across the pools (video encoder, image encoder, input
projector, LLM) with exactly the answers of transformers' own ``generate`` on the whole model.

Their processors cannot be built here (their video processors need torchvision), so the
reference takes each piece from the checkpoint as the processor would: the prompt rendered by
the tokenizer with the checkpoint's own template (as ``ProcessorMixin.apply_chat_template`` renders
it), the number of ``<video>`` / ``<image>`` tokens from the processor class's own
``replace_video_token`` / ``replace_image_token`` under the checkpoint's ``processor_config.json``,
and the frames' pixels from an image processor under the video processor's settings.
"""

import base64
import functools
import json

import numpy as np
import pytest
import torch
from test_models import QUESTION, _answers_through_serve, _image, llava_next_video_dir, video_llava_dir  # noqa: F401

from omnistage.actors.media import decode_video, encode_png, encode_video, sample_frame_indices
from omnistage.actors.payloads import LLMRequest

FAMILIES = ["video_llava", "llava_next_video"]
# Frames per video each family's encoder samples: Video-LLaVA's tiny checkpoint names none (5, the
# default), LLaVA-NeXT-Video's video processor config names 4.
NUM_FRAMES = {"video_llava": 5, "llava_next_video": 4}
# A frame's tokens: Video-LLaVA's 4x4 patches and CLS; LLaVA-NeXT-Video's 8x8 patches pooled 2x2.
FRAME_TOKENS = {"video_llava": 17, "llava_next_video": 16}


@pytest.fixture(scope="module")
def checkpoints(video_llava_dir, llava_next_video_dir):  # noqa: F811
    return {"video_llava": video_llava_dir, "llava_next_video": llava_next_video_dir}


def _video(seed, frames=9, h=20, w=28):
    """Frames that differ over time, so the sampled ones matter."""
    return np.random.default_rng(seed).integers(0, 256, (frames, h, w, 3), dtype=np.uint8)


def _processor(family, path):
    """The family's processor class, with the checkpoint's processor settings and image processor
    but without its video processor (torchvision): enough for its own token-count methods."""
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaNextVideoProcessor, VideoLlavaProcessor

    processor = object.__new__(VideoLlavaProcessor if family == "video_llava" else LlavaNextVideoProcessor)
    settings = json.loads((path / "processor_config.json").read_text())
    vars(processor).update(settings, image_processor=AutoImageProcessor.from_pretrained(path), tokenizer=AutoTokenizer.from_pretrained(path))
    return processor


def _video_pixels(family, path, frames):
    """(1, n_frames, 3, h, w): each frame made into pixels as the video processor makes it, by an
    image processor under the video processor's settings: Video-LLaVA's own image processor (the
    two share preprocessor_config.json), for LLaVA-NeXT-Video a CLIP processor read from its
    video_preprocessor_config.json (its image processor would tile the frame)."""
    from transformers import AutoImageProcessor, CLIPImageProcessor

    if family == "video_llava":
        pixels = AutoImageProcessor.from_pretrained(path)(images=list(frames), return_tensors="pt")["pixel_values_images"]
    else:
        pixels = CLIPImageProcessor.from_pretrained(path / "video_preprocessor_config.json")(images=list(frames), return_tensors="pt")["pixel_values"]
    return pixels[None]


@functools.cache
def _whole(path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path).eval()


def _reference(family, path, medium, modality, max_new_tokens):
    """From the whole model's generate on the inputs the family's processor would build for one
    medium and the question: the greedy ids up to the first EOS, their text, the number of prompt
    tokens and of media tokens, and the whole model's projected features for the medium. A video
    is given as the frames the encoder samples."""
    from transformers import AutoTokenizer

    model = _whole(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    processor = _processor(family, path)
    template = json.loads((path / "chat_template.json").read_text())["chat_template"]
    chat = [{"role": "user", "content": [{"type": modality}, {"type": "text", "text": QUESTION}]}]
    prompt = tokenizer.apply_chat_template(chat, chat_template=template, tokenize=False, add_generation_prompt=True)
    if modality == "video":
        pixels = {"pixel_values_videos": _video_pixels(family, path, medium)}
        tokens = processor.replace_video_token(pixels, 0)
        token = processor.video_token
    else:
        pixels = dict(processor.image_processor(images=[medium], return_tensors="pt"))
        if "pixel_values_images" in pixels:
            pixels = {"pixel_values": pixels["pixel_values_images"]}
        tokens = processor.replace_image_token(pixels, 0)
        token = processor.image_token
    ids = tokenizer(prompt.replace(token, tokens), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, **pixels, max_new_tokens=max_new_tokens, do_sample=False)[0, ids.shape[1] :].tolist()
        if modality == "video":
            # Video-LLaVA gives each frame's tokens, LLaVA-NeXT-Video the video's: one video either way.
            projected = model.model.get_video_features(pixels["pixel_values_videos"]).pooler_output.flatten(0, -2)
        else:
            projected = model.model.get_image_features(**pixels).pooler_output[0]
    eos = model.generation_config.eos_token_id
    new = out[: out.index(eos)] if eos in out else out
    # The LLM stage never samples a media token; the reference's answer must not hold one either.
    assert not {model.config.image_token_index, model.config.video_token_index} & set(new)
    return new, tokenizer.decode(new, skip_special_tokens=True), ids.shape[1], len(tokens) // len(token), projected.numpy()


def _sampled(video, family):
    return video[sample_frame_indices(len(video), NUM_FRAMES[family])]


def _chat(modality, medium):
    part = "image_url" if modality == "image" else "video_url"
    return [{"role": "user", "content": [{"type": part, part: medium}, {"type": "text", "text": QUESTION}]}]


@pytest.mark.parametrize("family", FAMILIES)
def test_video_family_split_matches_transformers_generate_token_for_token(checkpoints, family):
    """Stage by stage and through LocalPipeline: two videos and an image, each answered as the whole
    model answers it, with as many media tokens as the processor writes."""
    from omnistage.pipelines.local import LocalPipeline

    path = checkpoints[family]
    pipeline = LocalPipeline.from_pretrained(path)
    assert list(pipeline.encoders) == ["image", "video"] and not pipeline.generators
    assert pipeline.encoders["video"].num_frames == NUM_FRAMES[family]
    assert pipeline.input_projector.head_spec("video") == {"type": family, "in_dim": 32, "out_dim": 32}
    answers = []
    for seed in (0, 1):
        video = _video(seed)
        expected_ids, expected_text, n_prompt, n_video, projected = _reference(family, path, _sampled(video, family), "video", 12)
        assert len(expected_ids) >= 4  # a real answer, not an immediate end of sequence
        assert n_video == NUM_FRAMES[family] * FRAME_TOKENS[family]
        (features,) = pipeline.encoders["video"]([video])
        (embeddings,) = pipeline.input_projector([features])
        # Exactly the tokens the processor writes, holding what the whole model projects.
        assert embeddings.embeds.shape == (n_video, 32)
        np.testing.assert_allclose(embeddings.embeds, projected, rtol=1e-5, atol=1e-6)
        request = LLMRequest(messages=[{"role": "user", "content": f"<video>\n{QUESTION}"}], media=[embeddings], max_tokens=12)
        assert pipeline.llm([request])[0].token_ids == expected_ids
        result = pipeline.chat(_chat("video", video), max_tokens=12)
        assert (result.text, result.usage["completion_tokens"], result.usage["prompt_tokens"]) == (expected_text, len(expected_ids), n_prompt)
        answers.append(result.text)
    assert answers[0] != answers[1]  # the video reaches the answer

    # Images through the image encoder pool (LLaVA-NeXT-Video's tiled as LLaVA-NeXT's).
    image = _image(1, 20, 40)
    expected_ids, expected_text, n_prompt, n_image, projected = _reference(family, path, image, "image", 12)
    (embeddings,) = pipeline.input_projector(pipeline.encoders["image"]([image]))
    assert embeddings.embeds.shape == (n_image, 32)
    np.testing.assert_allclose(embeddings.embeds, projected, rtol=1e-5, atol=1e-6)
    result = pipeline.chat(_chat("image", image), max_tokens=12)
    assert (result.text, result.usage["completion_tokens"], result.usage["prompt_tokens"]) == (expected_text, len(expected_ids), n_prompt)


def test_video_encoder_takes_the_configs_frames_over_the_checkpoints(llava_next_video_dir):  # noqa: F811
    from omnistage.actors.video_encoder import VideoEncoder
    from omnistage.cluster.config import VideoEncoderConfig

    encoder = VideoEncoder(VideoEncoderConfig(model=str(llava_next_video_dir), num_frames=6))
    assert encoder([_video(0)])[0].features.shape == (6 * 16, 32)


@pytest.mark.parametrize("family", FAMILIES)
def test_video_family_caption_as_a_batch_job(checkpoints, family):
    """The caption job's steps over a table of MP4 videos, one block through each of the stages
    split from the checkpoint: the prepare step decodes the frames the encoder samples, and each
    answer is transformers' own for those frames."""
    import pyarrow as pa
    from test_batch import _caption_in_process

    from omnistage.actors.multimodal import pretrained_config
    from omnistage.pipelines.batch import _frames_per_video

    path = checkpoints[family]
    config = pretrained_config(path)
    assert _frames_per_video(config.stages.video_encoder) == NUM_FRAMES[family]
    videos = {f"video-{seed}": encode_video(_video(seed, h=20, w=28), fps=8) for seed in (0, 1)}
    table = pa.table({"id": list(videos), "video": list(videos.values())})
    out = _caption_in_process(table, "video", config, prompt=QUESTION)
    for row, data in zip(out.to_pylist(), videos.values()):
        # The reference sees what the pools see: the frames after their trip through MP4.
        expected_ids, expected_text, n_prompt, _, _ = _reference(family, path, _sampled(decode_video(data), family), "video", 8)
        assert row["error"] is None, row["error"]
        assert (row["answer"], row["completion_tokens"], row["prompt_tokens"]) == (expected_text, len(expected_ids), n_prompt)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_video_family_through_serve_matches_transformers_generate(ray_session, checkpoints, family):
    """A video (MP4 data URL, decoded by the video encoder pool) and an image, each through the
    family's own app, answered as transformers' generate answers them."""
    path = checkpoints[family]
    data = encode_video(_video(1), fps=8)
    image = _image(1, 20, 40)
    parts = [
        {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(data).decode()}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(encode_png(image)).decode()}},
    ]
    answers = _answers_through_serve(path, f"tiny-{family.replace('_', '-')}", parts, 12)
    expected = [
        _reference(family, path, _sampled(decode_video(data), family), "video", 12),
        _reference(family, path, image, "image", 12),
    ]
    for answer, (expected_ids, expected_text, n_prompt, _, _) in zip(answers, expected):
        assert answer["choices"][0]["message"]["content"] == expected_text
        assert answer["usage"]["completion_tokens"] == len(expected_ids) and answer["usage"]["prompt_tokens"] == n_prompt
