"""Tiny seeded checkpoints of every stage, for tests and the ``tiny`` preset.

Each builder writes one component's checkpoint directory in the ordinary transformers or diffusers
layout, so stages load it with ``from_pretrained`` like a downloaded one. Weights are random but
seeded: building twice gives identical files. The stage modules know nothing of these builders.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from omnistage.actors.heads import save_heads
from omnistage.actors.input_projector import InputProjector
from omnistage.actors.output_projector import OutputProjector
from omnistage.actors.payloads import NEXTGPT_SIGNAL_TOKENS, PLACEHOLDERS, signal_token_names

if TYPE_CHECKING:
    from diffusers import DDIMScheduler

# Widths shared by the tiny components, so projectors fit the models on both of their sides.
TINY_DIMS = {
    "image_encoder": 32,  # CLIP vision hidden size
    "audio_encoder": 16,  # Whisper d_model
    "llm": 32,  # LLaMA hidden size
    "image_cond": (77, 32),  # SD UNet cross-attention: CLIP text length x width
    "video_cond": (77, 32),
    "audio_cond": (1, 32),  # AudioLDM: one pooled CLAP text embedding
}


# --- encoders ----------------------------------------------------------------------------------


def build_image_encoder(path: Path, seed: int, **sizes: int) -> None:
    """A CLIP ViT with 30x30 inputs and 2x2 patches: (B, 3, 30, 30) -> (B, 225, 32) patch features.
    ``sizes`` override CLIPVisionConfig's (a larger tower for benchmarks, built the same way)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        **{
            "image_size": 30,
            "patch_size": 2,
            "hidden_size": TINY_DIMS["image_encoder"],
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 37,
            **sizes,
        }
    )
    CLIPVisionModel(config).save_pretrained(path)
    side = config.image_size
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(path)


