"""InstructBLIP-Video split across the pools (video encoder, input projector, LLM) with exactly the
answers of transformers' own ``generate`` on the whole model.

Its processor cannot be built here (its video processor needs torchvision), so the reference runs
``InstructBlipVideoProcessor.__call__`` itself, with the checkpoint's tokenizers and settings, on
pixels its video processor would make: the checkpoint's image processor on each frame (the video
processor reads its settings from the same preprocessor_config.json, and its steps are the image
processor's). The processor lays the prompt out (the query tokens of 4 frames, BOS, the question)
and tokenizes the question for the Q-Former; the model runs its Q-Former once per frame.
"""

import base64
import functools
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_models import OTHER_QUESTION, QUESTION, _answers_through_serve, instructblip_video_dir  # noqa: F401

from omnistage.actors.media import decode_video, encode_video, sample_frame_indices
from omnistage.actors.payloads import LLMRequest

FRAMES = 4
# A frame's tokens (4x4 patches and CLS) and the Q-Former's queries per frame.
FRAME_TOKENS, QUERIES = 17, 8
# Two videos whose answers differ and hold no <video> token (which the LLM stage never samples),
# as sent and after a trip through MP4, for both questions: the whole model's greedy answers to most
# seeds do sample it.
SEEDS = (2, 8)


def _video(seed, frames=9, h=20, w=28):
    """Frames that differ over time, so the sampled ones matter."""
    return np.random.default_rng(seed).integers(0, 256, (frames, h, w, 3), dtype=np.uint8)


def _sampled(video):
    return video[sample_frame_indices(len(video), FRAMES)]


@functools.cache
def _whole(path):
    from transformers import InstructBlipVideoForConditionalGeneration

    return InstructBlipVideoForConditionalGeneration.from_pretrained(path).eval()


@functools.cache
def _processor(path):
    """``InstructBlipVideoProcessor`` with the checkpoint's tokenizers and processor settings, and in
    place of its video processor the checkpoint's image processor on each frame, one video a call."""
    from transformers import AddedToken, AutoImageProcessor, AutoTokenizer, InstructBlipVideoProcessor

    images = AutoImageProcessor.from_pretrained(path)

    def video_processor(frames, return_tensors=None):
        return {"pixel_values": images(images=list(frames), return_tensors="pt")["pixel_values"][None]}

    processor = object.__new__(InstructBlipVideoProcessor)
    settings = json.loads((path / "processor_config.json").read_text())
    vars(processor).update(
        tokenizer=AutoTokenizer.from_pretrained(path),
        qformer_tokenizer=AutoTokenizer.from_pretrained(path, subfolder="qformer_tokenizer"),
        num_query_tokens=settings["num_query_tokens"],
        video_processor=video_processor,
        # What its __init__ sets for a tokenizer that names no video token.
        video_token=AddedToken("<video>", normalized=False, special=True),
    )
    return processor


def _reference(path, frames, question, max_new_tokens):
    """From the whole model's generate on the processor's inputs for the frames and the question:
    the greedy ids up to the first EOS, their text, the number of prompt tokens and the projected queries."""
    model, processor = _whole(path), _processor(path)
    inputs = processor(images=frames, text=question, return_tensors="pt")
    n_prompt = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)[0, n_prompt:].tolist()
        queries = model.get_video_features(
            inputs["pixel_values"], qformer_input_ids=inputs["qformer_input_ids"], qformer_attention_mask=inputs["qformer_attention_mask"]
        ).pooler_output[0]
    eos = model.generation_config.eos_token_id
    new = out[: out.index(eos)] if eos in out else out
    assert model.config.video_token_index not in new
    return new, processor.tokenizer.decode(new, skip_special_tokens=True), n_prompt, queries.numpy()


def _chat(video, question):
    return [{"role": "user", "content": [{"type": "video_url", "video_url": video}, {"type": "text", "text": question}]}]


