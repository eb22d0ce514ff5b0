"""Real checkpoint layouts per stage: LLaVA and BLIP-2 split across the stages with exactly the
answers of transformers' own ``generate``, the survey's model families loaded from local
directories, AudioLDM 2 driven by two conditionings from one output projector head, and load-time
checks between output projector and generator.

Every model is tiny, built from its config, saved with ``save_pretrained`` and loaded back through
the stages' own loaders (no hub).
"""

import io
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from omnistage.actors.payloads import (
    AudioClip,
    Conditioning,
    Embeddings,
    Features,
    GenerationRequest,
    LLMRequest,
    SignalGroup,
)

RNG = np.random.default_rng(0)
QUESTION = "What is it?"


def _image(seed=0, h=30, w=30):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _chat(image):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": image}, {"type": "text", "text": QUESTION}]}]


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    from omnistage.actors.tiny import build_llava

    return build_llava(tmp_path_factory.mktemp("llava") / "tiny-llava", seed=0)


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory):
    from omnistage.actors.tiny import build_blip2

    return build_blip2(tmp_path_factory.mktemp("blip2") / "tiny-blip2", seed=0)


def _reference(path, image, max_new_tokens, n_image_tokens=None):
    """Greedy token ids from transformers' generate on the whole model, with the prompt laid out
    as the model's processor does: each ``<image>`` repeated once per image token."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    processor = AutoImageProcessor.from_pretrained(path)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"<image>\n{QUESTION}"}], tokenize=False, add_generation_prompt=True
    )
    # As transformers' processors tokenize a rendered template: the tokenizer's special tokens
    # are added unless the prompt starts with BOS (ProcessorMixin.apply_chat_template).
    ids = tokenizer(rendered, add_special_tokens=not rendered.startswith(tokenizer.bos_token))["input_ids"]
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    n = n_image_tokens or model.config.num_query_tokens
    ids = [t for i in ids for t in ([i] * n if i == image_id else [i])]
    pixels = processor(images=[image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]), pixel_values=pixels, max_new_tokens=max_new_tokens, do_sample=False
        )[0].tolist()
    if model.config.text_config.is_encoder_decoder:
        new = out[1:]  # after the decoder start token
    else:
        new = out[len(ids) :] if len(out) > max_new_tokens else out
    eos = model.generation_config.eos_token_id
    if eos in new:
        new = new[: new.index(eos)]
    assert image_id not in new  # the stage never samples a placeholder; plain generate must not either
    return new, tokenizer.decode(new, skip_special_tokens=True), model


def _staged_ids(pipeline, image, max_tokens):
    """Token ids through the stage objects one by one, as the Serve pools pass them on."""
    features = pipeline.encoders["image"]([image])
    embeddings = pipeline.input_projector(features)
    request = LLMRequest(messages=[{"role": "user", "content": f"<image>\n{QUESTION}"}], media=embeddings, max_tokens=max_tokens)
    return pipeline.llm([request])[0].token_ids


# LLaVA


def test_llava_split_matches_transformers_generate_token_for_token(llava_dir):
    from omnistage.pipelines.local import LocalPipeline

    pipeline = LocalPipeline.from_pretrained(llava_dir)
    assert pipeline.config.name == "tiny-llava" and list(pipeline.encoders) == ["image"] and not pipeline.generators
    for seed in (0, 1):
        image = _image(seed)
        expected_ids, expected_text, _ = _reference(llava_dir, image, max_new_tokens=12, n_image_tokens=225)
        assert len(expected_ids) >= 4  # a real answer, not an immediate end of sequence
        assert _staged_ids(pipeline, image, 12) == expected_ids
        result = pipeline.chat(_chat(image), max_tokens=12)
        assert result.text == expected_text
        assert result.usage["prompt_tokens"] == 225 + len(pipeline.llm.prompt_ids(
            LLMRequest(messages=[{"role": "user", "content": f"<image>\n{QUESTION}"}]))) - 1
    # The prompt begins with the BOS LLaVA's tokenizer adds, as LlavaProcessor's does; the template writes none.
    ids = pipeline.llm.prompt_ids(LLMRequest(messages=[{"role": "user", "content": f"<image>\n{QUESTION}"}]))
    assert ids[0] == pipeline.llm.tokenizer.bos_token_id and ids.count(ids[0]) == 1
    # The image reaches the answer: a different image gives a different greedy answer.
    assert _staged_ids(pipeline, _image(0), 12) != _staged_ids(pipeline, _image(1), 12)


def test_llava_stages_take_their_part_of_the_checkpoint(llava_dir):
    from transformers import LlavaForConditionalGeneration

    from omnistage.actors.image_encoder import ImageEncoder
    from omnistage.actors.input_projector import InputProjector
    from omnistage.cluster.config import ImageEncoderConfig, InputProjectorConfig

    encoder = ImageEncoder(ImageEncoderConfig(model=str(llava_dir)))
    # vision_feature_layer -2 and the "default" strategy (drop CLS) come from the checkpoint.
    assert (encoder.feature_layer, encoder.drop_cls, encoder.feature_dim) == (-2, True, 32)
    features = encoder([_image()])
    assert features[0].features.shape == (225, 32)
    projector = InputProjector(InputProjectorConfig(model=str(llava_dir)))
    assert projector.head_spec("image") == {"type": "llava", "in_dim": 32, "out_dim": 32}
    projected = projector(features)[0].embeds

    model = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    pixels = encoder.processor(images=[_image()], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model.model.get_image_features(
            pixel_values=pixels, vision_feature_layer=-2, vision_feature_select_strategy="default",
            output_hidden_states=True,
        ).pooler_output[0]
    np.testing.assert_allclose(projected, expected.numpy(), rtol=1e-5, atol=1e-6)

    # A stage's own config still wins over the checkpoint's choice.
    explicit = ImageEncoder(ImageEncoderConfig(model=str(llava_dir), feature_layer=-1, drop_cls=False))
    assert explicit([_image()])[0].features.shape == (226, 32)


def test_from_pretrained_refuses_a_plain_checkpoint(tiny_preset):
    from omnistage.pipelines.local import LocalPipeline

    families = "LLaVA, LLaVA-NeXT, BLIP-2, InstructBLIP, Qwen2-Audio, IDEFICS, Kosmos-2, Video-LLaVA, LLaVA-NeXT-Video, InstructBLIP-Video or LLaVA-OneVision"
    with pytest.raises(ValueError, match=rf"{families} checkpoint directory.*model_type 'llama'"):
        LocalPipeline.from_pretrained(tiny_preset / "llm")


# LLaVA-NeXT: any-resolution tiling, packed by the input projector

# (height, width): one wide and one tall image, tiled into 1x2 and 3x1 grids of 16x16 views.
LLAVA_NEXT_SIZES = ((20, 40), (50, 24))


@pytest.fixture(scope="module")
def llava_next_dir(tmp_path_factory):
    from omnistage.actors.tiny import build_llava_next

    return build_llava_next(tmp_path_factory.mktemp("llava-next") / "tiny-llava-next", seed=0)


def _llava_next_reference(path, image, max_new_tokens):
    """From transformers' generate on the whole model, with the inputs ``LlavaNextProcessor`` builds
    (its chat template, its ``<image>`` expansion for the image's size): the greedy ids up to the
    first EOS, their text, the number of prompt tokens, of image tokens, and the packed image features."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    processor = AutoProcessor.from_pretrained(path)
    model = LlavaNextForConditionalGeneration.from_pretrained(path).eval()
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    inputs = processor(images=[image], text=processor.apply_chat_template(chat, add_generation_prompt=True), return_tensors="pt")
    n_prompt = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)[0, n_prompt:].tolist()
        packed = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output[0]
    eos = model.generation_config.eos_token_id
    new = out[: out.index(eos)] if eos in out else out
    n_image = int((inputs["input_ids"] == model.config.image_token_index).sum())
    return new, processor.tokenizer.decode(new, skip_special_tokens=True), n_prompt, n_image, packed.numpy()


def test_llava_next_split_matches_transformers_generate_token_for_token(llava_next_dir):
    from omnistage.pipelines.local import LocalPipeline

    pipeline = LocalPipeline.from_pretrained(llava_next_dir)
    assert pipeline.input_projector.head_spec("image") == {
        "type": "llava_next", "in_dim": 32, "out_dim": 32, "reads_image_size": True, "tokens_per_view": 16}
    answers = []
    for seed, (h, w) in enumerate(LLAVA_NEXT_SIZES):
        image = _image(seed, h, w)
        expected_ids, expected_text, n_prompt, n_image, packed = _llava_next_reference(llava_next_dir, image, 12)
        assert len(expected_ids) >= 4  # a real answer, not an immediate end of sequence
        (features,) = pipeline.encoders["image"]([image])
        assert features.image_size == (h, w)
        (embeddings,) = pipeline.input_projector([features])
        # Exactly the tokens LlavaNextProcessor writes for this size, holding what the whole model packs.
        assert embeddings.embeds.shape == (n_image, 32)
        np.testing.assert_allclose(embeddings.embeds, packed, rtol=1e-5, atol=1e-6)
        result = pipeline.chat(_chat(image), max_tokens=12)
        assert (result.text, result.usage["completion_tokens"], result.usage["prompt_tokens"]) == (
            expected_text, len(expected_ids), n_prompt)
        answers.append(result.text)
    assert answers[0] != answers[1]


