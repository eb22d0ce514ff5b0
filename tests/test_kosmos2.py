"""Kosmos-2 split across the pools (vision model, ``image_to_text_projection``, text model) with
exactly the answers of transformers' own ``generate`` on the whole model: stage by stage, through
``LocalPipeline``, in one engine batch with left padding, through the Serve app and through the
caption job's steps; and its grounded answers' phrases and boxes."""

import json

import numpy as np
import pytest
import test_models
import torch
from test_models import QUESTION, _answers_through_serve, _image

from omnistage.actors.errors import InvalidInputError
from omnistage.actors.payloads import LLMRequest

GROUNDED = "<grounding> An image of"


@pytest.fixture(scope="module")
def kosmos2_dir(tmp_path_factory):
    from omnistage.actors.tiny import build_kosmos2

    return build_kosmos2(tmp_path_factory.mktemp("kosmos2") / "tiny-kosmos2", seed=0)


@pytest.fixture(scope="module")
def kosmos2(kosmos2_dir):
    """The whole model and its processor, as the published checkpoint is used."""
    from transformers import AutoProcessor, Kosmos2ForConditionalGeneration

    return Kosmos2ForConditionalGeneration.from_pretrained(kosmos2_dir).eval(), AutoProcessor.from_pretrained(kosmos2_dir)


@pytest.fixture(scope="module")
def pipeline(kosmos2_dir):
    from omnistage.pipelines.local import LocalPipeline

    return LocalPipeline.from_pretrained(kosmos2_dir)


def _reference(kosmos2, image, text, max_new_tokens):
    """Greedy ids from the whole model's ``generate`` on the processor's inputs, the prompt's
    length, and the answer as the processor post-processes it: (clean text, entities)."""
    model, processor = kosmos2
    inputs = processor(text=text, images=image, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)[0].tolist()
    n_prompt = inputs["input_ids"].shape[1]
    new = out[n_prompt:]
    if model.generation_config.eos_token_id in new:
        new = new[: new.index(model.generation_config.eos_token_id)]
    raw = processor.tokenizer.decode(new, skip_special_tokens=True)
    return new, n_prompt, processor.post_process_generation(raw)


def _request(text, media, image=True, max_tokens=12):
    parts = [{"type": "image"}] if image else []
    return LLMRequest(messages=[{"role": "user", "content": [*parts, {"type": "text", "text": text}]}], media=media, max_tokens=max_tokens)


def _entities(found):
    return [{"text": name, "span": list(span), "boxes": [list(box) for box in boxes]} for name, span, boxes in found]


