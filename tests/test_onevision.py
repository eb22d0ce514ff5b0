"""LLaVA-OneVision split across the pools (image encoder, video encoder, input projector, LLM) with
exactly the answers of transformers' own ``generate`` on the whole model, for an image and a video.

Its processor cannot be built here (its video processor needs torchvision), so the reference
takes each piece from the checkpoint as the processor would, as tests/test_video_families.py does:
the prompt rendered by the tokenizer with the checkpoint's own template, the number of ``<image>`` /
``<video>`` tokens from ``LlavaOnevisionProcessor``'s own ``replace_image_token`` /
``replace_video_token`` under the checkpoint's ``processor_config.json``, the image's pixels from
its image processor, and the frames' pixels from an image processor under the video processor's
settings (video_preprocessor_config.json).
"""

import base64
import functools
import json

import numpy as np
import pytest
import torch
from test_models import QUESTION, _answers_through_serve, _image, llava_onevision_dir  # noqa: F401
from test_video_families import _video

from omnistage.actors.media import decode_video, encode_png, encode_video, sample_frame_indices
from omnistage.actors.payloads import LLMRequest

# The test image: 50x90, tiled into a 3x5 grid of 20x20 views (and the whole image). Its unpadded
# grid of 13x25 tokens holds more than nine views' (1.2 times 3x3 views of 5x5), so anyres_max_9
# downsamples it to 10x20 before the newlines: 25 + 10 * 21 = 235 tokens.
IMAGE_SIZE = (50, 90)
IMAGE_TOKENS = 235
# Frames per video: the video processor config names none, so the encoder's default 5; each
# frame's 5x5 grid is pooled to 3x3, and one newline ends the video.
NUM_FRAMES = 5
VIDEO_TOKENS = NUM_FRAMES * 9 + 1


def _processor(path, **settings):
    """``LlavaOnevisionProcessor`` with the checkpoint's processor settings (``settings`` over them)
    and image processor but without its video processor (torchvision): enough for its own
    token-count methods."""
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaOnevisionProcessor

    processor = object.__new__(LlavaOnevisionProcessor)
    saved = json.loads((path / "processor_config.json").read_text())
    vars(processor).update({**saved, **settings}, image_processor=AutoImageProcessor.from_pretrained(path), tokenizer=AutoTokenizer.from_pretrained(path))
    return processor


def _video_pixels(path, frames):
    """(1, n_frames, 3, h, w): each frame made into pixels as ``LlavaOnevisionVideoProcessor``
    makes it (RGB, resized to its size, rescaled, normalised; no crop), by a CLIP image processor
    read from its video_preprocessor_config.json (the checkpoint's image processor would tile it)."""
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor.from_pretrained(path / "video_preprocessor_config.json", do_center_crop=False)
    return processor(images=list(frames), return_tensors="pt")["pixel_values"][None]


@functools.cache
def _whole(path):
    from transformers import LlavaOnevisionForConditionalGeneration

    return LlavaOnevisionForConditionalGeneration.from_pretrained(path).eval()


def _reference(path, medium, modality, max_new_tokens):
    """From the whole model's generate on the inputs ``LlavaOnevisionProcessor`` would build for one
    medium and the question: the greedy ids up to the first EOS, their text, the number of prompt
    tokens and of media tokens, and the whole model's projected features for the medium. A video
    is given as the frames the encoder samples."""
    model = _whole(path)
    processor = _processor(path)
    tokenizer = processor.tokenizer
    template = json.loads((path / "chat_template.json").read_text())["chat_template"]
    chat = [{"role": "user", "content": [{"type": modality}, {"type": "text", "text": QUESTION}]}]
    prompt = tokenizer.apply_chat_template(chat, chat_template=template, tokenize=False, add_generation_prompt=True)
    if modality == "video":
        pixels = {"pixel_values_videos": _video_pixels(path, medium)}
        tokens, token = processor.replace_video_token(pixels, 0), processor.video_token
    else:
        pixels = dict(processor.image_processor(images=[medium], return_tensors="pt"))
        tokens, token = processor.replace_image_token(pixels, 0), processor.image_token
    ids = tokenizer(prompt.replace(token, tokens), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, **pixels, max_new_tokens=max_new_tokens, do_sample=False)[0, ids.shape[1] :].tolist()
        if modality == "video":
            projected = model.model.get_video_features(pixels["pixel_values_videos"]).pooler_output[0]
        else:
            projected = model.model.get_image_features(pixels["pixel_values"], pixels["image_sizes"]).pooler_output[0]
    ends = [i for i, token_id in enumerate(out) if token_id in model.generation_config.eos_token_id]
    new = out[: ends[0]] if ends else out
    # The LLM stage never samples a media token; the reference's answer must not hold one either.
    assert not {model.config.image_token_id, model.config.video_token_id} & set(new)
    return new, tokenizer.decode(new, skip_special_tokens=True), ids.shape[1], len(tokens) // len(token), projected.numpy()


def _sampled(video):
    return video[sample_frame_indices(len(video), NUM_FRAMES)]


def _chat(modality, medium):
    part = "image_url" if modality == "image" else "video_url"
    return [{"role": "user", "content": [{"type": part, part: medium}, {"type": "text", "text": QUESTION}]}]