def test_llava_next_projector_needs_the_image_size(llava_next_dir):
    from omnistage.actors.errors import InvalidInputError
    from omnistage.actors.input_projector import InputProjector
    from omnistage.cluster.config import InputProjectorConfig

    projector = InputProjector(InputProjectorConfig(model=str(llava_next_dir)))
    with pytest.raises(InvalidInputError, match=r"original \(height, width\).*got None"):
        projector([Features("image", np.zeros((48, 32), np.float32))])
    # A 20x40 image is tiled into the whole image and a 1x2 grid: 3 views.
    with pytest.raises(InvalidInputError, match=r"expected 3 views of 16 tokens for a 20x40 image, 48 tokens, got 64"):
        projector([Features("image", np.zeros((64, 32), np.float32), image_size=(20, 40))])


def test_llava_next_caption_as_a_batch_job(llava_next_dir):
    """The caption job's steps over a table of PNG images of two sizes, one block through each of
    the stages split from the checkpoint: each image's size travels with its features to the
    projector, and each answer is transformers' own."""
    import pyarrow as pa
    from test_batch import _caption_in_process

    from omnistage.actors.media import encode_png
    from omnistage.actors.multimodal import pretrained_config

    images = {f"image-{seed}": _image(seed, h, w) for seed, (h, w) in enumerate(LLAVA_NEXT_SIZES)}
    table = pa.table({"id": list(images), "image": [encode_png(image) for image in images.values()]})
    out = _caption_in_process(table, "image", pretrained_config(llava_next_dir), prompt=QUESTION)
    for row, image in zip(out.to_pylist(), images.values()):
        expected_ids, expected_text, n_prompt, _, _ = _llava_next_reference(llava_next_dir, image, 8)
        assert row["error"] is None, row["error"]
        assert (row["answer"], row["completion_tokens"], row["prompt_tokens"]) == (expected_text, len(expected_ids), n_prompt)


# BLIP-2


def test_blip2_split_matches_transformers_generate_token_for_token(blip2_dir):
    from omnistage.pipelines.local import LocalPipeline

    pipeline = LocalPipeline.from_pretrained(blip2_dir)
    assert pipeline.input_projector.head_spec("image") == {"type": "blip-2", "in_dim": 32, "out_dim": 32, "num_queries": 8}
    # The chat template puts the query tokens first, then BOS and the question, as BLIP-2's processor does.
    rendered = pipeline.llm.render_prompt([{"role": "user", "content": f"<image>\n{QUESTION}"}])
    assert rendered == f"<image><s>Question: {QUESTION} Answer:"
    for seed in (0, 1):
        image = _image(seed)
        expected_ids, expected_text, _ = _reference(blip2_dir, image, max_new_tokens=12)
        assert len(expected_ids) >= 4
        assert _staged_ids(pipeline, image, 12) == expected_ids
        assert pipeline.chat(_chat(image), max_tokens=12).text == expected_text
    features = pipeline.encoders["image"]([_image()])[0].features
    assert features.shape == (226, 32)  # BLIP-2 keeps CLS and reads last_hidden_state
    assert pipeline.input_projector([Features("image", features)])[0].embeds.shape == (8, 32)