def test_kosmos2_split_matches_transformers_generate_token_for_token(kosmos2, pipeline):
    model, processor = kosmos2
    llm = pipeline.llm
    assert pipeline.input_projector.head_spec("image") == {"type": "kosmos-2", "in_dim": 32, "out_dim": 32, "num_queries": 64}
    # The prompt is the processor's, its 64 image slots one placeholder.
    inputs = processor(text=GROUNDED, images=_image(0))
    slots = iter([-1] * 64)
    expected = [next(slots) if m else t for t, m in zip(inputs["input_ids"], inputs["image_embeds_position_mask"])]
    assert llm.expand(llm.prompt_ids(_request(GROUNDED, [])), [64]) == expected
    answers = []
    for seed in (0, 1):
        image = _image(seed)
        expected_ids, n_prompt, (text, entities) = _reference(kosmos2, image, GROUNDED, 12)
        assert len(expected_ids) >= 4  # a real answer, not an immediate end of sequence
        # Stage by stage, as the Serve pools pass them on; each part computes what the whole model does.
        (features,) = pipeline.encoders["image"]([image])
        (embeddings,) = pipeline.input_projector([features])
        with torch.no_grad():
            pixels = processor(images=image, return_tensors="pt")["pixel_values"]
            whole = model.get_image_features(pixels)
            tower = model.vision_model(pixels).last_hidden_state
            normed = torch.nn.functional.normalize(model.vision_model.model.post_layernorm(tower), dim=-1)
        np.testing.assert_allclose(features.features, normed[0].numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(embeddings.embeds, whole.pooler_output[0].numpy(), rtol=1e-5, atol=1e-6)
        result = llm([_request(GROUNDED, [embeddings])])[0]
        assert result.token_ids == expected_ids
        assert (result.text, result.entities, result.prompt_tokens) == (text, _entities(entities), n_prompt)
        # Through LocalPipeline, from the image itself.
        chat = pipeline.chat([{"role": "user", "content": [{"type": "image_url", "image_url": image}, {"type": "text", "text": GROUNDED}]}], max_tokens=12)
        assert (chat.text, chat.entities, chat.usage["completion_tokens"]) == (text, _entities(entities), len(expected_ids))
        answers.append(result.token_ids)
    assert answers[0] != answers[1]  # the image reaches the answer


def test_kosmos2_batch_of_different_lengths_matches_each_alone(kosmos2, pipeline):
    """Two prompts of different lengths, one without an image, decoded in one batch: left padding
    and each row's positions give each the unpadded prompt's answer."""
    model, processor = kosmos2
    (embeddings,) = pipeline.input_projector(pipeline.encoders["image"]([_image(2)]))
    requests = {"image": _request(QUESTION, [embeddings]), "text": _request("A long text without an image, then", [], image=False)}
    expected = {"image": _reference(kosmos2, _image(2), QUESTION, 12)[0]}
    inputs = processor(text=requests["text"].messages[0]["content"][0]["text"], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)[0].tolist()
    expected["text"] = out[inputs["input_ids"].shape[1] :]
    if model.generation_config.eos_token_id in expected["text"]:
        expected["text"] = expected["text"][: expected["text"].index(model.generation_config.eos_token_id)]
    assert all(len(ids) >= 4 for ids in expected.values())
    engine = pipeline.llm.engine
    for rid, request in requests.items():
        engine.add(rid, request)
    results, widths = {}, []
    while engine.has_work():
        for out in engine.step():
            if out.result is not None:
                results[out.request_id] = out.result.token_ids
        if engine.batch is not None:
            widths.append(len(engine.batch.seqs))
    assert widths[0] == 2  # both prefilled together
    assert results == expected


def test_kosmos2_prompt_is_one_user_message_with_at_most_one_image(pipeline):
    image = np.zeros((64, 32), np.float32)
    from omnistage.actors.payloads import Embeddings

    two_turns = LLMRequest(
        messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "<image> An image of"}],
        media=[Embeddings("image", image)],
    )
    with pytest.raises(InvalidInputError, match=r"one user message for Kosmos-2.*\['user', 'assistant', 'user'\]"):
        pipeline.llm.check(two_turns)
    two_images = LLMRequest(messages=[{"role": "user", "content": "<image><image> An image of"}], media=[Embeddings("image", image)] * 2)
    with pytest.raises(InvalidInputError, match=r"at most one image in a Kosmos-2 prompt, got \['image', 'image'\]"):
        pipeline.llm.check(two_images)