def test_llava_onevision_image_is_downsampled_by_its_packing(llava_onevision_dir):  # noqa: F811
    """The test image takes the anyres_max_9 branch: the processor counts fewer tokens for it than
    it would with room for its whole grid."""
    pixels = dict(_processor(llava_onevision_dir).image_processor(images=[_image(0, *IMAGE_SIZE)], return_tensors="pt"))
    counts = [
        len(_processor(llava_onevision_dir, vision_aspect_ratio=ratio).replace_image_token(pixels, 0)) // len("<image>")
        for ratio in ("anyres_max_9", "anyres_max_36")
    ]
    assert counts == [IMAGE_TOKENS, 25 + 13 * 26]


def test_llava_onevision_split_matches_transformers_generate_token_for_token(llava_onevision_dir):  # noqa: F811
    """Stage by stage and through LocalPipeline: an image and a video, each answered as the whole
    model answers it, with as many media tokens as the processor writes."""
    from omnistage.actors.errors import InvalidInputError
    from omnistage.actors.payloads import Features
    from omnistage.pipelines.local import LocalPipeline

    path = llava_onevision_dir
    pipeline = LocalPipeline.from_pretrained(path)
    assert list(pipeline.encoders) == ["image", "video"] and not pipeline.generators
    assert pipeline.encoders["video"].num_frames == NUM_FRAMES
    assert pipeline.input_projector.head_spec("image") == {
        "type": "llava_onevision",
        "in_dim": 32,
        "out_dim": 32,
        "reads_image_size": True,
        "tokens_per_view": 25,
    }
    assert pipeline.input_projector.head_spec("video") == {"type": "llava_onevision", "in_dim": 32, "out_dim": 32, "tokens_per_frame": 25}
    answers = []
    for modality, medium, n_tokens in (("image", _image(0, *IMAGE_SIZE), IMAGE_TOKENS), ("video", _video(0), VIDEO_TOKENS)):
        seen = _sampled(medium) if modality == "video" else medium
        expected_ids, expected_text, n_prompt, n_media, projected = _reference(path, seen, modality, 12)
        assert len(expected_ids) >= 4  # a real answer, not an immediate end of sequence
        assert n_media == n_tokens
        (features,) = pipeline.encoders[modality]([medium])
        (embeddings,) = pipeline.input_projector([features])
        # Exactly the tokens the processor writes, holding what the whole model projects.
        assert embeddings.embeds.shape == (n_tokens, 32)
        np.testing.assert_allclose(embeddings.embeds, projected, rtol=1e-5, atol=1e-6)
        request = LLMRequest(messages=[{"role": "user", "content": f"<{modality}>\n{QUESTION}"}], media=[embeddings], max_tokens=12)
        assert pipeline.llm([request])[0].token_ids == expected_ids
        result = pipeline.chat(_chat(modality, medium), max_tokens=12)
        assert (result.text, result.usage["completion_tokens"], result.usage["prompt_tokens"]) == (expected_text, len(expected_ids), n_prompt)
        answers.append(result.text)
    assert answers[0] != answers[1]
    with pytest.raises(InvalidInputError, match=r"expected video features of whole frames \(25 tokens each: its llava_onevision head .*got 30 tokens"):
        pipeline.input_projector([Features("video", np.zeros((30, 32), np.float32))])


def test_llava_onevision_caption_as_a_batch_job(llava_onevision_dir):  # noqa: F811
    """The caption job's steps over a table of PNG images and one of MP4 videos, one block through
    each of the stages split from the checkpoint; each answer is transformers' own for what the
    pools see (the frames after their trip through MP4)."""
    import pyarrow as pa
    from test_batch import _caption_in_process

    from omnistage.actors.multimodal import pretrained_config

    path = llava_onevision_dir
    config = pretrained_config(path)
    image, video = _image(0, *IMAGE_SIZE), encode_video(_video(0), fps=8)
    for modality, data, seen in (("image", encode_png(image), image), ("video", video, _sampled(decode_video(video)))):
        out = _caption_in_process(pa.table({"id": ["a"], modality: [data]}), modality, config, prompt=QUESTION)
        (row,) = out.to_pylist()
        expected_ids, expected_text, n_prompt, _, _ = _reference(path, seen, modality, 8)
        assert row["error"] is None, row["error"]
        assert (row["answer"], row["completion_tokens"], row["prompt_tokens"]) == (expected_text, len(expected_ids), n_prompt)


@pytest.mark.slow
def test_llava_onevision_through_serve_matches_transformers_generate(ray_session, llava_onevision_dir):  # noqa: F811
    """An image (PNG data URL) and a video (MP4 data URL), each through the family's own app,
    answered as transformers' generate answers them."""
    path = llava_onevision_dir
    image, video = _image(0, *IMAGE_SIZE), encode_video(_video(0), fps=8)
    parts = [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(encode_png(image)).decode()}},
        {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(video).decode()}},
    ]
    answers = _answers_through_serve(path, "tiny-llava-onevision", parts, 12)
    expected = [_reference(path, image, "image", 12), _reference(path, _sampled(decode_video(video)), "video", 12)]
    for answer, (expected_ids, expected_text, n_prompt, _, _) in zip(answers, expected):
        assert answer["choices"][0]["message"]["content"] == expected_text
        assert answer["usage"]["completion_tokens"] == len(expected_ids) and answer["usage"]["prompt_tokens"] == n_prompt