def test_blip2_image_changes_the_answer(blip2_dir):
    from omnistage.pipelines.local import LocalPipeline

    pipeline = LocalPipeline.from_pretrained(blip2_dir)
    embeds = [pipeline.input_projector(pipeline.encoders["image"]([_image(s)]))[0].embeds for s in (0, 1)]
    assert not np.allclose(embeds[0], embeds[1])
    _, _, model = _reference(blip2_dir, _image(0), max_new_tokens=1)
    # The staged projector output is exactly what BLIP-2 scatters into the prompt.
    pixels = pipeline.encoders["image"].processor(images=[_image(0)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        image_embeds = model.vision_model(pixels).last_hidden_state
        query = model.qformer(query_embeds=model.query_tokens, encoder_hidden_states=image_embeds).last_hidden_state
        expected = model.language_projection(query)[0].numpy()
    np.testing.assert_allclose(embeds[0], expected, rtol=1e-5, atol=1e-6)


def test_blip2_encoder_as_serve_creates_it_reads_last_hidden_state(blip2_dir):
    """Serve replicas and batch actors get the stage config as a dict with every field filled, and
    a Serve config export goes through one more such dict: BLIP-2's own choice (last_hidden_state,
    CLS kept) must survive both, for the features Blip2ForConditionalGeneration feeds its Q-Former."""
    from transformers import Blip2ForConditionalGeneration

    from omnistage.actors.multimodal import pretrained_config
    from omnistage.actors.registry import create_stage
    from omnistage.pipelines.serve_config import config_from_serve_config, export_serve_config

    config = config_from_serve_config(export_serve_config(pretrained_config(blip2_dir)))
    encoder = create_stage("image_encoder", config.stages.image_encoder.model_dump(mode="json"))
    features = encoder([_image()])[0].features
    model = Blip2ForConditionalGeneration.from_pretrained(blip2_dir).eval()
    pixels = encoder.processor(images=[_image()], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model.vision_model(pixel_values=pixels).last_hidden_state[0]
    assert features.shape == (226, 32)
    np.testing.assert_allclose(features, expected.numpy(), rtol=1e-5, atol=1e-6)
    # A setting the stage config does make still wins over the checkpoint's, through the same dict.
    explicit = pretrained_config(blip2_dir)
    explicit.stages.image_encoder.feature_layer = -2
    assert create_stage("image_encoder", explicit.stages.image_encoder.model_dump(mode="json")).feature_layer == -2


# InstructBLIP: the Q-Former reads the question too

OTHER_QUESTION = "Describe the picture."


@pytest.fixture(scope="module")
def instructblip_dir(tmp_path_factory):
    from omnistage.actors.tiny import build_instructblip

    return build_instructblip(tmp_path_factory.mktemp("instructblip") / "tiny-instructblip", seed=0)


def _instructblip_reference(path, image, question, max_new_tokens):
    """From transformers' generate on the whole model, with the inputs its own processor builds
    from the image and the question (the prompt of both tokenizers): the greedy ids up to the
    first EOS, their text, the number of prompt tokens and the projected queries."""
    from transformers import AutoProcessor, InstructBlipForConditionalGeneration

    processor = AutoProcessor.from_pretrained(path)
    model = InstructBlipForConditionalGeneration.from_pretrained(path).eval()
    inputs = processor(images=[image], text=question, return_tensors="pt")
    n_prompt = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)[0].tolist()
        # After the decoder start token (Flan-T5), or after the prompt.
        out = out[1:] if model.config.text_config.is_encoder_decoder else out[n_prompt:]
        queries = model.get_image_features(
            inputs["pixel_values"], qformer_input_ids=inputs["qformer_input_ids"], qformer_attention_mask=inputs["qformer_attention_mask"]
        ).pooler_output[0]
    eos = model.generation_config.eos_token_id
    new = out[: out.index(eos)] if eos in out else out
    return new, processor.tokenizer.decode(new, skip_special_tokens=True), n_prompt, queries.numpy()


def _question_chat(image, question):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": image}, {"type": "text", "text": question}]}]


def test_instructblip_split_matches_transformers_generate_token_for_token(instructblip_dir):
    from dataclasses import replace

    from omnistage.actors.errors import InvalidInputError
    from omnistage.pipelines.local import LocalPipeline

    pipeline = LocalPipeline.from_pretrained(instructblip_dir)
    projector, llm = pipeline.input_projector, pipeline.llm
    assert projector.head_spec("image") == {"type": "instructblip", "in_dim": 32, "out_dim": 32, "num_queries": 8, "reads_instruction": True}
    # The query tokens first, then BOS and the question as it is, as InstructBlipProcessor lays them out.
    assert llm.render_prompt([{"role": "user", "content": f"<image>\n{QUESTION}"}]) == f"<image><s>{QUESTION}"
    for seed, question in ((0, QUESTION), (1, QUESTION), (0, OTHER_QUESTION)):
        image = _image(seed)
        expected_ids, expected_text, n_prompt, queries = _instructblip_reference(instructblip_dir, image, question, 12)
        assert len(expected_ids) >= 4  # a real answer, not an immediate end of sequence
        # Stage by stage, as the pools pass the payloads on: the projector gets the question with the features.
        (features,) = pipeline.encoders["image"]([image])
        assert features.features.shape == (226, 32) and features.instruction is None
        (embeds,) = projector([replace(features, instruction=question)])
        np.testing.assert_allclose(embeds.embeds, queries, rtol=1e-5, atol=1e-6)
        request = LLMRequest(messages=[{"role": "user", "content": f"<image>\n{question}"}], media=[embeds], max_tokens=12)
        assert llm([request])[0].token_ids == expected_ids
        result = pipeline.chat(_question_chat(image, question), max_tokens=12)
        assert result.text == expected_text and result.usage["prompt_tokens"] == n_prompt
    # Both the image and the question reach the queries; questions of different lengths share a batch.
    features, other_image = pipeline.encoders["image"]([_image(0), _image(1)])
    a, b, c = projector([replace(features, instruction=QUESTION), replace(features, instruction=OTHER_QUESTION),
                         replace(other_image, instruction=QUESTION)])
    assert not np.allclose(a.embeds, b.embeds) and not np.allclose(a.embeds, c.embeds)
    np.testing.assert_allclose(b.embeds, projector([replace(features, instruction=OTHER_QUESTION)])[0].embeds, rtol=1e-5, atol=1e-6)
    with pytest.raises(InvalidInputError, match=r"expected the text the image came with .*instructblip head reads it\), got None"):
        projector([features])


def test_instructblip_flan_t5_split_matches_transformers_generate(tmp_path):
    """InstructBLIP with Flan-T5: the projected queries and the question go into T5's encoder."""
    from omnistage.actors.tiny import build_instructblip
    from omnistage.pipelines.local import LocalPipeline

    path = build_instructblip(tmp_path / "tiny-instructblip-t5", seed=0, language="t5")
    pipeline = LocalPipeline.from_pretrained(path)
    assert type(pipeline.llm.model).__name__ == "T5ForConditionalGeneration"
    assert pipeline.llm.render_prompt([{"role": "user", "content": f"<image>\n{QUESTION}"}]) == f"<image>{QUESTION}</s>"
    for seed, question in ((0, QUESTION), (1, OTHER_QUESTION)):
        expected_ids, expected_text, n_prompt, _ = _instructblip_reference(path, _image(seed), question, 8)
        assert len(expected_ids) >= 2
        result = pipeline.chat(_question_chat(_image(seed), question), max_tokens=8)
        assert result.text == expected_text and result.usage["prompt_tokens"] == n_prompt
        assert result.usage["completion_tokens"] == len(expected_ids)


def test_a_projector_that_reads_the_question_needs_a_pool_of_its_own():
    from omnistage.pipelines.graph import Graph

    ports = {"image_encoder": {"feature_dim": 32}, "input_projector": {"heads": {"image": {
        "type": "instructblip", "in_dim": 32, "out_dim": 32, "num_queries": 8, "reads_instruction": True}}}}
    Graph(encoders=("image",), generators=()).check(ports)
    with pytest.raises(ValueError, match=r"image head reads the text .* expected input_projector.placement 'pool', got 'encoders'"):
        Graph(encoders=("image",), generators=(), projector_with_encoders=True).check(ports)


def test_instructblip_caption_as_a_batch_job(instructblip_dir):
    """The caption job's steps over a table of PNG images, each row with its own question, one block
    through each of the stages split from the checkpoint (as a Ray Data block goes through its pools):
    the projector reads each row's question from the instruction column."""
    import pyarrow as pa
    from test_batch import _caption_in_process

    from omnistage.actors.media import encode_png
    from omnistage.actors.multimodal import pretrained_config

    rows = {"a": (0, QUESTION), "b": (1, OTHER_QUESTION), "c": (0, OTHER_QUESTION)}
    table = pa.table({"id": list(rows), "image": [encode_png(_image(seed)) for seed, _ in rows.values()],
                      "question": [question for _, question in rows.values()]})
    out = _caption_in_process(table, "image", pretrained_config(instructblip_dir), prompt_column="question")
    for row in out.to_pylist():
        seed, question = rows[row["id"]]
        expected_ids, expected_text, n_prompt, _ = _instructblip_reference(instructblip_dir, _image(seed), question, 8)
        assert row["error"] is None, row["error"]
        assert (row["answer"], row["completion_tokens"], row["prompt_tokens"]) == (expected_text, len(expected_ids), n_prompt)


# Qwen2-Audio

# (seconds, tone in Hz): shorter than the 1 s window (17 audio tokens), the window (25), longer (cut to 25).
QWEN2_AUDIO_CLIPS = ((0.7, 220), (1.0, 1800), (1.5, 5000))


@pytest.fixture(scope="module")
def qwen2_audio_dir(tmp_path_factory):
    from omnistage.actors.tiny import build_qwen2_audio

    return build_qwen2_audio(tmp_path_factory.mktemp("qwen2-audio") / "tiny-qwen2-audio", seed=0)


def _sound(seconds, hz):
    """A tone in noise at 16 kHz: distinct sounds give the random tiny model distinct answers."""
    t = np.arange(int(16000 * seconds)) / 16000
    wave = 0.5 * np.sin(2 * np.pi * hz * t) + 0.1 * np.random.default_rng(0).standard_normal(t.size)
    return wave.astype(np.float32)


def _audio_chat(wave):
    return [{"role": "user", "content": [{"type": "input_audio", "input_audio": (wave, 16000)}, {"type": "text", "text": QUESTION}]}]


def _qwen2_audio_reference(path, waves, max_new_tokens):
    """Per 16 kHz clip, from transformers' generate on the whole model with the inputs its own
    processor builds from the chat (the checkpoint's template, audio tokens expanded): the greedy
    ids up to the first EOS, their text, the number of audio tokens and of prompt tokens."""
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    processor = AutoProcessor.from_pretrained(path)
    model = Qwen2AudioForConditionalGeneration.from_pretrained(path).eval()
    chat = [{"role": "user", "content": [{"type": "audio", "audio_url": "clip.wav"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    references = []
    for wave in waves:
        inputs = processor(text=prompt, audio=[wave], sampling_rate=16000, return_tensors="pt")
        n_prompt = inputs["input_ids"].shape[1]
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)[0, n_prompt:].tolist()
        ends = [i for i, t in enumerate(out) if t in model.generation_config.eos_token_id]
        new = out[: ends[0]] if ends else out
        n_audio = int((inputs["input_ids"] == model.config.audio_token_index).sum())
        references.append((new, processor.tokenizer.decode(new, skip_special_tokens=True), n_audio, n_prompt))
    return references


def test_qwen2_audio_split_matches_transformers_generate_token_for_token(qwen2_audio_dir):
    from omnistage.pipelines.local import LocalPipeline

    pipeline = LocalPipeline.from_pretrained(qwen2_audio_dir)
    assert list(pipeline.encoders) == ["audio"] and not pipeline.generators
    assert pipeline.input_projector.head_spec("audio") == {"type": "qwen2_audio", "in_dim": 32, "out_dim": 32}
    waves = [_sound(*clip) for clip in QWEN2_AUDIO_CLIPS]
    references = _qwen2_audio_reference(qwen2_audio_dir, waves, max_new_tokens=12)
    # As many audio tokens as the processor writes: from the clip's length, at most the window's.
    assert [n_audio for _, _, n_audio, _ in references] == [17, 25, 25]
    for wave, (expected_ids, expected_text, n_audio, n_prompt) in zip(waves, references):
        assert len(expected_ids) >= 4  # a real answer, not an immediate end of sequence
        features = pipeline.encoders["audio"]([AudioClip(wave, 16000)])
        assert features[0].features.shape == (n_audio, 32)
        request = LLMRequest(messages=[{"role": "user", "content": f"<audio>\n{QUESTION}"}], media=pipeline.input_projector(features), max_tokens=12)
        assert pipeline.llm([request])[0].token_ids == expected_ids
        result = pipeline.chat(_audio_chat(wave), max_tokens=12)
        assert result.text == expected_text and result.usage["prompt_tokens"] == n_prompt
    # The sound reaches the answer.
    assert len({tuple(ids) for ids, _, _, _ in references}) == 3
    # A batch of clips of different lengths gives each clip's own features.
    stage = pipeline.encoders["audio"].stage
    batched = stage([AudioClip(w, 16000) for w in waves])
    for wave, together in zip(waves, batched):
        np.testing.assert_allclose(together.features, stage([AudioClip(wave, 16000)])[0].features, rtol=1e-5, atol=1e-5)


def _whole(model_type, path):
    """The whole model; Qwen2-Audio is no image-text-to-text model, so its own class."""
    from transformers import AutoModelForImageTextToText, Qwen2AudioForConditionalGeneration

    cls = Qwen2AudioForConditionalGeneration if model_type == "qwen2_audio" else AutoModelForImageTextToText
    return cls.from_pretrained(path).eval()


def _parts_of_the_whole(model_type, path):
    """Each stage's loader by its part's name, with the whole model's weights for that part."""
    from omnistage.actors.audio_encoder import AudioEncoder
    from omnistage.actors.image_encoder import ImageEncoder
    from omnistage.actors.input_projector import InputProjector
    from omnistage.actors.llm import LLM
    from omnistage.actors.video_encoder import VideoEncoder
    from omnistage.cluster.config import AudioEncoderConfig, ImageEncoderConfig, InputProjectorConfig, LLMConfig, VideoEncoderConfig

    whole = _whole(model_type, path)
    modality = {"qwen2_audio": "audio", "instructblipvideo": "video"}.get(model_type, "image")
    stage, config = {"audio": (AudioEncoder, AudioEncoderConfig), "video": (VideoEncoder, VideoEncoderConfig)}.get(modality, (ImageEncoder, ImageEncoderConfig))

    def encoder(d):
        return stage(config(model=d)).model

    def projector(d):
        return InputProjector(InputProjectorConfig(model=d)).heads[modality]

    def llm(d):
        return LLM(LLMConfig(model=d, signal_tokens={})).model

    if model_type == "idefics":
        inner = whole.model
        # The decoder keeps the whole model's names; the tower and the resampler are the other pools'.
        language = {k: v for k, v in whole.state_dict().items() if not k.startswith(("model.vision_model.", "model.perceiver_resampler."))}
        return {
            "encoder": (encoder, inner.vision_model.state_dict()),
            "projector": (projector, inner.perceiver_resampler.state_dict()),
            "language": (llm, language),
        }
    if model_type == "kosmos-2":
        return {
            "encoder": (encoder, whole.vision_model.state_dict()),
            "projector": (projector, whole.image_to_text_projection.state_dict()),
            "language": (llm, whole.text_model.state_dict()),
        }
    if model_type in ("blip-2", "instructblip", "instructblipvideo"):
        bridge = {"query_tokens": whole.query_tokens, **{f"qformer.{k}": v for k, v in whole.qformer.state_dict().items()},
                  **{f"language_projection.{k}": v for k, v in whole.language_projection.state_dict().items()}}
        # InstructBLIP-Video's one tower is its video encoder's.
        return {
            "video_encoder" if modality == "video" else "encoder": (encoder, whole.vision_model.state_dict()),
            "projector": (projector, bridge),
            "language": (llm, whole.language_model.state_dict()),
        }
    inner = whole.model
    language = {**{f"model.{k}": v for k, v in inner.language_model.state_dict().items()}, "lm_head.weight": whole.lm_head.weight}
    tower = inner.audio_tower if modality == "audio" else inner.image_tower if model_type == "video_llava" else inner.vision_tower
    projected = inner.multi_modal_projector.state_dict()
    if model_type in ("llava_next", "llava_next_video", "llava_onevision"):
        # The packing's newline embedding is the projector pool's too.
        projected = {**{f"multi_modal_projector.{k}": v for k, v in projected.items()}, "image_newline": inner.image_newline}
    parts = {"encoder": (encoder, tower.state_dict()), "projector": (projector, projected), "language": (llm, language)}
    if model_type in ("video_llava", "llava_next_video", "llava_onevision"):
        frames = inner.video_tower if model_type == "video_llava" else inner.vision_tower
        parts["video_encoder"] = (lambda d: VideoEncoder(VideoEncoderConfig(model=d)).model, frames.state_dict())
    return parts


@pytest.mark.parametrize(
    "model_type, checkpoint",
    [("llava", "llava_dir"), ("llava_next", "llava_next_dir"), ("blip-2", "blip2_dir"), ("instructblip", "instructblip_dir"),
     ("qwen2_audio", "qwen2_audio_dir"), ("idefics", "idefics_dir"), ("video_llava", "video_llava_dir"),
     ("llava_next_video", "llava_next_video_dir"), ("instructblipvideo", "instructblip_video_dir"),
     ("llava_onevision", "llava_onevision_dir")],
)
def test_stages_read_only_their_part(request, tmp_path, model_type, checkpoint):
    """Each stage loads from a copy of the checkpoint holding only the shards its part is in, and
    holds exactly the whole model's weights for that part; an unsharded checkpoint gives the same parts."""
    import json
    import shutil

    from omnistage.actors.multimodal import PART_PREFIXES, read_part

    path = request.getfixturevalue(checkpoint)
    parts = _parts_of_the_whole(model_type, path)
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    for part, (load, expected) in parts.items():
        prefix = PART_PREFIXES[model_type][part]
        prefixes = (prefix,) if isinstance(prefix, str) else tuple(prefix)
        others = set(weight_map.values()) - {shard for key, shard in weight_map.items() if key.startswith(prefixes)}
        assert others, part
        copy = tmp_path / part
        shutil.copytree(path, copy, ignore=shutil.ignore_patterns(*others))
        state = load(str(copy)).state_dict()
        assert state.keys() == expected.keys(), part
        assert all(torch.equal(state[k], expected[k]) for k in state), part

    _whole(model_type, path).save_pretrained(tmp_path / "unsharded")
    assert not (tmp_path / "unsharded" / "model.safetensors.index.json").exists()
    for prefix in PART_PREFIXES[model_type].values():
        sharded, unsharded = read_part(path, prefix), read_part(tmp_path / "unsharded", prefix)
        assert sharded.keys() == unsharded.keys() and all(torch.equal(sharded[k], unsharded[k]) for k in sharded), prefix


def test_qwen2_audio_stages_honour_dtype(qwen2_audio_dir):
    from omnistage.actors.audio_encoder import AudioEncoder
    from omnistage.actors.input_projector import InputProjector
    from omnistage.actors.llm import LLM
    from omnistage.cluster.config import AudioEncoderConfig, InputProjectorConfig, LLMConfig

    model = str(qwen2_audio_dir)
    encoder = AudioEncoder(AudioEncoderConfig(model=model, dtype="bfloat16"))
    projector = InputProjector(InputProjectorConfig(model=model, dtype="bfloat16"))
    llm = LLM(LLMConfig(model=model, dtype="bfloat16", signal_tokens={}))
    for module in (encoder.model, projector.heads, llm.model):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    features = encoder([AudioClip(_sound(*QWEN2_AUDIO_CLIPS[0]), 16000)])
    embeds = projector(features)
    assert features[0].features.dtype == embeds[0].embeds.dtype == np.float32 and embeds[0].embeds.shape == (17, 32)
    request = LLMRequest(messages=[{"role": "user", "content": f"<audio>\n{QUESTION}"}], media=embeds, max_tokens=4)
    assert 1 <= len(llm([request])[0].token_ids) <= 4


def test_qwen2_audio_encoder_refuses_another_feature_layer(qwen2_audio_dir):
    from omnistage.actors.audio_encoder import AudioEncoder
    from omnistage.cluster.config import AudioEncoderConfig

    with pytest.raises(ValueError, match=r"expected feature_layer -1 for the Qwen2-Audio checkpoint .*, got -2"):
        AudioEncoder(AudioEncoderConfig(model=str(qwen2_audio_dir), feature_layer=-2))


# The survey's families, each built tiny, saved, and loaded through the stage's own loader

VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)


def _clip(path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    text = dict(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37)
    CLIPModel(CLIPConfig(text_config=text, vision_config=dict(image_size=30, patch_size=2, **VIT), projection_dim=16)).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}).save_pretrained(path)


def _vit(path):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    ViTModel(ViTConfig(image_size=30, patch_size=2, **VIT)).save_pretrained(path)
    ViTImageProcessor(size={"height": 30, "width": 30}).save_pretrained(path)


def _dinov2(path):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    Dinov2Model(Dinov2Config(image_size=30, patch_size=2, **VIT)).save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}).save_pretrained(path)


def _beit(path):
    from transformers import BeitConfig, BeitImageProcessor, BeitModel

    BeitModel(BeitConfig(image_size=30, patch_size=2, **VIT)).save_pretrained(path)
    BeitImageProcessor(size={"height": 30, "width": 30}, do_center_crop=False).save_pretrained(path)


def _siglip(path):
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    text = dict(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37)
    SiglipModel(SiglipConfig(text_config=text, vision_config=dict(image_size=30, patch_size=2, **VIT))).save_pretrained(path)
    SiglipImageProcessor(size={"height": 30, "width": 30}).save_pretrained(path)


@pytest.mark.parametrize(
    "family, build, tower, n_tokens",
    [
        ("clip", _clip, "CLIPVisionModel", 225),
        ("vit", _vit, "ViTModel", 225),
        ("dinov2", _dinov2, "Dinov2Model", 225),
        ("beit", _beit, "BeitModel", 225),
        ("siglip", _siglip, "SiglipVisionModel", 225),  # no CLS token: nothing is dropped
    ],
)
def test_image_encoder_families(tmp_path, family, build, tower, n_tokens):
    from omnistage.actors.image_encoder import ImageEncoder
    from omnistage.cluster.config import ImageEncoderConfig

    torch.manual_seed(0)
    build(tmp_path / family)
    encoder = ImageEncoder(ImageEncoderConfig(model=str(tmp_path / family)))
    assert type(encoder.model).__name__ == tower
    out = encoder([_image(0, 40, 50), _image(1)])
    assert [f.features.shape for f in out] == [(n_tokens, 32)] * 2
    assert np.isfinite(out[0].features).all() and not np.allclose(out[0].features, out[1].features)
    pixels = encoder.processor(images=[_image(1)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = encoder.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][0]
    np.testing.assert_allclose(out[1].features, hidden[-n_tokens:].numpy(), rtol=1e-5, atol=1e-5)


def _tokenizer():
    from omnistage.actors.tiny import TINY_CHAT_TEMPLATE, _byte_tokenizer

    return _byte_tokenizer([], TINY_CHAT_TEMPLATE)


def _llama(path, vocab):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


def _qwen2(path, vocab):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


def _opt(path, vocab):
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(OPTConfig(vocab_size=vocab, hidden_size=32, ffn_dim=37, num_hidden_layers=2,
                                    num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=512))


def _persimmon(path, vocab):
    from transformers import PersimmonConfig, PersimmonForCausalLM

    return PersimmonForCausalLM(PersimmonConfig(vocab_size=vocab, hidden_size=32, intermediate_size=37,
                                                num_hidden_layers=2, num_attention_heads=4))


@pytest.mark.parametrize(
    "family, build, cls",
    [
        ("llama", _llama, "LlamaForCausalLM"),  # Vicuna is a LLaMA fine-tune: same class
        ("qwen2", _qwen2, "Qwen2ForCausalLM"),
        ("opt", _opt, "OPTForCausalLM"),
        ("persimmon", _persimmon, "PersimmonForCausalLM"),
    ],
)
def test_llm_families(tmp_path, family, build, cls):
    from omnistage.actors.llm import LLM
    from omnistage.cluster.config import LLMConfig

    tokenizer = _tokenizer()
    torch.manual_seed(0)
    model = build(tmp_path, len(tokenizer))
    for name in ("eos_token_id", "pad_token_id"):
        setattr(model.config, name, getattr(tokenizer, name))
        setattr(model.generation_config, name, getattr(tokenizer, name))
    model.save_pretrained(tmp_path / family)
    tokenizer.save_pretrained(tmp_path / family)

    llm = LLM(LLMConfig(model=str(tmp_path / family), signal_tokens={}))
    assert type(llm.model).__name__ == cls
    # Text only: the stage's greedy decode equals the model's own generate.
    request = LLMRequest(messages=[{"role": "user", "content": "Hi there"}], max_tokens=6)
    ids = llm.prompt_ids(request)
    with torch.no_grad():
        expected = llm.model.generate(input_ids=torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids):].tolist()
    if tokenizer.eos_token_id in expected:
        expected = expected[: expected.index(tokenizer.eos_token_id)]
    assert llm([request])[0].token_ids == expected
    # With an image spliced in at its placeholder.
    media = [Embeddings("image", RNG.standard_normal((5, 32)).astype(np.float32))]
    result = llm([LLMRequest(messages=[{"role": "user", "content": "<image> Hi"}], media=media, max_tokens=3)])[0]
    assert result.prompt_tokens == len(llm.prompt_ids(LLMRequest(messages=[{"role": "user", "content": "<image> Hi"}]))) + 4
    assert 1 <= len(result.token_ids) <= 3


def _whisper(path):
    from omnistage.actors.tiny import build_audio_encoder

    build_audio_encoder(path, 0)


def _hubert(path):
    from transformers import HubertConfig, HubertModel, Wav2Vec2FeatureExtractor

    HubertModel(HubertConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, conv_dim=(16, 16),
        conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
    )).save_pretrained(path)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True).save_pretrained(path)


