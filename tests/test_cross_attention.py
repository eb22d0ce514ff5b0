"""Cross-attention fusion: IDEFICS split across the pools, its decoder reading the resampled images
through its gated cross-attention layers, with exactly the answers of transformers' own
``generate`` on the whole model, request by request, while the engine batches requests with
different numbers of images, different prompt lengths, and none.

The references lay the prompt out with ``IdeficsProcessor`` itself (its BOS, its image tokens, its
image attention mask), from the pieces of the model card's prompt format.
"""

import numpy as np
import pytest
import torch
from test_models import QUESTION, _answers_through_serve, _chat, _image, idefics_dir  # noqa: F401 - a fixture

from omnistage.actors.payloads import Embeddings, LLMRequest

OTHER_QUESTION = "And this one, in short?"


@pytest.fixture(scope="module")
def whole(idefics_dir):  # noqa: F811 - the imported fixture
    """The whole model and its processor, loaded once for every reference."""
    from transformers import AutoProcessor, IdeficsForVisionText2Text

    return IdeficsForVisionText2Text.from_pretrained(idefics_dir).eval(), AutoProcessor.from_pretrained(idefics_dir)


@pytest.fixture(scope="module")
def pipeline(idefics_dir):  # noqa: F811
    from omnistage.pipelines.local import LocalPipeline

    return LocalPipeline.from_pretrained(idefics_dir)


def _reference(whole, pieces, max_new_tokens):
    """Greedy ids up to the first EOS, their text and the prompt's length, from generate on the
    whole model with the inputs IdeficsProcessor builds from ``pieces`` (text and images in turn)."""
    from PIL import Image

    model, processor = whole
    inputs = processor(text=[[p if isinstance(p, str) else Image.fromarray(p) for p in pieces]], return_tensors="pt")
    n_prompt = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)[0, n_prompt:].tolist()
    ends = [i for i, t in enumerate(out) if t in model.generation_config.eos_token_id]
    new = out[: ends[0]] if ends else out
    return new, processor.tokenizer.decode(new, skip_special_tokens=True), n_prompt, processor.tokenizer.decode(inputs["input_ids"][0])


def _one_image(image, question=QUESTION):
    """The model card's layout of one user turn with an image, then the question."""
    return ["User:", image, f"{question}<end_of_utterance>\nAssistant:"]


def _typed(question=QUESTION):
    """The LLM's form of ``_chat``: the image as a typed part, its embeddings given beside."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def _embed(pipeline, images):
    return pipeline.input_projector(pipeline.encoders["image"](images))


def test_idefics_split_matches_transformers_generate_token_for_token(pipeline, whole):
    model, _ = whole
    assert pipeline.input_projector.head_spec("image") == {"type": "idefics", "in_dim": 24, "out_dim": 24, "num_latents": 8, "fusion": "cross_attention"}
    assert pipeline.llm.fusion["image"] == "cross_attention"
    answers = []
    for seed in (0, 1):
        image = _image(seed)
        expected_ids, expected_text, n_prompt, prompt = _reference(whole, _one_image(image), 12)
        assert len(expected_ids) >= 4  # a real answer, not an immediate end of sequence
        # The template writes what the processor writes: one <image> between its fake tokens.
        assert pipeline.llm.render_prompt(_typed()) == prompt
        # Stage by stage: the tower's states and the resampled latents are the whole model's own.
        (features,) = pipeline.encoders["image"]([image])
        (embeddings,) = pipeline.input_projector([features])
        pixels = whole[1].image_processor([image], return_tensors="pt")
        with torch.no_grad():
            states = model.model.vision_model(pixel_values=pixels).last_hidden_state
            latents = model.model.perceiver_resampler(states)
        np.testing.assert_allclose(features.features, states[0].numpy(), rtol=1e-5, atol=1e-5)
        assert embeddings.fusion == "cross_attention" and embeddings.embeds.shape == (8, 24)
        np.testing.assert_allclose(embeddings.embeds, latents[0].numpy(), rtol=1e-5, atol=1e-5)
        request = LLMRequest(messages=_typed(), media=[embeddings], max_tokens=12)
        (result,) = pipeline.llm([request])
        # The prompt keeps its one image token: the latents go beside it, not into it.
        assert (result.token_ids, result.prompt_tokens) == (expected_ids, n_prompt)
        # Through LocalPipeline.
        chat = pipeline.chat(_chat(image), max_tokens=12)
        assert (chat.text, chat.usage["completion_tokens"], chat.usage["prompt_tokens"]) == (expected_text, len(expected_ids), n_prompt)
        answers.append(chat.text)
    assert answers[0] != answers[1]  # the image reaches the answer


@pytest.fixture(scope="module")
def three(pipeline, whole):
    """Two images in one turn, one image with another question, and no image at all, with their
    references: three prompt lengths, three numbers of images."""
    a, b, c = _image(0), _image(1), _image(2)
    two = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "First."}, {"type": "image"}, {"type": "text", "text": QUESTION}]}]
    one = _typed(OTHER_QUESTION)
    none = [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]
    requests = [
        LLMRequest(messages=two, media=_embed(pipeline, [a, b]), max_tokens=10),
        LLMRequest(messages=one, media=_embed(pipeline, [c]), max_tokens=10),
        LLMRequest(messages=none, max_tokens=10),
    ]
    references = [
        _reference(whole, ["User:", a, "First.", b, f"{QUESTION}<end_of_utterance>\nAssistant:"], 10),
        _reference(whole, _one_image(c, OTHER_QUESTION), 10),
        _reference(whole, [f"User:{QUESTION}<end_of_utterance>\nAssistant:"], 10),
    ]
    assert len({n_prompt for _, _, n_prompt, _ in references}) == 3
    return requests, references


def test_idefics_engine_batches_different_requests_exactly(pipeline, three):
    """The three requests in one batch: each row reads only its own images, each answer is its own
    request's generate."""
    requests, references = three
    engine = pipeline.llm.engine
    for i, request in enumerate(requests):
        engine.add(f"row-{i}", request)
    results = {}
    while engine.has_work():
        results |= {out.request_id: out.result for out in engine.step() if out.result is not None}
        if not results:
            assert len(engine.batch.seqs) == 3  # prefilled together, decoding together
    results = [results[f"row-{i}"] for i in range(3)]
    for result, (expected_ids, expected_text, n_prompt, _) in zip(results, references):
        assert (result.token_ids, result.text, result.prompt_tokens) == (expected_ids, expected_text, n_prompt)
    # The second image changes the first request's answer: its later positions read it.
    swapped = LLMRequest(messages=requests[0].messages, media=_embed(pipeline, [_image(0), _image(2)]), max_tokens=10)
    assert pipeline.llm([swapped])[0].token_ids != results[0].token_ids