def whisper_encoder(**sizes: Any) -> tuple[Any, Any]:
    """A Whisper model over 1 s windows, 100 mel frames (80 bins) -> (B, 50, d_model) features,
    and its feature extractor. Only the encoder is used: the decoder is one small layer over a
    64-token vocabulary, which keeps the checkpoint small. ``sizes`` override WhisperConfig's."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    config = WhisperConfig(
        **{
            "d_model": 16,
            "encoder_layers": 2,
            "encoder_attention_heads": 4,
            "encoder_ffn_dim": 37,
            "decoder_layers": 1,
            "decoder_attention_heads": 4,
            "decoder_ffn_dim": 37,
            "max_target_positions": 32,
            **sizes,
        },
        num_mel_bins=80,
        # Whisper's encoder halves the mel frames: 100 frames (1 s at hop 160) -> 50 positions.
        max_source_positions=50,
        vocab_size=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=3,
        suppress_tokens=None,
        begin_suppress_tokens=None,
    )
    extractor = WhisperFeatureExtractor(feature_size=80, sampling_rate=16000, hop_length=160, chunk_length=1, n_fft=400)
    return WhisperModel(config), extractor


def build_audio_encoder(path: Path, seed: int) -> None:
    """A Whisper encoder over 1 s windows: 100 mel frames (80 bins) -> (B, 50, 16) features."""
    torch.manual_seed(seed)
    model, extractor = whisper_encoder()
    model.save_pretrained(path)
    extractor.save_pretrained(path)


# --- projectors --------------------------------------------------------------------------------


def build_input_projector(path: Path, seed: int, dims: dict[str, Any] = TINY_DIMS) -> None:
    """One head of each design across the three modalities, so the default preset runs them all.
    ``dims``: the widths of the encoders and the LLM it joins, as in ``TINY_DIMS``."""
    torch.manual_seed(seed)
    llm = dims["llm"]
    config = {
        "heads": {
            "image": {"type": "mlp2x_gelu", "in_dim": dims["image_encoder"], "out_dim": llm},
            # 5 frames x 225 patches would be 1125 LLM tokens; the resampler keeps 32.
            "video": {
                "type": "resampler",
                "in_dim": dims["image_encoder"],
                "out_dim": llm,
                "num_latents": 32,
                "depth": 2,
                "num_heads": 4,
                "head_dim": 8,
            },
            "audio": {
                "type": "qformer",
                "in_dim": dims["audio_encoder"],
                "out_dim": llm,
                "num_queries": 8,
                "qformer": {
                    "hidden_size": 32,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 4,
                    "intermediate_size": 37,
                    "cross_attention_frequency": 1,
                },
            },
        }
    }
    save_heads(InputProjector.build_heads(config), config, path)


def build_output_projector(path: Path, seed: int, dims: dict[str, Any] = TINY_DIMS) -> None:
    """Transformer heads for image and video (77 queries, like a CLIP text encoder's output), an
    MLP head for audio (one pooled vector, like AudioLDM's CLAP conditioning). ``dims``: the LLM's
    width and each generator's conditioning shape, as in ``TINY_DIMS``."""
    torch.manual_seed(seed)
    llm = dims["llm"]

    def transformer(cond: tuple[int, int]) -> dict[str, Any]:
        return {
            "type": "transformer",
            "in_dim": llm,
            "d_model": 32,
            "num_heads": 4,
            "num_encoder_layers": 2,
            "num_decoder_layers": 2,
            "ffn_dim": 64,
            "num_queries": cond[0],
            "out_dim": cond[1],
        }

    config = {
        "heads": {
            "image": transformer(dims["image_cond"]),
            "video": transformer(dims["video_cond"]),
            "audio": {
                "type": "mlp",
                "in_dim": llm,
                "num_signal_tokens": NEXTGPT_SIGNAL_TOKENS["audio"],
                "hidden_dim": 64,
                "num_queries": dims["audio_cond"][0],
                "out_dim": dims["audio_cond"][1],
            },
        }
    }
    save_heads(OutputProjector.build_heads(config), config, path)


# --- LLM ---------------------------------------------------------------------------------------

# A plain role-tagged template for the tiny preset; real checkpoints bring their own.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_llm(path: Path, seed: int, family: str = "llama", **sizes: int) -> None:
    """A 2-layer LLaMA (hidden 32) with a byte-level tokenizer, which needs no vocabulary file.
    ``family`` ``"qwen2"`` builds a Qwen2 of the same sizes instead. ``sizes`` override the config's
    (a larger model for benchmarks, or a head size vLLM's attention takes, built the same way)."""
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    families = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    if family not in families:
        raise ValueError(f"expected a model family in {sorted(families)}, got {family!r}")
    config_class, model_class = families[family]

    torch.manual_seed(seed)
    extra = list(PLACEHOLDERS.values()) + [t for m, n in NEXTGPT_SIGNAL_TOKENS.items() for t in signal_token_names(m, n)]
    if family == "llama":
        tokenizer = ByT5Tokenizer()
        tokenizer.add_tokens(extra, special_tokens=True)
        tokenizer.chat_template = TINY_CHAT_TEMPLATE
    else:
        # transformers loads a Qwen2 checkpoint's tokenizer as its own class, which reads a
        # tokenizer.json (a ByT5 tokenizer has none).
        tokenizer = _byte_tokenizer(extra, TINY_CHAT_TEMPLATE)
    config = config_class(
        vocab_size=len(tokenizer),
        **{
            "hidden_size": TINY_DIMS["llm"],
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            **sizes,
        },
        max_position_embeddings=2048,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model_class(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


# --- generators ----------------------------------------------------------------------------------
# Sizes follow diffusers' own tests (get_dummy_components), with cross-attention and class-label
# widths set to TINY_DIMS so the tiny output projector fits.


def ddim_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    """Stable Diffusion's noise schedule, with DDIM sampling.

    steps_offset=1 as in the released SD checkpoints: StableDiffusionPipeline warns about the
    default 0 and rewrites it to 1 whenever it is constructed.
    """
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def _unet_2d(seed: int, **conditioning: Any) -> Any:
    """The 2D UNet of Stable Diffusion and AudioLDM, which differ in the conditioning it reads."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        **conditioning,
    )


def _vae_2d(seed: int, channels: int) -> Any:
    """The VAE of Stable Diffusion (3 channels: RGB) and AudioLDM (1: a mel spectrogram)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=channels,
        out_channels=channels,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
    )


def build_image_generator(path: Path, seed: int, dims: dict[str, Any] = TINY_DIMS) -> None:
    """Stable Diffusion layout: (B, seq_len, 32) conditioning -> (B, 64, 64, 3) images; the
    conditioning width is ``dims["image_cond"][1]``."""
    from diffusers import StableDiffusionPipeline

    unet = _unet_2d(seed, cross_attention_dim=dims["image_cond"][1])
    vae = _vae_2d(seed, channels=3)
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(path)


def build_video_generator(path: Path, seed: int) -> None:
    """Zeroscope (TextToVideoSD) layout: (B, seq_len, 32) conditioning -> (B, T, 32, 32, 3) frames."""
    from diffusers import AutoencoderKL, TextToVideoSDPipeline, UNet3DConditionModel

    torch.manual_seed(seed)
    unet = UNet3DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=2,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(8,),
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=32,
        norm_num_groups=2,
    )
    pipeline = TextToVideoSDPipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=ddim_scheduler()
    )
    pipeline.save_pretrained(path)


def build_audio_generator(path: Path, seed: int) -> None:
    """AudioLDM layout: (B, 32) pooled conditioning -> (B, n) waveforms at 16 kHz.

    The vocoder upsamples each mel frame 8 x 8 = 64 times, so one second is 250 mel frames.
    """
    from diffusers import AudioLDMPipeline
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    # The pooled CLAP embedding comes in as a class label, concatenated to the time embedding.
    unet = _unet_2d(
        seed,
        cross_attention_dim=(32, 64),
        class_embed_type="simple_projection",
        projection_class_embeddings_input_dim=32,
        class_embeddings_concat=True,
    )
    vae = _vae_2d(seed, channels=1)
    torch.manual_seed(seed)
    vocoder_config = SpeechT5HifiGanConfig(
        model_in_dim=8,
        sampling_rate=16000,
        upsample_initial_channel=16,
        upsample_rates=[8, 8],
        upsample_kernel_sizes=[16, 16],
        resblock_kernel_sizes=[3, 7],
        resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]],
        normalize_before=False,
        # The default (0.01) gives waveforms near 1e-5, silence once written as 16-bit PCM.
        initializer_range=0.1,
    )
    pipeline = AudioLDMPipeline(
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=ddim_scheduler(),
        vocoder=SpeechT5HifiGan(vocoder_config),
    )
    pipeline.save_pretrained(path)


# --- the tiny preset -------------------------------------------------------------------------------

# Component name -> the builder of its checkpoint directory; each takes (path, seed). The order
# fixes the seeds (``build_preset`` gives component i the seed ``seed + i``), so keep new entries at the end.
TINY_BUILDERS: dict[str, Callable[[Path, int], None]] = {
    "image_encoder": build_image_encoder,
    "audio_encoder": build_audio_encoder,
    "input_projector": build_input_projector,
    "llm": build_llm,
    "output_projector": build_output_projector,
    "image_generator": build_image_generator,
    "video_generator": build_video_generator,
    "audio_generator": build_audio_generator,
}