def _clap(path):
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel

    audio = dict(window_size=4, spec_size=128, num_mel_bins=64, patch_size=4, patch_stride=[4, 4], hidden_size=32,
                 patch_embeds_hidden_size=16, depths=[1, 1], num_attention_heads=[2, 2], num_hidden_layers=2, projection_dim=16)
    text = dict(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37, projection_dim=16)
    ClapModel(ClapConfig(audio_config=audio, text_config=text, projection_dim=16)).save_pretrained(path)
    ClapFeatureExtractor(feature_size=64, sampling_rate=16000, hop_length=160, max_length_s=1, fft_window_size=400,
                         truncation="rand_trunc").save_pretrained(path)


@pytest.mark.parametrize(
    "family, build, cls, shapes",
    [
        ("whisper", _whisper, "WhisperEncoder", [(50, 16), (50, 16)]),  # a fixed 1 s window
        ("hubert", _hubert, "HubertModel", [(1599, 16), (799, 16)]),  # one frame per 10 ms of the clip
        ("clap", _clap, "ClapAudioModel", [(256, 32), (256, 32)]),  # HTSAT's 16 x 16 feature map
    ],
)
def test_audio_encoder_families(tmp_path, family, build, cls, shapes):
    from omnistage.actors.audio_encoder import AudioEncoder
    from omnistage.cluster.config import AudioEncoderConfig

    torch.manual_seed(0)
    build(tmp_path / family)
    encoder = AudioEncoder(AudioEncoderConfig(model=str(tmp_path / family)))
    assert type(encoder.model).__name__ == cls
    clips = [AudioClip(RNG.uniform(-0.5, 0.5, 16000).astype(np.float32), 16000),
             AudioClip(RNG.uniform(-0.5, 0.5, 16000).astype(np.float32), 32000)]  # 0.5 s at 32 kHz
    out = encoder(clips)
    assert [f.features.shape for f in out] == shapes
    assert all(np.isfinite(f.features).all() for f in out)
    assert out[0].features.shape[1] == encoder.feature_dim
    # Batched or alone, a clip gives the same features.
    np.testing.assert_allclose(encoder(clips[1:])[0].features, out[1].features, rtol=1e-4, atol=1e-5)