def test_instructblip_video_split_matches_transformers_generate_token_for_token(instructblip_video_dir):  # noqa: F811
    """Stage by stage and through LocalPipeline: two videos and two questions, each answered as the
    whole model answers them, the projector reading each frame with the question."""
    from omnistage.actors.errors import InvalidInputError
    from omnistage.actors.multimodal import pretrained_config
    from omnistage.pipelines.local import LocalPipeline

    path = instructblip_video_dir
    stages = pretrained_config(path).stages
    assert stages.video_encoder is not None and stages.image_encoder is None
    pipeline = LocalPipeline.from_pretrained(path)
    projector, llm = pipeline.input_projector, pipeline.llm
    assert list(pipeline.encoders) == ["video"] and pipeline.encoders["video"].num_frames == FRAMES
    spec = {"type": "instructblipvideo", "in_dim": 32, "out_dim": 32, "num_queries": QUERIES, "reads_instruction": True}
    assert projector.head_spec("video") == {**spec, "tokens_per_frame": FRAME_TOKENS}
    # The query tokens first, then BOS and the question as it is, as InstructBlipVideoProcessor lays them out.
    assert llm.render_prompt([{"role": "user", "content": f"<video>\n{QUESTION}"}]) == f"<video><s>{QUESTION}"
    answers = {}
    for seed, question in ((SEEDS[0], QUESTION), (SEEDS[1], QUESTION), (SEEDS[0], OTHER_QUESTION)):
        video = _video(seed)
        expected_ids, expected_text, n_prompt, queries = _reference(path, _sampled(video), question, 12)
        assert len(expected_ids) >= 4  # a real answer, not an immediate end of sequence
        (features,) = pipeline.encoders["video"]([video])
        assert features.features.shape == (FRAMES * FRAME_TOKENS, 32) and features.instruction is None
        (embeds,) = projector([replace(features, instruction=question)])
        # Every frame's queries, in time order, as the whole model projects them.
        assert embeds.embeds.shape == (FRAMES * QUERIES, 32)
        np.testing.assert_allclose(embeds.embeds, queries, rtol=1e-5, atol=1e-6)
        request = LLMRequest(messages=[{"role": "user", "content": f"<video>\n{question}"}], media=[embeds], max_tokens=12)
        assert llm([request])[0].token_ids == expected_ids
        result = pipeline.chat(_chat(video, question), max_tokens=12)
        assert (result.text, result.usage["completion_tokens"], result.usage["prompt_tokens"]) == (expected_text, len(expected_ids), n_prompt)
        answers[seed, question] = result.text
    assert len(set(answers.values())) == 3  # the video and the question both reach the answer

    # Videos with questions of different lengths share a batch, each projected as alone.
    a, b = pipeline.encoders["video"]([_video(seed) for seed in SEEDS])
    together = projector([replace(a, instruction=QUESTION), replace(b, instruction=OTHER_QUESTION)])
    for features, question, batched in zip((a, b), (QUESTION, OTHER_QUESTION), together):
        np.testing.assert_allclose(batched.embeds, projector([replace(features, instruction=question)])[0].embeds, rtol=1e-5, atol=1e-6)
    with pytest.raises(InvalidInputError, match=r"expected the text the video came with .*instructblipvideo head reads it\), got None"):
        projector([a])
    with pytest.raises(InvalidInputError, match=rf"expected video features of whole frames \({FRAME_TOKENS} tokens each.*got {FRAME_TOKENS + 1} tokens"):
        projector([replace(a, features=a.features[: FRAME_TOKENS + 1], instruction=QUESTION)])


def test_instructblip_video_caption_as_a_batch_job(instructblip_video_dir):  # noqa: F811
    """The caption job's steps over a table of MP4 videos, each row with its own question, one block
    through each of the stages split from the checkpoint: the projector reads each row's question
    from the instruction column, and each answer is transformers' own for the frames the encoder samples."""
    import pyarrow as pa
    from test_batch import _caption_in_process

    from omnistage.actors.multimodal import pretrained_config

    path = instructblip_video_dir
    rows = {"a": (SEEDS[0], QUESTION), "b": (SEEDS[1], OTHER_QUESTION)}
    videos = {key: encode_video(_video(seed), fps=8) for key, (seed, _) in rows.items()}
    table = pa.table({"id": list(rows), "video": list(videos.values()), "question": [question for _, question in rows.values()]})
    out = _caption_in_process(table, "video", pretrained_config(path), prompt_column="question")
    for row in out.to_pylist():
        # The reference sees what the pools see: the frames after their trip through MP4.
        frames = _sampled(decode_video(videos[row["id"]]))
        expected_ids, expected_text, n_prompt, _ = _reference(path, frames, rows[row["id"]][1], 8)
        assert row["error"] is None, row["error"]
        assert (row["answer"], row["completion_tokens"], row["prompt_tokens"]) == (expected_text, len(expected_ids), n_prompt)


@pytest.mark.slow
def test_instructblip_video_through_serve_matches_transformers_generate(ray_session, instructblip_video_dir):  # noqa: F811
    """A video (MP4 data URL, decoded by the video encoder pool) through the family's own app: the
    question goes from the ingress to the projector pool beside the video's features."""
    path = instructblip_video_dir
    data = encode_video(_video(SEEDS[1]), fps=8)
    part = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(data).decode()}}
    (answer,) = _answers_through_serve(path, "tiny-instructblip-video", [part], 12)
    expected_ids, expected_text, n_prompt, _ = _reference(path, _sampled(decode_video(data)), QUESTION, 12)
    assert answer["choices"][0]["message"]["content"] == expected_text
    assert answer["usage"]["completion_tokens"] == len(expected_ids) and answer["usage"]["prompt_tokens"] == n_prompt