# --- end-to-end checkpoints (LLaVA, BLIP-2, Qwen2-Audio) -------------------------------------------

LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}ASSISTANT: {{ message['content'] }}\n"
    "{% else %}{{ message['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# BLIP-2's processor puts the query tokens first, then BOS, then the text: the template moves a
# message's <image> to the front, so a chat maps onto exactly that layout.
BLIP2_CHAT_TEMPLATE = (
    "{% set ns = namespace(image=false, text='') %}"
    "{% for message in messages %}{% if '<image>' in message['content'] %}{% set ns.image = true %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set ns.text = ns.text + ' ' + message['content'] %}"
    "{% else %}{% set ns.text = ns.text + 'Question: ' + (message['content'] | replace('<image>', '') | trim) + ' Answer:' %}"
    "{% endif %}{% endfor %}"
    "{% if ns.image %}<image>{% endif %}{{ bos_token }}{{ ns.text }}"
)


def _byte_tokenizer(extra: list[str], chat_template: str | None, special: str | None = None):
    """A byte-level fast tokenizer (``tokenizer.json``, no merges), built offline: 256 byte tokens,
    then ``<pad>``, ``</s>``, ``<s>`` and ``extra`` as special tokens. ``special`` lays out text
    tokenized with special tokens: ``"<s> $A"`` as a LLaMA tokenizer does, ``"$A </s>"`` as T5's;
    None adds none."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<s>", *extra]
    vocab = {token: i for i, token in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    if special is not None:
        used = [token for token in ("<s>", "</s>") if token in special.split()]
        backend.post_processor = processors.TemplateProcessing(single=special, special_tokens=[(t, vocab[t]) for t in used])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", bos_token="<s>")
    tokenizer.chat_template = chat_template
    return tokenizer


def _processor_files(path: Path, processor_class: str, processor: dict[str, Any] | None = None, chat_template: str | None = None) -> None:
    """A processor's files as published checkpoints lay them out: ``processor_class`` in the image
    processor's (or feature extractor's) and the tokenizer's configs, which lets ``AutoProcessor``
    assemble it from the two; its own settings, if any, in processor_config.json; its template, if
    any, in chat_template.json."""
    for name in ("preprocessor_config.json", "tokenizer_config.json"):
        settings = json.loads((path / name).read_text())
        (path / name).write_text(json.dumps({**settings, "processor_class": processor_class}, indent=2) + "\n")
    if processor is not None:
        settings = {**processor, "processor_class": processor_class}
        (path / "processor_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    if chat_template is not None:
        (path / "chat_template.json").write_text(json.dumps({"chat_template": chat_template}, indent=2) + "\n")


def _save_sharded(cls: Any, config: Any, tokenizer: Any, path: Path, seed: int) -> None:
    """A seeded ``cls(config)``, ending and padding as ``tokenizer`` does, saved with the tokenizer
    in shards, as published: each pool then reads only the shards that hold its part."""
    torch.manual_seed(seed)
    model = cls(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path, max_shard_size="50KB")
    tokenizer.save_pretrained(path)


def build_llava(path: str | Path, seed: int = 0, **text_sizes: int) -> Path:
    """A LLaVA-1.5-shaped model: CLIP ViT (30x30, 2x2 patches, 225 tokens) -> 2-layer GELU MLP ->
    2-layer LLaMA, with a byte-level tokenizer whose ``<image>`` is the config's image token.
    ``text_sizes`` override the LLaMA's (e.g. a head size vLLM's attention takes)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    path = Path(path)
    # Adds BOS to a text, as LLaVA-1.5's LLaMA tokenizer does (its template writes none).
    tokenizer = _byte_tokenizer(["<image>"], LLAVA_CHAT_TEMPLATE, special="<s> $A")
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(
        image_size=30, patch_size=2, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, projection_dim=32,
    )
    sizes = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, **text_sizes}
    text = LlamaConfig(
        vocab_size=len(tokenizer), **sizes, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_id,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    _save_sharded(LlavaForConditionalGeneration, config, tokenizer, path, seed)
    CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}).save_pretrained(path)
    return path


# llava-hf/llava-v1.6-mistral-7b-hf's processor template: typed parts, the images first in a
# message, then its text, inside Mistral's [INST] ... [/INST].
LLAVA_NEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\\n' + message['content'][0]['text'] + '\\n<</SYS>>\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s> ' }}"
    "{% endif %}{% endfor %}"
)


def build_llava_next(path: str | Path, seed: int = 0) -> Path:
    """A LLaVA-NeXT-shaped model (llava-v1.6-mistral's layout at a tiny scale): CLIP ViT (16x16,
    4x4 patches, 16 tokens a view), any-resolution grids of 1x2, 2x1, 2x2, 1x3 and 3x1 views ->
    2-layer GELU MLP and ``image_newline`` -> 2-layer Mistral, with a byte-level tokenizer whose
    ``<image>`` is the config's image token and the processor's files and template."""
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        MistralConfig,
    )

    path = Path(path)
    # Adds BOS to a text, as llava-v1.6-mistral's tokenizer does; its template writes none.
    tokenizer = _byte_tokenizer(["<image>"], None, special="<s> $A")
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    view = 16
    vision = CLIPVisionConfig(
        image_size=view, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, projection_dim=32,
    )
    text = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, sliding_window=None,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    # As llava-v1.6's [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]], in views of 16.
    pinpoints = [[view, 2 * view], [2 * view, view], [2 * view, 2 * view], [3 * view, view], [view, 3 * view]]
    config = LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_index=image_id, image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    _save_sharded(LlavaNextForConditionalGeneration, config, tokenizer, path, seed)
    LlavaNextImageProcessor(
        size={"shortest_edge": view}, crop_size={"height": view, "width": view}, image_grid_pinpoints=pinpoints,
    ).save_pretrained(path)
    # As llava-hf lays the processor out (the tower's CLS counted, then dropped by the strategy).
    processor = {"image_token": "<image>", "num_additional_image_tokens": 1, "patch_size": vision.patch_size,
                 "vision_feature_select_strategy": "default"}
    _processor_files(path, "LlavaNextProcessor", processor, LLAVA_NEXT_CHAT_TEMPLATE)
    return path


