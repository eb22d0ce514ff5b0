"""Checkpoints' own chat templates: the published templates of LLaVA 1.5, Qwen2-VL, Qwen2-Audio and
Idefics2 (copied verbatim) render a chat as the family's processor renders it, and the media tokens
they write expand to as many positions as the processor gives them. Plain-string templates (the
presets') keep reading placeholders in text.

Tokenizers are tiny byte-level ones carrying each family's special tokens; processors are built
from their pieces offline.
"""

import json

import numpy as np
import pytest
import torch

from omnistage.actors.chat_template import ChatTemplate, to_parts, to_text
from omnistage.actors.payloads import LLMRequest
from omnistage.actors.tiny import QWEN2_AUDIO_CHAT_TEMPLATE

# llava-hf/llava-1.5-7b-hf, chat_template.json
LLAVA_15 = "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"  # noqa: E501 - verbatim

# Qwen/Qwen2-VL-7B-Instruct, chat_template.json
QWEN2_VL = "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"  # noqa: E501 - verbatim

# Qwen/Qwen2-Audio-7B-Instruct, chat_template.json: an audio part is recognised by its key. Kept
# beside the tiny Qwen2-Audio checkpoint that ships it.
QWEN2_AUDIO = QWEN2_AUDIO_CHAT_TEMPLATE

# HuggingFaceM4/idefics2-8b, processor_config.json's chat_template
IDEFICS2 = "{% for message in messages %}{{message['role'].capitalize()}}{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"  # noqa: E501 - verbatim

QUESTION = "What is it?"


def _image(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (30, 30, 3), dtype=np.uint8)


def _tokenizer(extra, template):
    from omnistage.actors.tiny import _byte_tokenizer

    return _byte_tokenizer(extra, template)


def _chat(modality, hf_part):
    """A two-turn chat in the processor's form (``hf_part`` is how the family's docs write the
    medium) and in the LLM stage's form (parts as ``parse_messages`` writes them)."""

    def turns(part):
        return [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [part, {"type": "text", "text": QUESTION}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A square."}]},
            {"role": "user", "content": [{"type": "text", "text": "And its colour?"}]},
        ]

    return turns(hf_part), turns({"type": modality})


def _llava_processor(tokenizer):
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=LLAVA_15,
        patch_size=2, vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )


def _qwen2_audio_processor(tokenizer):
    from transformers import Qwen2AudioProcessor, WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=80, sampling_rate=16000, hop_length=160, chunk_length=1, n_fft=400)
    return Qwen2AudioProcessor(feature_extractor=extractor, tokenizer=tokenizer, chat_template=QWEN2_AUDIO)


def _idefics2_processor(tokenizer):
    from transformers import Idefics2ImageProcessor, Idefics2Processor

    image_processor = Idefics2ImageProcessor(do_image_splitting=False, size={"longest_edge": 30, "shortest_edge": 30})
    return Idefics2Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4, chat_template=IDEFICS2)


def _qwen2_vl_processor(tokenizer):
    # Qwen2VLProcessor needs a video processor, which needs torchvision; its apply_chat_template
    # renders with the tokenizer's renderer, given the chat as it is, so the tokenizer stands in.
    return tokenizer