# Output projector and generator must agree, checked at load


IMAGE_MISMATCH = (
    {"type": "transformer", "d_model": 32, "num_heads": 4, "num_encoder_layers": 1, "num_decoder_layers": 1,
     "ffn_dim": 64, "num_queries": 77, "out_dim": 48},
    r"produces conditioning of shape \(77, 48\), but the image generator expects \(any, 32\)",
)


@pytest.mark.parametrize(
    "modality, head, message",
    [
        ("image", *IMAGE_MISMATCH),
        ("audio", {"type": "mlp", "num_signal_tokens": 8, "hidden_dim": 64, "num_queries": 2, "out_dim": 32},
         r"produces conditioning of shape \(2, 32\), but the audio generator expects \(1, 32\)"),
    ],
)
def test_output_projector_generator_mismatch_fails_at_load(tmp_path, tiny_preset, modality, head, message):
    from omnistage.pipelines.local import LocalPipeline

    with pytest.raises(ValueError, match=message):
        LocalPipeline(_mismatched(tmp_path, tiny_preset, modality, head))


def _mismatched(tmp_path, tiny_preset, modality, head):
    """A config whose output projector head does not fit its ``modality`` generator."""
    from omnistage.actors.heads import save_heads
    from omnistage.actors.output_projector import OutputProjector
    from omnistage.cluster.config import OmnistageConfig

    spec = {"heads": {modality: {**head, "in_dim": 32}}}
    save_heads(OutputProjector.build_heads(spec), spec, tmp_path / "projector")
    small = {"resources": {"num_cpus": 0.1}, "scaling": {"min_replicas": 1, "max_replicas": 1}}
    return OmnistageConfig.model_validate({
        "name": "mismatch",
        "stages": {
            "llm": {"model": "tiny", **small},
            "output_projector": {"model": str(tmp_path / "projector"), **small},
            f"{modality}_generator": {"model": str(tiny_preset / f"{modality}_generator"), **small},
        },
        "server": {"ingress": small},
    })


def test_a_batch_job_whose_stages_do_not_fit_fails_before_any_row(tmp_path, tiny_preset, ray_session):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from omnistage.pipelines import batch

    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["a cat", "a dog"]}), tmp_path / "in.parquet")
    head, message = IMAGE_MISMATCH
    with pytest.raises(ValueError, match=message):
        batch.run_generate(str(tmp_path / "in.parquet"), str(tmp_path / "out"), config=_mismatched(tmp_path, tiny_preset, "image", head))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.slow