def _flan_t5_config(tokenizer):
    """A 2-layer Flan-T5 (gated GELU, untied head) over ``tokenizer``'s vocabulary."""
    from transformers import T5Config

    return T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


def build_blip2(path: str | Path, seed: int = 0, num_query_tokens: int = 8, language: str = "opt") -> Path:
    """A BLIP-2-shaped model: BLIP ViT (30x30, 2x2 patches) -> Q-Former with ``num_query_tokens``
    queries -> linear projection -> 2-layer OPT (or Flan-T5 with ``language="t5"``), with a byte
    tokenizer (``<image>``, BOS ``<s>``; the T5 layout ends the prompt with EOS instead of a BOS)."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        OPTConfig,
    )

    path = Path(path)
    template = BLIP2_CHAT_TEMPLATE
    if language == "t5":
        # T5 tokenizers add no BOS but end the text with EOS, as BLIP-2's T5 processor does.
        template = template.replace("{{ bos_token }}{{ ns.text }}", "{{ ns.text }}{{ eos_token }}")
    tokenizer = _byte_tokenizer(["<image>"], template)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    vision = Blip2VisionConfig(
        image_size=30, patch_size=2, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
    )
    qformer = Blip2QFormerConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        encoder_hidden_size=32, cross_attention_frequency=1, vocab_size=99,
    )
    if language == "t5":
        text = _flan_t5_config(tokenizer)
    else:
        text = OPTConfig(
            vocab_size=len(tokenizer), hidden_size=32, ffn_dim=37, num_hidden_layers=2, num_attention_heads=4,
            word_embed_proj_dim=32, max_position_embeddings=512,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    config = Blip2Config(
        vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
        num_query_tokens=num_query_tokens, image_token_index=image_id,
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(path, max_shard_size="50KB")
    tokenizer.save_pretrained(path)
    BlipImageProcessor(size={"height": 30, "width": 30}).save_pretrained(path)
    return path


# Qwen/Qwen2-Audio-7B-Instruct's chat_template.json, verbatim: each audio part (told by its key)
# becomes "Audio k: <|audio_bos|><|AUDIO|><|audio_eos|>".
QWEN2_AUDIO_CHAT_TEMPLATE = "{% set audio_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if 'audio' in content or 'audio_url' in content %}{% set audio_count.value = audio_count.value + 1 %}Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"  # noqa: E501 - verbatim
QWEN2_AUDIO_TOKENS = ["<|im_start|>", "<|im_end|>", "<|audio_bos|>", "<|audio_eos|>", "<|AUDIO|>"]


def build_qwen2_audio(path: str | Path, seed: int = 0) -> Path:
    """A Qwen2-Audio-shaped model in the published checkpoint's layout: Whisper-style audio tower
    over 1 s windows (100 mel frames of 16 bins -> 50 positions, average-pooled to 25) -> linear
    projector -> 2-layer Qwen2, with a byte-level tokenizer carrying Qwen's chat and audio tokens.
    As Qwen/Qwen2-Audio-7B-Instruct ships them: the feature extractor in preprocessor_config.json,
    the processor's template in chat_template.json, ``<|im_end|>`` among the EOS ids."""
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, Qwen2Config, WhisperFeatureExtractor

    path = Path(path)
    # The template lives in chat_template.json only, where the published checkpoint keeps it.
    tokenizer = _byte_tokenizer(QWEN2_AUDIO_TOKENS, None)
    # Listed as the published tokenizer lists them, so decoding leaves them out of the text.
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN2_AUDIO_TOKENS})
    audio = {
        "num_mel_bins": 16,
        "d_model": 32,
        "encoder_layers": 2,
        "encoder_attention_heads": 4,
        "encoder_ffn_dim": 37,
        # The tower takes exactly 2 * max_source_positions mel frames: the extractor's 1 s window.
        "max_source_positions": 50,
        # Ten times the default spread: at 0.02 the random tower's states hardly depend on the
        # sound, and every clip would get the same greedy answer.
        "initializer_range": 0.2,
    }
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = Qwen2AudioConfig(audio_config=audio, text_config=text, audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"))
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # In shards, as published: each pool then reads only the shards that hold its part.
    model.save_pretrained(path, max_shard_size="50KB")
    tokenizer.save_pretrained(path)
    extractor = WhisperFeatureExtractor(feature_size=16, sampling_rate=16000, hop_length=160, chunk_length=1, n_fft=400, return_attention_mask=True)
    extractor.save_pretrained(path)
    _processor_files(path, "Qwen2AudioProcessor", chat_template=QWEN2_AUDIO_CHAT_TEMPLATE)
    return path


# InstructBLIP's processor takes one prompt: the query tokens, BOS, then the instruction as it is
# (no "Question: ... Answer:"). The template moves <image> to the front and joins the turns' texts.
INSTRUCTBLIP_CHAT_TEMPLATE = (
    "{% set ns = namespace(image=false, text='') %}"
    "{% for message in messages %}{% if '<image>' in message['content'] %}{% set ns.image = true %}{% endif %}"
    "{% set ns.text = (ns.text + ' ' + (message['content'] | replace('<image>', '') | trim)) | trim %}"
    "{% endfor %}"
    "{% if ns.image %}<image>{% endif %}{{ bos_token }}{{ ns.text }}"
)


def _wordpiece_tokenizer():
    """A lower-cased BERT WordPiece tokenizer, built offline, that spells any ASCII word out of
    letters and digits (``w ##h ##a ##t``): the Q-Former's tokenizer in miniature."""
    import string

    from transformers import BertTokenizerFast

    chars = string.ascii_lowercase + string.digits
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *string.punctuation, *(f"##{c}" for c in chars)]
    return BertTokenizerFast(vocab={word: i for i, word in enumerate(words)})