def test_kosmos2_grounding_tokens_become_entities(pipeline):
    """A unit test of the mapping alone: a decoded answer holding phrases and location tokens (the
    published model's own example, tokenized by the tiny checkpoint's tokenizer) becomes the
    processor's clean text and entities, in the answer's JSON form."""
    tokenizer = pipeline.llm.tokenizer
    written = (
        "<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object> "
        "warming himself by<phrase> a fire</phrase><object><patch_index_0005><patch_index_0911></object>."
    )
    ids = tokenizer(written, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_tokens_to_ids("<patch_index_0863>") in ids
    answer = pipeline.llm.answer(tokenizer.decode(ids, skip_special_tokens=True))
    assert answer == {
        "text": "An image of a snowman warming himself by a fire.",
        "entities": [
            {"text": "a snowman", "span": [12, 21], "boxes": [[0.390625, 0.046875, 0.984375, 0.828125]]},
            {"text": "a fire", "span": [41, 47], "boxes": [[0.171875, 0.015625, 0.484375, 0.890625]]},
        ],
    }


def test_a_kosmos2_stream_shows_the_clean_text(pipeline):
    """Streamed token by token, the same answer's deltas never show a tag, and add up to the clean
    text of the whole answer."""
    from omnistage.actors.engine import TextStream

    llm = pipeline.llm
    written = (
        "<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object> "
        "warming himself by<phrase> a fire</phrase><object><patch_index_0005><patch_index_0911></object>."
    )
    stream = TextStream(llm.tokenizer, [], llm.visible_text)
    deltas = []
    for token in llm.tokenizer(written, add_special_tokens=False)["input_ids"]:
        if token not in llm.tokenizer.all_special_ids:
            stream.decode_ids.append(token)
        stream.update()
        deltas.append(stream.delta(done=False))
    stream.flush()
    deltas.append(stream.delta(done=True))
    assert not any("<" in delta or ">" in delta for delta in deltas)
    assert "".join(deltas) == llm.answer(stream.text)["text"] == "An image of a snowman warming himself by a fire."
    # Text the model writes with a "<" of its own is held back only until the answer is done.
    plain = TextStream(llm.tokenizer, [], llm.visible_text)
    plain.decode_ids = llm.tokenizer("a < b", add_special_tokens=False)["input_ids"]
    plain.update()
    assert (plain.delta(done=False), plain.delta(done=True)) == ("a", " < b")


def test_kosmos2_stages_read_only_their_part(request, tmp_path, kosmos2_dir):
    test_models.test_stages_read_only_their_part(request, tmp_path, "kosmos-2", "kosmos2_dir")


def test_kosmos2_caption_as_a_batch_job(kosmos2, kosmos2_dir):
    """The caption job's steps over a table of PNG images, one block through each of the stages
    split from the checkpoint: each answer is transformers' own, post-processed as its processor does."""
    import pyarrow as pa
    from test_batch import _caption_in_process

    from omnistage.actors.media import encode_png
    from omnistage.actors.multimodal import pretrained_config

    images = {f"image-{seed}": _image(seed) for seed in (0, 1)}
    table = pa.table({"id": list(images), "image": [encode_png(image) for image in images.values()]})
    out = _caption_in_process(table, "image", pretrained_config(kosmos2_dir), prompt=GROUNDED)
    for row, image in zip(out.to_pylist(), images.values()):
        expected_ids, n_prompt, (text, entities) = _reference(kosmos2, image, GROUNDED, 8)
        assert row["error"] is None, row["error"]
        assert (row["answer"], row["entities"], row["completion_tokens"], row["prompt_tokens"]) == (text, _entities(entities), len(expected_ids), n_prompt)


@pytest.mark.slow
def test_kosmos2_through_serve_matches_transformers_generate(ray_session, kosmos2, kosmos2_dir):
    import base64

    from omnistage.actors.media import encode_png

    image = _image(1)
    expected_ids, _, (text, entities) = _reference(kosmos2, image, QUESTION, 12)
    url = "data:image/png;base64," + base64.b64encode(encode_png(image)).decode()
    answer, events = _answers_through_serve(kosmos2_dir, "tiny-kosmos2", [{"type": "image_url", "image_url": {"url": url}}], 12, streamed=True)
    message = answer["choices"][0]["message"]
    assert (message["content"], message["entities"]) == (text, _entities(entities))
    assert answer["usage"]["completion_tokens"] == len(expected_ids)
    # Streamed, the same clean text in deltas, then the entities.
    deltas = [choice["delta"] for event in events for choice in event["choices"]]
    assert "".join(d.get("content", "") for d in deltas) == text
    assert [d["entities"] for d in deltas if "entities" in d] == [_entities(entities)]


def test_the_sdk_gives_the_messages_entities():
    """``ChatResult.entities`` is the assistant message's ``entities`` as the Serve app sends them
    (a scripted server's replies), and None where the message has none; a stream holds them once
    read."""
    from test_client import StubServer

    from omnistage.clients import Client

    entities = [{"text": "a snowman", "span": [0, 9], "boxes": [[0.390625, 0.046875, 0.984375, 0.828125]]}]
    usage = {"prompt_tokens": 80, "completion_tokens": 12, "total_tokens": 92}

    def reply(message):
        choice = {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": "stop"}
        return 200, {}, {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m", "choices": [choice], "usage": usage}

    def chunk(delta, finish_reason=None):
        return f"data: {json.dumps({'choices': [{'index': 0, 'delta': delta, 'finish_reason': finish_reason}]})}\n\n"

    # As the Serve app streams a grounded answer: the clean text's deltas, then the entities.
    events = chunk({"content": "a snow"}) + chunk({"content": "man"}) + chunk({"entities": entities}) + chunk({}, "stop") + "data: [DONE]\n\n"
    server = StubServer()
    server.replies = [
        reply({"content": "a snowman", "entities": entities}),
        reply({"content": "a snowman"}),
        (200, {"Content-Type": "text/event-stream"}, events.encode()),
    ]
    try:
        with Client(server.url, transport="json", max_retries=0) as client:
            grounded, plain = client.chat(GROUNDED), client.chat(GROUNDED)
            stream = client.chat_stream(GROUNDED)
            deltas = list(stream)
    finally:
        server.close()
    assert (grounded.text, grounded.entities) == ("a snowman", entities)
    assert plain.entities is None
    assert deltas == ["a snow", "man"] and (stream.result().text, stream.entities, stream.result().entities) == ("a snowman", entities, entities)