def test_serve_refuses_to_deploy_stages_that_do_not_fit(tmp_path, tiny_preset, serve_url):
    from ray import serve

    from omnistage.pipelines.serve import deploy

    head, message = IMAGE_MISMATCH
    with pytest.raises(ValueError, match=message):
        deploy(_mismatched(tmp_path, tiny_preset, "image", head), name="mismatch", route_prefix="/mismatch")
    assert "mismatch" not in serve.status().applications


# AudioLDM 2: prompt_embeds and generated_prompt_embeds, both from one output projector head

# Flan-T5 (prompt_embeds) and GPT-2 (generated_prompt_embeds) widths of the tiny UNet.
A2_PROMPT_WIDTH, A2_GENERATED_WIDTH = 24, 16
A2_SECONDS = 0.5
A2_HEAD = {
    "type": "transformer", "in_dim": 32, "d_model": 32, "num_heads": 4, "num_encoder_layers": 1,
    "num_decoder_layers": 1, "ffn_dim": 64, "num_queries": 6, "out_dim": A2_PROMPT_WIDTH,
    "generated": {"type": "mlp", "num_signal_tokens": 8, "hidden_dim": 64, "num_queries": 8, "out_dim": A2_GENERATED_WIDTH},
}


@pytest.fixture(scope="module")
def audioldm2_dir(tmp_path_factory):
    """AudioLDM 2 with only what runs on given conditioning: UNet, VAE, vocoder and scheduler. The
    text encoders, tokenizers, projection model and GPT-2 are saved as null."""
    from diffusers import AudioLDM2Pipeline, AudioLDM2UNet2DConditionModel, AutoencoderKL, DDIMScheduler
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    path = tmp_path_factory.mktemp("audioldm2") / "tiny-audioldm2"
    torch.manual_seed(0)
    unet = AudioLDM2UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        # Per block: self-attention only, then GPT-2's sequence, then Flan-T5's (diffusers' own tests: [None, 16, 32]).
        cross_attention_dim=([None, A2_GENERATED_WIDTH, A2_PROMPT_WIDTH],) * 2,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=1, out_channels=1, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    torch.manual_seed(0)
    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(
        model_in_dim=8, sampling_rate=16000, upsample_initial_channel=16, upsample_rates=[8, 8],
        upsample_kernel_sizes=[16, 16], resblock_kernel_sizes=[3, 7], resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]],
        normalize_before=False, initializer_range=0.1,  # the default 0.01 is silence as 16-bit PCM
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    unused = dict.fromkeys(["text_encoder", "text_encoder_2", "projection_model", "language_model", "tokenizer",
                            "tokenizer_2", "feature_extractor"])
    AudioLDM2Pipeline(vae=vae, unet=unet, scheduler=scheduler, vocoder=vocoder, **unused).save_pretrained(path)
    return path


def _output_projector(path, heads):
    from omnistage.actors.heads import save_heads
    from omnistage.actors.output_projector import OutputProjector

    spec = {"heads": heads}
    save_heads(OutputProjector.build_heads(spec), spec, path)
    return path


def test_audioldm2_widths_follow_the_unet_layout():
    from omnistage.actors.generator import _audioldm2_widths

    assert _audioldm2_widths([[None, 768, 1024]] * 4) == (1024, 768)  # (Flan-T5-large, GPT-2 base)
    with pytest.raises(ValueError, match=r"one prompt_embeds width.*got cross_attention_dim \(8, 16\)"):
        _audioldm2_widths((8, 16))  # one cross-attention per block: no Flan-T5 stream


def test_audioldm2_generates_wav_from_output_projector(tmp_path, audioldm2_dir):
    from omnistage.actors.errors import InvalidInputError
    from omnistage.actors.generator import AudioGenerator
    from omnistage.actors.output_projector import OutputProjector
    from omnistage.cluster.config import AudioGeneratorConfig, OutputProjectorConfig

    generator = AudioGenerator(AudioGeneratorConfig(model=str(audioldm2_dir), num_inference_steps=2, audio_length_s=A2_SECONDS))
    assert type(generator.pipeline).__name__ == "AudioLDM2Pipeline"
    assert generator.conditioning_shape == (None, A2_PROMPT_WIDTH)
    assert generator.generated_shape == (None, A2_GENERATED_WIDTH)
    projector = OutputProjector(OutputProjectorConfig(model=str(_output_projector(tmp_path / "projector", {"audio": A2_HEAD}))))
    assert projector.conditioning_shape("audio") == (6, A2_PROMPT_WIDTH)
    assert projector.generated_shape("audio") == (8, A2_GENERATED_WIDTH)

    signals = [SignalGroup("audio", np.random.default_rng(s).standard_normal((8, 32)).astype(np.float32)) for s in (0, 1)]
    conditionings = projector(signals)
    for c in conditionings:
        assert c.embeds.shape == (6, A2_PROMPT_WIDTH) and c.generated_embeds.shape == (8, A2_GENERATED_WIDTH)
        assert c.embeds.dtype == c.generated_embeds.dtype == np.float32
    conditioning = conditionings[0]

    first, again, other_seed = (generator([GenerationRequest(conditioning, seed=s)])[0] for s in (0, 0, 1))
    rate = generator.pipeline.vocoder.config.sampling_rate
    assert first.modality == "audio" and first.mime_type == "audio/wav" and first.rate == rate == 16000
    assert first.array.shape == (int(A2_SECONDS * rate),) and first.array.dtype == np.float32
    assert np.isfinite(first.array).all() and np.abs(first.array).max() > 0.01  # audible once 16-bit PCM
    samples, decoded_rate = sf.read(io.BytesIO(first.data), dtype="float32")
    assert decoded_rate == rate and samples.shape == first.array.shape
    assert first.data == again.data and not np.array_equal(first.array, other_seed.array)

    # embeds are prompt_embeds and generated_embeds are generated_prompt_embeds: the stage's output is
    # the pipeline's own for the same tensors and noise.
    with torch.no_grad():
        direct = generator.pipeline(
            prompt_embeds=torch.from_numpy(conditioning.embeds[None]),
            generated_prompt_embeds=torch.from_numpy(conditioning.generated_embeds[None]),
            num_inference_steps=2, guidance_scale=1.0, audio_length_in_s=A2_SECONDS,
            generator=torch.Generator().manual_seed(0),
        ).audios[0]
    np.testing.assert_array_equal(first.array, direct)
    # Both conditionings reach the audio.
    for changed in (Conditioning("audio", conditioning.embeds + 1, conditioning.generated_embeds),
                    Conditioning("audio", conditioning.embeds, conditioning.generated_embeds + 1)):
        assert not np.allclose(generator([GenerationRequest(changed, seed=0)])[0].array, first.array, atol=1e-4)
    # A batch gives what single calls give (up to the order of batched CPU sums).
    batched = generator([GenerationRequest(c, seed=i) for i, c in enumerate(conditionings)])
    np.testing.assert_allclose(batched[0].array, first.array, rtol=0, atol=1e-5)
    assert not np.allclose(batched[0].array, batched[1].array)

    with pytest.raises(InvalidInputError, match=r"generated conditioning \(generated_embeds\) of shape \(seq_len, 16\) "
                                                r"for AudioLDM2Pipeline, got None"):
        generator([GenerationRequest(Conditioning("audio", conditioning.embeds), seed=0)])
    wide = Conditioning("audio", conditioning.embeds, np.zeros((8, 32), np.float32))
    with pytest.raises(InvalidInputError, match=r"generated conditioning of shape \(seq_len, 16\), got shape \(8, 32\)"):
        generator([GenerationRequest(wide, seed=0)])


def test_audioldm2_through_local_pipeline(tmp_path, audioldm2_dir):
    """The whole path: LLM signal tokens -> one head making both conditionings -> AudioLDM 2 -> WAV."""
    from omnistage.cluster.config import OmnistageConfig
    from omnistage.pipelines.local import LocalPipeline

    config = OmnistageConfig.model_validate({
        "name": "audioldm2",
        "stages": {
            "llm": {"model": "tiny"},
            "output_projector": {"model": str(_output_projector(tmp_path / "projector", {"audio": A2_HEAD}))},
            "audio_generator": {"model": str(audioldm2_dir), "num_inference_steps": 2, "audio_length_s": A2_SECONDS},
        },
    })
    pipeline = LocalPipeline(config)  # the load-time check accepts both conditionings
    result = pipeline.chat([{"role": "user", "content": "Play a drum."}], max_tokens=4, seed=0, modalities=["text", "audio"])
    (media,) = result.media
    assert media.modality == "audio" and media.mime_type == "audio/wav"
    samples, rate = sf.read(io.BytesIO(media.data), dtype="float32")
    assert rate == 16000 and samples.shape == (int(A2_SECONDS * 16000),) and np.isfinite(samples).all()