FAMILIES = {
    # family: (template, media tokens, modality, the medium's part as the family's docs write it,
    #          processor builder, the media token it expands, media input for the processor)
    "llava-1.5": (LLAVA_15, ["<image>"], "image", {"type": "image"}, _llava_processor, "<image>", {"images": [_image()]}),
    "qwen2-vl": (
        QWEN2_VL, ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
        "image", {"type": "image"}, _qwen2_vl_processor, "<|image_pad|>", None,
    ),
    "qwen2-audio": (
        QWEN2_AUDIO, ["<|im_start|>", "<|im_end|>", "<|audio_bos|>", "<|audio_eos|>", "<|AUDIO|>"],
        "audio", {"type": "audio", "audio_url": "speech.wav"}, _qwen2_audio_processor, "<|AUDIO|>",
        {"audio": [np.random.default_rng(0).uniform(-0.5, 0.5, 16000).astype(np.float32)]},
    ),
    "idefics2": (
        IDEFICS2, ["<image>", "<fake_token_around_image>", "<end_of_utterance>"],
        # Idefics2's processor wraps an image's tokens in <fake_token_around_image> and splits the
        # text around them: a layout of its own, not a repeat of the token, so only rendering is compared.
        "image", {"type": "image"}, _idefics2_processor, "<image>", None,
    ),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_published_template_renders_as_the_processor_does(family):
    template, specials, modality, hf_part, build_processor, media_token, media = FAMILIES[family]
    tokenizer = _tokenizer(specials, template)
    processor = build_processor(tokenizer)
    chat = ChatTemplate(tokenizer, template)
    assert chat.typed

    hf_chat, stage_chat = _chat(modality, hf_part)
    expected = processor.apply_chat_template(hf_chat, tokenize=False, add_generation_prompt=True)
    rendered = chat.render(stage_chat)
    assert rendered == expected
    assert rendered.count(media_token) == 1 and QUESTION in rendered
    # The same chat as text with a placeholder (a caller's LLMRequest) means the same parts.
    as_text = [{**m, "content": to_text(m["content"])} for m in stage_chat]
    assert as_text[1]["content"] == f"<{modality}>\n{QUESTION}"
    assert chat.render(as_text) == expected

    if media is None:
        return
    # The processor expands the medium's token to its feature count; repeating the token that
    # many times in the rendered ids, as the LLM stage does, gives the processor's ids.
    media_id = tokenizer.convert_tokens_to_ids(media_token)
    inputs = processor(text=rendered, **media)
    processed = list(inputs["input_ids"][0])
    n = processed.count(media_id)
    assert n > 1
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert processed == [t for i in ids for t in ([i] * n if i == media_id else [i])]


@pytest.mark.parametrize(
    "name, typed",
    [("tiny", False), ("llava-string", False), ("blip2", False), ("repr", False), ("llava-1.5", True)],
)
def test_template_kind_is_detected_by_rendering(name, typed):
    from omnistage.actors.tiny import BLIP2_CHAT_TEMPLATE, LLAVA_CHAT_TEMPLATE, TINY_CHAT_TEMPLATE

    template = {
        "tiny": TINY_CHAT_TEMPLATE,
        "llava-string": LLAVA_CHAT_TEMPLATE,
        "blip2": BLIP2_CHAT_TEMPLATE,
        # Prints the content as it is: a list of parts comes out as its repr, with the text escaped.
        "repr": "{% for message in messages %}{{ message['content'] }}{% endfor %}",
        "llava-1.5": LLAVA_15,
    }[name]
    tokenizer = _tokenizer(["<image>"], template)
    chat = ChatTemplate(tokenizer, template)
    assert chat.typed is typed
    # Either kind renders both forms of the same chat alike.
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = [{"role": "user", "content": f"<image>\n{QUESTION}"}]
    assert chat.render(parts) == chat.render(text)
    assert tokenizer.convert_tokens_to_ids("<image>") in tokenizer(chat.render(parts), add_special_tokens=False)["input_ids"]


def test_placeholder_text_splits_into_parts_in_order():
    assert to_parts("compare\n<image>\n<audio>\n<image> now") == [
        {"type": "text", "text": "compare"},
        {"type": "image", "image": "<image>"},
        {"type": "audio", "audio": "<audio>"},
        {"type": "image", "image": "<image>"},
        {"type": "text", "text": "now"},
    ]
    assert to_text([{"type": "text", "text": "a"}, {"type": "video"}, {"type": "text", "text": "b"}]) == "a\n<video>\nb"


@pytest.fixture(scope="module")
def llava_15_dir(tmp_path_factory):
    """Tiny LLaVA whose processor template is llava-hf's, in chat_template.json as llava-hf ships it
    (the tokenizer keeps the preset's string template: the processor's file wins)."""
    from omnistage.actors.tiny import build_llava

    path = build_llava(tmp_path_factory.mktemp("llava15") / "tiny-llava-1.5", seed=0)
    (path / "chat_template.json").write_text(json.dumps({"chat_template": LLAVA_15}))
    return path


def test_llava_published_template_split_matches_processor_and_generate(llava_15_dir):
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from omnistage.pipelines.local import LocalPipeline

    pipeline = LocalPipeline.from_pretrained(llava_15_dir)
    llm = pipeline.llm
    assert llm.chat_template.typed and llm.chat_template.template == LLAVA_15
    processor = _llava_processor(AutoTokenizer.from_pretrained(llava_15_dir))
    model = LlavaForConditionalGeneration.from_pretrained(llava_15_dir).eval()
    image_id = model.config.image_token_index
    for seed in (0, 1):
        image = _image(seed)
        hf_chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
        rendered = processor.apply_chat_template(hf_chat, add_generation_prompt=True)
        assert rendered == f"USER: <image>\n{QUESTION} ASSISTANT:"
        inputs = processor(text=rendered, images=[image], return_tensors="pt")
        features = pipeline.encoders["image"]([image])
        embeddings = pipeline.input_projector(features)
        # The processor's image tokens line up one to one with the projected features.
        assert int((inputs["input_ids"] == image_id).sum()) == features[0].features.shape[0] == embeddings[0].embeds.shape[0] == 225
        request = LLMRequest(messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}])
        assert llm.render_prompt(request.messages) == rendered
        assert llm.expand(llm.prompt_ids(request), [225]) == inputs["input_ids"][0].tolist()

        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1] :].tolist()
        expected = out[: out.index(model.generation_config.eos_token_id)] if model.generation_config.eos_token_id in out else out
        assert len(expected) >= 4
        staged = llm([LLMRequest(messages=request.messages, media=embeddings, max_tokens=12)])[0].token_ids
        assert staged == expected
        chat = [{"role": "user", "content": [{"type": "image_url", "image_url": image}, {"type": "text", "text": QUESTION}]}]
        assert pipeline.chat(chat, max_tokens=12).text == processor.tokenizer.decode(expected, skip_special_tokens=True)