def build_instructblip(path: str | Path, seed: int = 0, num_query_tokens: int = 8, language: str = "llama") -> Path:
    """An InstructBLIP-Vicuna-shaped model: BLIP ViT (30x30, 2x2 patches) -> a Q-Former that reads
    ``num_query_tokens`` queries and the instruction's tokens -> linear projection -> 2-layer LLaMA
    (or Flan-T5 with ``language="t5"``, as instructblip-flan-t5: its tokenizer ends the text with
    EOS instead of starting it with BOS). Laid out as Salesforce/instructblip-vicuna-7b is: weights in shards, the LLaMA-style tokenizer
    (BOS added, ``<image>`` the config's image token, ``INSTRUCTBLIP_CHAT_TEMPLATE``) at the top,
    the Q-Former's BERT tokenizer in ``qformer_tokenizer/``, the image processor in
    preprocessor_config.json and ``num_query_tokens`` in processor_config.json, so that
    ``AutoProcessor`` assembles ``InstructBlipProcessor``."""
    from transformers import (
        BlipImageProcessor,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipQFormerConfig,
        InstructBlipVisionConfig,
        LlamaConfig,
    )

    path = Path(path)
    if language == "t5":
        template = INSTRUCTBLIP_CHAT_TEMPLATE.replace("{{ bos_token }}{{ ns.text }}", "{{ ns.text }}{{ eos_token }}")
        tokenizer = _byte_tokenizer(["<image>"], template, special="$A </s>")
    else:
        tokenizer = _byte_tokenizer(["<image>"], INSTRUCTBLIP_CHAT_TEMPLATE, special="<s> $A")
    qformer_tokenizer = _wordpiece_tokenizer()
    vision = InstructBlipVisionConfig(
        image_size=30, patch_size=2, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        # BLIP's default (1e-10) leaves the patch embedding at zero: every image would give the
        # same features.
        initializer_range=0.2,
    )
    qformer = InstructBlipQFormerConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, encoder_hidden_size=32,
        cross_attention_frequency=1, vocab_size=len(qformer_tokenizer), pad_token_id=qformer_tokenizer.pad_token_id,
        max_position_embeddings=128,
    )
    if language == "t5":
        text = _flan_t5_config(tokenizer)
    else:
        text = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    config = InstructBlipConfig(
        vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
        num_query_tokens=num_query_tokens, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    model = InstructBlipForConditionalGeneration(config).eval()
    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
        setattr(model.generation_config, name, getattr(tokenizer, name))
    model.save_pretrained(path, max_shard_size="50KB")
    tokenizer.save_pretrained(path)
    qformer_tokenizer.save_pretrained(path / "qformer_tokenizer")
    BlipImageProcessor(size={"height": 30, "width": 30}).save_pretrained(path)
    _processor_files(path, "InstructBlipProcessor", {"num_query_tokens": num_query_tokens})
    return path


# Typed parts in the layout of HuggingFaceM4/idefics-9b-instruct's prompts (its model card's
# "User:", image, "text<end_of_utterance>", "\nAssistant:"): each image written as IdeficsProcessor
# writes it (the image token between two <fake_token_around_image>, sharing the one between two
# images in a row), and BOS first, which the processor adds to every prompt.
IDEFICS_CHAT_TEMPLATE = (
    "{% set ns = namespace(image=false) %}{{ bos_token }}{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<image><fake_token_around_image>' if ns.image else "
    "'<fake_token_around_image><image><fake_token_around_image>' }}{% set ns.image = true %}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% set ns.image = false %}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% set ns.image = false %}{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
IDEFICS_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]


def build_idefics(path: str | Path, seed: int = 0) -> Path:
    """An IDEFICS-shaped model (idefics-9b-instruct's layout at a tiny scale): its CLIP-like vision
    transformer (30x30, 2x2 patches, CLS kept: 226 tokens) -> Perceiver resampler (8 latents) ->
    2-layer LLaMA-style decoder with a gated cross-attention layer before each layer, reading the
    resampled image states. As published: the three tokens the checkpoint added
    (``<fake_token_around_image>``, ``<image>``, ``<end_of_utterance>``) after the base vocabulary,
    embedded by the decoupled embedding's ``additional_vocab_size`` rows; weights in shards; the
    image processor in preprocessor_config.json; ``<end_of_utterance>`` among the EOS ids; the
    template in chat_template.json."""
    from transformers import IdeficsConfig, IdeficsForVisionText2Text, IdeficsImageProcessorPil

    path = Path(path)
    tokenizer = _byte_tokenizer([], None)
    base_vocab = len(tokenizer)
    # Added after the base vocabulary and listed as additional special tokens, as in the published
    # tokenizer: IdeficsProcessor writes <end_of_utterance> between text items only when it is there.
    tokenizer.add_special_tokens({"additional_special_tokens": IDEFICS_TOKENS})
    config = IdeficsConfig(
        vocab_size=base_vocab,
        additional_vocab_size=len(IDEFICS_TOKENS),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        cross_layer_interval=1,
        use_resampler=True,
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        vision_config={
            "embed_dim": 24,
            "image_size": 30,
            "patch_size": 2,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 37,
            "initializer_range": 0.2,
        },
        perceiver_config={
            "use_resampler": True,
            "resampler_n_latents": 8,
            "resampler_depth": 2,
            "resampler_n_heads": 2,
            "resampler_head_dim": 8,
            "qk_layer_norms_perceiver": False,
        },
    )
    torch.manual_seed(seed)
    model = IdeficsForVisionText2Text(config).eval()
    # The published config's gates start at zero (tanh(0) shuts every cross-attention layer); trained
    # ones are open. Seeded values stand in for the trained ones.
    with torch.no_grad():
        for layer in model.model.gated_cross_attn_layers:
            layer.alpha_cross_attn.normal_(std=1.0)
            layer.alpha_dense.normal_(std=1.0)
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids("<end_of_utterance>"), tokenizer.eos_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(path, max_shard_size="50KB")
    tokenizer.save_pretrained(path)
    IdeficsImageProcessorPil(image_size=30).save_pretrained(path)
    _processor_files(path, "IdeficsProcessor", chat_template=IDEFICS_CHAT_TEMPLATE)
    return path


# Kosmos2Processor's tag tokens, in its order, then its location tokens: added to the tokenizer
# as the processor adds them (lstrip, not normalised, not special: decoding keeps them).
KOSMOS2_TAG_TOKENS = [
    "</doc>",
    "<image>",
    "</image>",
    "</chunk>",
    "</line>",
    "<phrase>",
    "</phrase>",
    "<object>",
    "</object>",
    "</delimiter_of_multi_objects/>",
    "<grounding>",
]


def _kosmos2_tokenizer(n_patch_index_tokens: int):
    """A byte-level fast tokenizer in the published Kosmos-2 tokenizer's layout (XLM-R's): ``<s>``
    0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, the pieces, ``<mask>``, then the processor's tag and
    ``<patch_index_*>`` tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    pieces = specials + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["<mask>"]
    backend = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(pieces)}, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([*specials, "<mask>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>", mask_token="<mask>")
    locations = [f"<patch_index_{i:04d}>" for i in range(n_patch_index_tokens)]
    tokenizer.add_tokens([AddedToken(t, lstrip=True, rstrip=False, normalized=False) for t in KOSMOS2_TAG_TOKENS + locations])
    return tokenizer


def build_kosmos2(path: str | Path, seed: int = 0) -> Path:
    """A Kosmos-2-shaped model in microsoft/kosmos-2-patch14-224's layout: its vision model (30x30,
    2x2 patches, 226 tokens with CLS) -> ``image_to_text_projection`` with 64 latent queries, as
    published -> 2-layer Kosmos-2 text model (its head untied, unlike the published one's);
    weights in shards, the tokenizer with the processor's tag and 1024 location tokens, the CLIP
    image processor in preprocessor_config.json and the processor's settings in
    processor_config.json, so that ``AutoProcessor`` assembles ``Kosmos2Processor``."""
    from transformers import CLIPImageProcessor, Kosmos2Config, Kosmos2ForConditionalGeneration

    path = Path(path)
    tokenizer = _kosmos2_tokenizer(1024)
    # Wider initial weights than the published model's (0.02) and an untied head: at 0.02 the
    # projection's features are small next to its latent queries, so every image gives the same
    # answer, and a random head tied to the embeddings repeats the last token; such answers would
    # not tell whether positions and image embeddings arrive as the whole model places them.
    vision = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 30,
        "patch_size": 2,
        "initializer_range": 0.2,
    }
    text = {
        "vocab_size": len(tokenizer),
        "embed_dim": 32,
        "ffn_dim": 37,
        "layers": 2,
        "attention_heads": 4,
        "max_position_embeddings": 512,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "init_std": 0.3,
        "tie_word_embeddings": False,
    }
    config = Kosmos2Config(vision_config=vision, text_config=text, latent_query_num=64, tie_word_embeddings=False)
    _save_sharded(Kosmos2ForConditionalGeneration, config, tokenizer, path, seed)
    CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}).save_pretrained(path)
    _processor_files(path, "Kosmos2Processor", {"num_patch_index_tokens": 1024})
    return path


# --- video checkpoints (Video-LLaVA, LLaVA-NeXT-Video) ---------------------------------------------

# The Vicuna-style processor template of LanguageBind/Video-LLaVA-7B-hf and
# llava-hf/LLaVA-NeXT-Video-7B-hf, after the one transformers' conversion script writes: typed parts,
# a message's images first, then its videos, then its text, after "USER: "; the assistant's text
# inside a generation block.
VIDEO_LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{# Render all video then #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _video_checkpoint_files(path: Path, processor_class: str, processor: dict[str, Any]) -> None:
    """The processor's files as llava-hf lays them out: its settings in processor_config.json, its
    template in chat_template.json, ``processor_class`` beside the image processor's and the tokenizer's."""
    settings = {"image_token": "<image>", "video_token": "<video>", **processor}
    _processor_files(path, processor_class, settings, VIDEO_LLAVA_CHAT_TEMPLATE)


def _tiny_llama(tokenizer: Any) -> Any:
    """A 2-layer LLaMA (Vicuna's family) over ``tokenizer``'s vocabulary and special tokens."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def build_video_llava(path: str | Path, seed: int = 0) -> Path:
    """A Video-LLaVA-shaped model (LanguageBind/Video-LLaVA-7B-hf's layout at a tiny scale): two
    CLIP ViTs of the same shape (16x16, 4x4 patches), ``image_tower`` for images and
    ``video_tower`` for each frame -> one 2-layer GELU MLP -> 2-layer LLaMA, with a byte-level
    tokenizer whose ``<image>`` and ``<video>`` are the config's tokens, ``VideoLlavaImageProcessor``
    in preprocessor_config.json (the video processor reads its settings there too) and the
    processor's settings and template. No video processor file: frames per video are the
    reader's choice (5 by default)."""
    from transformers import CLIPVisionConfig, VideoLlavaConfig, VideoLlavaForConditionalGeneration, VideoLlavaImageProcessor

    path = Path(path)
    # Adds BOS to a text, as Vicuna's LLaMA tokenizer does; the template writes none.
    tokenizer = _byte_tokenizer(["<image>", "<video>"], None, special="<s> $A")
    view = 16
    vision = CLIPVisionConfig(
        image_size=view, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, projection_dim=32,
    )
    config = VideoLlavaConfig(
        vision_config=vision, text_config=_tiny_llama(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        image_seq_length=(view // 4) ** 2, video_seq_length=8 * ((view // 4) ** 2 + 1),
    )
    _save_sharded(VideoLlavaForConditionalGeneration, config, tokenizer, path, seed)
    VideoLlavaImageProcessor(size={"shortest_edge": view}, crop_size={"height": view, "width": view}).save_pretrained(path)
    # The tower's CLS is counted: dropped from an image's tokens by the strategy, kept in a frame's.
    _video_checkpoint_files(path, "VideoLlavaProcessor", {
        "patch_size": vision.patch_size, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1})
    return path


def build_llava_next_video(path: str | Path, seed: int = 0, num_frames: int = 4) -> Path:
    """A LLaVA-NeXT-Video-shaped model (llava-hf/LLaVA-NeXT-Video-7B-hf's layout at a tiny scale):
    one CLIP ViT (16x16, 2x2 patches, 64 tokens a view) for images, tiled as LLaVA-NeXT tiles them,
    and for frames, whose patch grid ``vision_resampler`` average-pools 2x2 (16 tokens a frame) ->
    2-layer GELU MLP and ``image_newline`` -> 2-layer LLaMA, with a byte-level tokenizer whose
    ``<image>`` and ``<video>`` are the config's tokens, ``LlavaNextImageProcessor`` in
    preprocessor_config.json, the video processor's settings in video_preprocessor_config.json
    (``num_frames`` frames a video) and the processor's settings and template."""
    from transformers import CLIPVisionConfig, LlavaNextImageProcessor, LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    path = Path(path)
    # <video> before <image>, as the published tokenizer adds them (ids 32000 and 32001); BOS added
    # to a text, as Vicuna's LLaMA tokenizer does.
    tokenizer = _byte_tokenizer(["<video>", "<image>"], None, special="<s> $A")
    view = 16
    vision = CLIPVisionConfig(
        image_size=view, patch_size=2, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, projection_dim=32,
    )
    pinpoints = [[view, 2 * view], [2 * view, view], [2 * view, 2 * view], [3 * view, view], [view, 3 * view]]
    config = LlavaNextVideoConfig(
        vision_config=vision, text_config=_tiny_llama(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", spatial_pool_mode="average", spatial_pool_stride=2,
        image_seq_length=(view // 2) ** 2, video_seq_length=num_frames * (view // 4) ** 2,
    )
    _save_sharded(LlavaNextVideoForConditionalGeneration, config, tokenizer, path, seed)
    sizes = {"size": {"shortest_edge": view}, "crop_size": {"height": view, "width": view}}
    LlavaNextImageProcessor(**sizes, image_grid_pinpoints=pinpoints).save_pretrained(path)
    video = {
        "video_processor_type": "LlavaNextVideoVideoProcessor", "processor_class": "LlavaNextVideoProcessor", **sizes,
        "resample": 3, "do_resize": True, "do_center_crop": True, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": True, "do_sample_frames": False, "num_frames": num_frames,
    }
    (path / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2) + "\n")
    # The video tokens carry no CLS (the strategy drops it before pooling); an image's base view counts it.
    _video_checkpoint_files(path, "LlavaNextVideoProcessor", {
        "patch_size": vision.patch_size, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1})
    return path


# InstructBlipVideoProcessor lays a prompt out as InstructBlipProcessor does, with <video> for
# <image>: the video's query tokens, BOS, then the instruction as it is.
INSTRUCTBLIP_VIDEO_CHAT_TEMPLATE = (
    "{% set ns = namespace(video=false, text='') %}"
    "{% for message in messages %}{% if '<video>' in message['content'] %}{% set ns.video = true %}{% endif %}"
    "{% set ns.text = (ns.text + ' ' + (message['content'] | replace('<video>', '') | trim)) | trim %}"
    "{% endfor %}"
    "{% if ns.video %}<video>{% endif %}{{ bos_token }}{{ ns.text }}"
)


def build_instructblip_video(path: str | Path, seed: int = 0, num_query_tokens: int = 8) -> Path:
    """An InstructBLIP-Video-shaped model (``InstructBlipVideoForConditionalGeneration``, which reads
    Salesforce/instructblip-vicuna-7b's weights): BLIP ViT (16x16, 4x4 patches, 17 tokens a frame)
    -> a Q-Former run once per frame on ``num_query_tokens`` queries and the instruction's tokens ->
    linear projection -> 2-layer LLaMA. Laid out as that checkpoint is: weights in shards, the
    LLaMA-style tokenizer (BOS added, ``<video>`` the config's video token,
    ``INSTRUCTBLIP_VIDEO_CHAT_TEMPLATE``) at the top, the Q-Former's BERT tokenizer in
    ``qformer_tokenizer/``, the image processor in preprocessor_config.json (where the video
    processor reads its settings too) and ``num_query_tokens`` in processor_config.json, so that
    ``AutoProcessor`` assembles ``InstructBlipVideoProcessor`` (given torchvision)."""
    from transformers import (
        BlipImageProcessor,
        InstructBlipVideoConfig,
        InstructBlipVideoForConditionalGeneration,
        InstructBlipVideoQFormerConfig,
        InstructBlipVideoVisionConfig,
    )

    path = Path(path)
    tokenizer = _byte_tokenizer(["<video>"], INSTRUCTBLIP_VIDEO_CHAT_TEMPLATE, special="<s> $A")
    qformer_tokenizer = _wordpiece_tokenizer()
    view = 16
    vision = InstructBlipVideoVisionConfig(
        image_size=view,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        # BLIP's default (1e-10) leaves the patch embedding at zero: every frame would give the same features.
        initializer_range=0.2,
    )
    qformer = InstructBlipVideoQFormerConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        encoder_hidden_size=32,
        cross_attention_frequency=1,
        vocab_size=len(qformer_tokenizer),
        pad_token_id=qformer_tokenizer.pad_token_id,
        max_position_embeddings=128,
        # Its default (0.02) leaves the cross-attention so weak that every video gets one answer.
        initializer_range=0.2,
    )
    config = InstructBlipVideoConfig(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=_tiny_llama(tokenizer).to_dict(),
        num_query_tokens=num_query_tokens,
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
    )
    _save_sharded(InstructBlipVideoForConditionalGeneration, config, tokenizer, path, seed)
    qformer_tokenizer.save_pretrained(path / "qformer_tokenizer")
    BlipImageProcessor(size={"height": view, "width": view}).save_pretrained(path)
    _processor_files(path, "InstructBlipVideoProcessor", {"num_query_tokens": num_query_tokens})
    return path


# llava-hf/llava-onevision-qwen2-0.5b-ov-hf's processor template: typed parts, the images, then the
# videos, then the text, inside Qwen's <|im_start|> ... <|im_end|> turns.
LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{# Render all video then #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}"
    "{% endif %}{{'<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAVA_ONEVISION_TOKENS = ["<|im_start|>", "<|im_end|>", "<image>", "<video>"]


def build_llava_onevision(path: str | Path, seed: int = 0) -> Path:
    """A LLaVA-OneVision-shaped model (llava-hf/llava-onevision-qwen2-0.5b-ov-hf's layout at a tiny
    scale): one SigLIP ViT without its head (20x20, 4x4 patches: 5x5 tokens a view, odd as the
    published 27x27) for images, tiled by any-resolution grids of up to 6x6 views as the published
    ``anyres_max_9`` checkpoint's, and for frames -> 2-layer GELU MLP and ``image_newline`` ->
    2-layer Qwen2, with a byte-level tokenizer carrying Qwen's chat tokens and the config's
    ``<image>`` and ``<video>``, ``LlavaOnevisionImageProcessor`` in preprocessor_config.json, the
    video processor's settings in video_preprocessor_config.json and the processor's settings
    (``num_image_tokens``, strategy ``full``) and template."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    path = Path(path)
    tokenizer = _byte_tokenizer(LLAVA_ONEVISION_TOKENS, None)
    # Listed as the published tokenizer lists them, so decoding leaves them out of the text.
    tokenizer.add_special_tokens({"additional_special_tokens": LLAVA_ONEVISION_TOKENS})
    view, patch = 20, 4
    vision = SiglipVisionConfig(
        image_size=view, patch_size=patch, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    # As the published 1x1 ... 6x6 grids of 384-pixel views, in views of 20.
    pinpoints = [[rows * view, cols * view] for rows in range(1, 7) for cols in range(1, 7)]
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"), image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    # A turn ends at <|im_end|>, as Qwen2-Instruct's tokenizer ends one.
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # In shards, as published: each pool then reads only the shards that hold its part.
    model.save_pretrained(path, max_shard_size="50KB")
    tokenizer.save_pretrained(path)
    # SigLIP's normalisation, as the published processors have it.
    sizes = {"size": {"height": view, "width": view}, "resample": 3, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    LlavaOnevisionImageProcessorPil(**sizes, image_grid_pinpoints=pinpoints, do_pad=True).save_pretrained(path)
    settings = json.loads((path / "preprocessor_config.json").read_text())
    # Saved under the class name the published file gives (the torchvision one; either loads it).
    settings["image_processor_type"] = "LlavaOnevisionImageProcessor"
    (path / "preprocessor_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    video = {
        "video_processor_type": "LlavaOnevisionVideoProcessor", "processor_class": "LlavaOnevisionProcessor", **sizes,
        "do_resize": True, "do_center_crop": None, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "do_convert_rgb": True, "do_sample_frames": False,
    }
    (path / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2) + "\n")
    processor = {"image_token": "<image>", "video_token": "<video>", "num_image_tokens": (view // patch) ** 2,
                 "vision_feature_select_strategy": "full", "vision_aspect_ratio": "anyres_max_9"}
    _processor_files(path, "LlavaOnevisionProcessor", processor, LLAVA_ONEVISION_CHAT_TEMPLATE)
    return path