def test_audioldm2_generation_as_a_batch_job(tmp_path, audioldm2_dir):
    """The batch job's adapters carry both conditionings from the output projector to AudioLDM 2."""
    import pyarrow as pa

    from omnistage.cluster.config import AudioGeneratorConfig, LLMConfig, OutputProjectorConfig
    from omnistage.pipelines import batch

    table = batch.prepare_generate(pa.table({"id": ["a", "b"], "prompt": ["Play a drum.", "A bell."]}), id_column="id", prompt_column="prompt", seed=0)
    table = batch.LLMUDF(LLMConfig(), modality=None, force="audio", max_tokens=4, temperature=0.0, answer_column="text")(table)
    projector = OutputProjectorConfig(model=str(_output_projector(tmp_path / "projector", {"audio": A2_HEAD})))
    table = batch.OutputProjectorUDF(projector, "audio")(table)
    generator = AudioGeneratorConfig(model=str(audioldm2_dir), num_inference_steps=2, audio_length_s=A2_SECONDS)
    table = batch.GeneratorUDF(generator, "audio")(table)
    out = batch.finish(table, id_column="id", schema=batch.GENERATE_SCHEMA, constants={"modality": "audio", "model": "a2", "run_id": "t"})
    for row in out.to_pylist():
        assert row["error"] is None, row["error"]
        samples, rate = sf.read(io.BytesIO(row["media"]), dtype="float32")
        assert row["mime_type"] == "audio/wav" and rate == 16000 and samples.shape == (int(A2_SECONDS * 16000),)


@pytest.mark.parametrize(
    "generator, head, message",
    [
        ("audioldm2", {**A2_HEAD, "generated": {**A2_HEAD["generated"], "out_dim": 20}},
         r"head produces generated conditioning of shape \(8, 20\), but the audio generator expects \(any, 16\)"),
        ("audioldm2", {k: v for k, v in A2_HEAD.items() if k != "generated"},
         r"head produces no generated conditioning, but the audio generator \(AudioLDM2Pipeline\) expects "
         r"generated conditioning of shape \(any, 16\)"),
        ("audioldm2", {**A2_HEAD, "out_dim": 32},
         r"head produces conditioning of shape \(6, 32\), but the audio generator expects \(any, 24\)"),
        ("audioldm", {"type": "mlp", "in_dim": 32, "num_signal_tokens": 8, "hidden_dim": 64, "num_queries": 1,
                      "out_dim": 32, "generated": A2_HEAD["generated"]},
         r"head produces generated conditioning of shape \(8, 16\), but the audio generator \(AudioLDMPipeline\) takes none"),
    ],
)
def test_audioldm2_conditioning_mismatch_fails_at_load(tmp_path, request, generator, head, message):
    from omnistage.cluster.config import OmnistageConfig
    from omnistage.pipelines.local import LocalPipeline

    generator_dir = (request.getfixturevalue("audioldm2_dir") if generator == "audioldm2"
                     else request.getfixturevalue("tiny_preset") / "audio_generator")
    config = OmnistageConfig.model_validate({
        "name": "mismatch",
        "stages": {
            "llm": {"model": "tiny"},
            "output_projector": {"model": str(_output_projector(tmp_path / "projector", {"audio": head}))},
            "audio_generator": {"model": str(generator_dir)},
        },
    })
    with pytest.raises(ValueError, match=message):
        LocalPipeline(config)


# dtype from config


def test_llm_runs_in_bfloat16_on_cpu(tiny_preset):
    from omnistage.actors.llm import LLM
    from omnistage.cluster.config import LLMConfig

    llm = LLM(LLMConfig(model="tiny", dtype="bfloat16", device="cpu"))
    assert llm.dtype == torch.bfloat16 and llm.model.dtype == torch.bfloat16
    assert llm.embed_tokens.weight.dtype == torch.bfloat16
    media = [Embeddings("image", RNG.standard_normal((6, 32)).astype(np.float32))]
    request = LLMRequest(messages=[{"role": "user", "content": "<image> Draw"}], media=media, max_tokens=4,
                         force_modalities=["image"])
    result = llm([request])[0]
    assert 1 <= len(result.token_ids) <= 4 + 4
    (signal,) = result.signals
    # Payloads leave the stage as float32 numpy whatever the compute dtype.
    assert signal.hidden.dtype == np.float32 and signal.hidden.shape == (4, 32) and np.isfinite(signal.hidden).all()
    assert llm.embed_prompt(request).dtype == torch.bfloat16


@pytest.mark.parametrize("checkpoint, n_tokens", [("llava_dir", 225), ("blip2_dir", 226)])
def test_multimodal_stages_honour_dtype(request, checkpoint, n_tokens):
    from omnistage.actors.image_encoder import ImageEncoder
    from omnistage.actors.input_projector import InputProjector
    from omnistage.actors.llm import LLM
    from omnistage.cluster.config import ImageEncoderConfig, InputProjectorConfig, LLMConfig

    model = str(request.getfixturevalue(checkpoint))
    encoder = ImageEncoder(ImageEncoderConfig(model=model, dtype="bfloat16"))
    projector = InputProjector(InputProjectorConfig(model=model, dtype="bfloat16"))
    llm = LLM(LLMConfig(model=model, dtype="bfloat16", signal_tokens={}))
    for module in (encoder.model, projector.heads, llm.model):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    features = encoder([_image()])
    assert features[0].features.dtype == np.float32 and features[0].features.shape == (n_tokens, 32)
    embeds = projector(features)
    assert embeds[0].embeds.dtype == np.float32
    request = LLMRequest(messages=[{"role": "user", "content": f"<image>\n{QUESTION}"}], media=embeds, max_tokens=4)
    assert 1 <= len(llm([request])[0].token_ids) <= 4


# Through the Serve app: the LLaVA and BLIP-2 splits as their own pools, answering over HTTP


def _answers_through_serve(path, name, parts, max_tokens, engine=None, streamed=False):
    """Deploy ``path`` split into encoder, projector and LLM pools as its own app under ``/name``, on
    the session's Serve instance, ask it one chat per medium's part in ``parts`` (the part, then the
    question) over HTTP with greedy decoding, delete the app, and give the replies' JSON.
    ``engine``: the LLM pool's engine section, when not the built-in engine's defaults. With
    ``streamed``, each chat is also asked as a stream, whose events' JSON follow the replies."""
    import httpx
    from conftest import SERVE_PORT
    from ray import serve

    from omnistage.actors.multimodal import pretrained_config
    from omnistage.cluster.config import EngineConfig
    from omnistage.pipelines.serve import deploy

    config = pretrained_config(path, name=name)
    if engine is not None:
        config.stages.llm.engine = EngineConfig.model_validate(engine)
    serve.start(http_options={"host": "127.0.0.1", "port": SERVE_PORT})
    deploy(config, name=name, route_prefix=f"/{name}")
    try:
        answers = []
        bodies = [
            {"model": name, "max_tokens": max_tokens, "temperature": 0, "messages": [{"role": "user", "content": [part, {"type": "text", "text": QUESTION}]}]}
            for part in parts
        ]
        with httpx.Client(base_url=f"http://127.0.0.1:{SERVE_PORT}/{name}", timeout=120) as client:
            for body in bodies:
                reply = client.post("/v1/chat/completions", json=body)
                assert reply.status_code == 200, reply.text
                answers.append(reply.json())
            for body in bodies if streamed else []:
                with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as reply:
                    assert reply.status_code == 200
                    answers.append([json.loads(line[6:]) for line in reply.iter_lines() if line.startswith("data: {")])
        return answers
    finally:
        serve.delete(name)


def _check_through_serve(path, name, n_image_tokens=None, engine=None):
    """An image chat through ``path``'s own app (``_answers_through_serve``) answers as transformers'
    generate does."""
    import base64

    from omnistage.actors.media import encode_png

    image = _image(1)
    expected_ids, expected_text, _ = _reference(path, image, max_new_tokens=12, n_image_tokens=n_image_tokens)
    assert len(expected_ids) >= 4  # a real answer, not an immediate end of sequence
    url = "data:image/png;base64," + base64.b64encode(encode_png(image)).decode()
    (answer,) = _answers_through_serve(path, name, [{"type": "image_url", "image_url": {"url": url}}], 12, engine)
    assert answer["choices"][0]["message"]["content"] == expected_text
    assert answer["usage"]["completion_tokens"] == len(expected_ids)