def test_idefics_prompts_prefilled_in_chunks_stay_exact(pipeline, three):
    """Chunks of 7 prompt tokens: each chunk reads its own rows of the image mask, and rows with
    different numbers of images join the running batch one by one."""
    from omnistage.actors.engine import Engine
    from omnistage.cluster.config import EngineConfig

    requests, references = three
    results = Engine(pipeline.llm, EngineConfig(max_prefill_tokens=7)).generate(requests)
    for result, (expected_ids, _, n_prompt, _) in zip(results, references):
        assert (result.token_ids, result.prompt_tokens) == (expected_ids, n_prompt)


def test_idefics_llm_refuses_media_meant_for_the_other_way(pipeline):
    from omnistage.actors.errors import InvalidInputError

    image = _image(0)
    (embeddings,) = _embed(pipeline, [image])
    spliced = Embeddings("image", embeddings.embeds)
    with pytest.raises(InvalidInputError, match=r"read by cross_attention .* got embeddings meant for 'splice'"):
        pipeline.llm.check(LLMRequest(messages=_typed(), media=[spliced], max_tokens=4))
    wrong = Embeddings("image", np.zeros((5, 24), np.float32), fusion="cross_attention")
    with pytest.raises(InvalidInputError, match=r"shape \(8, 24\), got \(5, 24\)"):
        pipeline.llm.check(LLMRequest(messages=_typed(), media=[wrong], max_tokens=4))


def test_idefics_caption_as_a_batch_job(idefics_dir, whole):  # noqa: F811
    """The caption job's steps over a table of PNG images, one block through each of the stages
    split from the checkpoint: how the LLM reads the embeddings travels with them, and each
    answer is transformers' own."""
    import pyarrow as pa
    from test_batch import _caption_in_process

    from omnistage.actors.media import encode_png
    from omnistage.actors.multimodal import pretrained_config

    images = {f"image-{seed}": _image(seed) for seed in (0, 1)}
    table = pa.table({"id": list(images), "image": [encode_png(image) for image in images.values()]})
    out = _caption_in_process(table, "image", pretrained_config(idefics_dir), prompt=QUESTION)
    for row, image in zip(out.to_pylist(), images.values()):
        expected_ids, expected_text, n_prompt, _ = _reference(whole, _one_image(image), 8)
        assert row["error"] is None, row["error"]
        assert (row["answer"], row["completion_tokens"], row["prompt_tokens"]) == (expected_text, len(expected_ids), n_prompt)


@pytest.mark.slow
def test_idefics_through_serve_matches_transformers_generate(ray_session, idefics_dir, whole):  # noqa: F811
    import base64

    from omnistage.actors.media import encode_png

    image = _image(1)
    expected_ids, expected_text, n_prompt, _ = _reference(whole, _one_image(image), 12)
    url = "data:image/png;base64," + base64.b64encode(encode_png(image)).decode()
    (answer,) = _answers_through_serve(idefics_dir, "tiny-idefics", [{"type": "image_url", "image_url": {"url": url}}], 12)
    assert answer["choices"][0]["message"]["content"] == expected_text
    assert (answer["usage"]["completion_tokens"], answer["usage"]["prompt_tokens"]) == (len(expected_ids), n_prompt)