@pytest.mark.slow
def test_llava_through_serve_matches_transformers_generate(ray_session, llava_dir):
    _check_through_serve(llava_dir, "tiny-llava", n_image_tokens=225)


@pytest.mark.slow
def test_llava_next_through_serve_matches_transformers_generate(ray_session, llava_next_dir):
    """Each image's size goes from the image encoder pool to the projector pool with its features."""
    import base64

    from omnistage.actors.media import encode_png

    images = [_image(seed, h, w) for seed, (h, w) in enumerate(LLAVA_NEXT_SIZES)]
    urls = ["data:image/png;base64," + base64.b64encode(encode_png(image)).decode() for image in images]
    answers = _answers_through_serve(llava_next_dir, "tiny-llava-next", [{"type": "image_url", "image_url": {"url": u}} for u in urls], 12)
    for image, answer in zip(images, answers):
        expected_ids, expected_text, n_prompt, _, _ = _llava_next_reference(llava_next_dir, image, 12)
        assert answer["choices"][0]["message"]["content"] == expected_text
        assert answer["usage"]["completion_tokens"] == len(expected_ids) and answer["usage"]["prompt_tokens"] == n_prompt


@pytest.mark.slow
def test_blip2_through_serve_matches_transformers_generate(ray_session, blip2_dir):
    _check_through_serve(blip2_dir, "tiny-blip2")  # 8 query tokens, first in the prompt


@pytest.mark.slow
def test_instructblip_through_serve_matches_transformers_generate(ray_session, instructblip_dir):
    """The question goes from the ingress to the projector pool beside the image's features."""
    import base64

    from omnistage.actors.media import encode_png

    image = _image(1)
    expected_ids, expected_text, n_prompt, _ = _instructblip_reference(instructblip_dir, image, QUESTION, 12)
    url = "data:image/png;base64," + base64.b64encode(encode_png(image)).decode()
    (answer,) = _answers_through_serve(instructblip_dir, "tiny-instructblip", [{"type": "image_url", "image_url": {"url": url}}], 12)
    assert answer["choices"][0]["message"]["content"] == expected_text
    assert answer["usage"]["completion_tokens"] == len(expected_ids) and answer["usage"]["prompt_tokens"] == n_prompt


@pytest.mark.slow
def test_qwen2_audio_through_serve_matches_transformers_generate(ray_session, qwen2_audio_dir):
    import base64

    from omnistage.actors.media import decode_audio, encode_wav

    wav = encode_wav(_sound(*QWEN2_AUDIO_CLIPS[0]), 16000)
    # The reference hears what the pools hear: the clip after its trip through 16-bit WAV.
    ((expected_ids, expected_text, _, n_prompt),) = _qwen2_audio_reference(qwen2_audio_dir, [decode_audio(wav).samples], max_new_tokens=12)
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}
    (answer,) = _answers_through_serve(qwen2_audio_dir, "tiny-qwen2-audio", [part], 12)
    assert answer["choices"][0]["message"]["content"] == expected_text
    assert answer["usage"]["completion_tokens"] == len(expected_ids)
    assert answer["usage"]["prompt_tokens"] == n_prompt


def test_qwen2_audio_caption_as_a_batch_job(qwen2_audio_dir):
    """The caption job's steps over a table of WAV clips, one batch through each of the stages split
    from the checkpoint (as a Ray Data block goes through its pools): each answer is transformers' own."""
    import pyarrow as pa
    from test_batch import _caption_in_process

    from omnistage.actors.media import decode_audio, encode_wav
    from omnistage.actors.multimodal import pretrained_config

    wavs = {f"clip-{i}": encode_wav(_sound(*clip), 16000) for i, clip in enumerate(QWEN2_AUDIO_CLIPS)}
    table = pa.table({"id": list(wavs), "audio": list(wavs.values())})
    out = _caption_in_process(table, "audio", pretrained_config(qwen2_audio_dir), prompt=QUESTION)
    references = _qwen2_audio_reference(qwen2_audio_dir, [decode_audio(w).samples for w in wavs.values()], 8)
    for row, (expected_ids, expected_text, _, n_prompt) in zip(out.to_pylist(), references):
        assert row["error"] is None, row["error"]
        assert (row["answer"], row["completion_tokens"], row["prompt_tokens"]) == (expected_text, len(expected_ids), n_prompt)
    assert len({row["answer"] for row in out.to_pylist()}) == len(wavs)


def test_llm_encoder_decoder_flan_t5(tmp_path):
    """Flan-T5 / UL2 layout: the prompt, media spliced in, goes into the encoder; the decoder writes."""
    from transformers import T5Config, T5ForConditionalGeneration

    from omnistage.actors.llm import LLM
    from omnistage.cluster.config import LLMConfig

    tokenizer = _tokenizer()
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False,  # Flan-T5's choices
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id)
    T5ForConditionalGeneration(config).save_pretrained(tmp_path / "flan-t5")
    tokenizer.save_pretrained(tmp_path / "flan-t5")

    llm = LLM(LLMConfig(model=str(tmp_path / "flan-t5"), signal_tokens={"image": 4}))
    assert type(llm.model).__name__ == "T5ForConditionalGeneration" and llm.is_encoder_decoder
    request = LLMRequest(messages=[{"role": "user", "content": "Hi there"}], max_tokens=6)
    ids = llm.prompt_ids(request)
    with torch.no_grad():
        expected = llm.model.generate(input_ids=torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, 1:].tolist()
    if tokenizer.eos_token_id in expected:
        expected = expected[: expected.index(tokenizer.eos_token_id)]
    assert llm([request])[0].token_ids == expected
    # Media go into the encoder; a forced signal group comes back from the decoder.
    media = [Embeddings("image", RNG.standard_normal((5, 32)).astype(np.float32))]
    forced = LLMRequest(messages=[{"role": "user", "content": "<image> Draw"}], media=media, max_tokens=3,
                        force_modalities=["image"])
    result = llm([forced, request])[0]
    (signal,) = result.signals
    assert signal.hidden.shape == (4, 32) and np.isfinite(signal.hidden).all()
    # Batched with a longer prompt (left-padded encoder input), the text-only answer is unchanged.
    assert llm([forced, request])[1].token_ids == expected


def test_blip2_flan_t5_split_matches_transformers_generate(tmp_path):
    """BLIP-2 with Flan-T5: the projected queries and the question go into T5's encoder."""
    from omnistage.actors.tiny import build_blip2
    from omnistage.pipelines.local import LocalPipeline

    path = build_blip2(tmp_path / "tiny-blip2-t5", seed=0, language="t5")
    pipeline = LocalPipeline.from_pretrained(path)
    assert type(pipeline.llm.model).__name__ == "T5ForConditionalGeneration"
    assert pipeline.llm.render_prompt([{"role": "user", "content": f"<image>\n{QUESTION}"}]) == (
        f"<image>Question: {QUESTION} Answer:</s>"
    )
    for seed in (0, 1):
        image = _image(seed)
        expected_ids, expected_text, _ = _reference(path, image, max_new_tokens=8)
        assert len(expected_ids) >= 2
        assert _staged_ids(pipeline, image, 8) == expected_ids
        assert pipeline.chat(_chat(image), max_tokens=8).text == expected_text


# IDEFICS: the LLM reads the images through cross-attention (more in test_cross_attention.py)


@pytest.fixture(scope="module")
def idefics_dir(tmp_path_factory):
    from omnistage.actors.tiny import build_idefics

    return build_idefics(tmp_path_factory.mktemp("idefics") / "tiny-idefics", seed=0)


# Video-LLaVA and LLaVA-NeXT-Video (their tests: tests/test_video_families.py), InstructBLIP-Video
# (tests/test_instructblip_video.py)


@pytest.fixture(scope="module")
def video_llava_dir(tmp_path_factory):
    from omnistage.actors.tiny import build_video_llava

    return build_video_llava(tmp_path_factory.mktemp("video-llava") / "tiny-video-llava", seed=0)


@pytest.fixture(scope="module")
def llava_next_video_dir(tmp_path_factory):
    from omnistage.actors.tiny import build_llava_next_video

    return build_llava_next_video(tmp_path_factory.mktemp("llava-next-video") / "tiny-llava-next-video", seed=0)


@pytest.fixture(scope="module")
def instructblip_video_dir(tmp_path_factory):
    from omnistage.actors.tiny import build_instructblip_video

    return build_instructblip_video(tmp_path_factory.mktemp("instructblip-video") / "tiny-instructblip-video", seed=0)


# LLaVA-OneVision (its tests: tests/test_onevision.py)


@pytest.fixture(scope="module")
def llava_onevision_dir(tmp_path_factory):
    from omnistage.actors.tiny import build_llava_onevision

    return build_llava_onevision(tmp_path_factory.mktemp("llava-onevision") / "tiny-llava-onevision", seed=0)
