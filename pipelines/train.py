"""Train the ``shapes`` preset on the shapes world (``omnistage.pipelines.shapes``), on CPUs.

The survey's regime, scaled down. The tiny models have no pretrained weights, so each one is
pretrained first and then frozen:

1. ``image_encoder`` and ``audio_encoder``: a CLIP vision tower learns to tell colour, shape,
   place and size apart in pictures and video frames drawn in many styles; a Whisper encoder
   learns pitch, length, count and timbre of beeps at many rates (classification heads on their
   features, standing in for contrastive pretraining).
2. ``llm``: a LLaMA learns the language of the world, on text only: answers that describe a
   picture, a clip or a sound from its attributes given as words where the medium will go, and
   answers to instructions ending in the signal tokens ``[IMG0..3]``, ``[VID0..3]``, ``[AUD0..3]``.
3. The generators: a Stable Diffusion autoencoder, its UNet with its own text encoder; a
   Zeroscope-layout 3D UNet with its own text encoder over the same autoencoder; an AudioLDM
   mel autoencoder, HiFi-GAN vocoder and UNet.
4. The input projector's heads (encoders and LLM frozen): the caption loss, medium in, caption out.
5. The output projector's heads (LLM and generators frozen): each modality's signal tokens'
   embeddings and head learn, with an L2 loss, to reproduce the conditioning its generator was
   trained on for what an instruction asks for (NExT-GPT's second stage).

Phases 4 and 5 read through the stage classes that serve the preset (the same features, prompt
template and placeholders), so what is trained is what is served. Ray Train's ``TorchTrainer``
runs the whole sequence, data parallel across its workers (DDP over gloo); each worker draws its
own data. ``train_shapes`` is what ``omnistage train shapes OUTDIR`` runs.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from torch import nn
from torch.nn import functional as F

from omnistage.actors.engine import signal_states
from omnistage.actors.media import encode_video
from omnistage.actors.payloads import PLACEHOLDERS, AudioClip, EncodedMedia, Modality, signal_token_names
from omnistage.pipelines import shapes

log = structlog.get_logger(__name__)

IMAGE_SIZE = 64  # pictures drawn for the generator; the encoder's processor resizes to ENCODER_SIZE
ENCODER_SIZE = 32
COND_LEN = 16  # the generators' text-encoder length: the longest caption is 8 words
WIDTH = 64  # hidden size of every model, so the projectors are square
VIDEO_FRAMES, VIDEO_SIZE = 8, 32  # clips the video generator makes: 8 frames of 32x32
ENCODER_FRAMES = 5  # frames the video encoder samples from any clip
# Four signal tokens per modality (NExT-GPT uses 4, 24 and 8): in this world four carry what a
# request can ask for, and every token is a decoding step.
SIGNAL_TOKENS: dict[Modality, int] = {"image": 4, "video": 4, "audio": 4}
# AudioLDM's mel settings at 16 kHz: 64 bins, a hop of 10 ms (the vocoder upsamples each frame 160
# times), a 1024-point window.
MEL_BINS, HOP, N_FFT = 64, 160, 1024
AUDIO_SECONDS = 0.96  # what the audio generator plays: 96 mel frames, 24 latent rows; every sound fits
# AudioLDM conditions its UNet on CLAP's pooled text embedding. Nothing here is pretrained, so the
# conditioning is the sound's four attributes as one-hot codes, concatenated, which the output
# projector learns to produce.
AUDIO_CODE = len(shapes.PITCHES) + len(shapes.LENGTHS) + len(shapes.COUNTS) + len(shapes.TIMBRES)
COMPONENTS = (
    "image_encoder",
    "audio_encoder",
    "llm",
    "image_generator",
    "video_generator",
    "audio_generator",
    "input_projector",
    "output_projector",
)


@dataclass(frozen=True)
class Phase:
    steps: int
    batch: int
    lr: float
    # Diffusion phases: the share of captions replaced by the empty one, so that the UNet also
    # learns the unconditional picture that classifier-free guidance steers away from.
    unconditional: float = 0.0


# Steps, batch (split across the workers) and learning rate of each phase: sized to finish in
# minutes on 2 cores.
PHASES: dict[str, Phase] = {
    "image_encoder": Phase(steps=3200, batch=64, lr=2e-3),
    "audio_encoder": Phase(steps=400, batch=32, lr=2e-3),
    "llm": Phase(steps=900, batch=64, lr=3e-3),
    "vae": Phase(steps=1600, batch=16, lr=2e-3),
    "generator": Phase(steps=1400, batch=32, lr=1e-3, unconditional=0.1),
    "video_generator": Phase(steps=700, batch=16, lr=1e-3),
    "mel_vae": Phase(steps=300, batch=16, lr=2e-3),
    "vocoder": Phase(steps=500, batch=8, lr=2e-3),
    "audio_generator": Phase(steps=500, batch=32, lr=1e-3),
    "image_projector": Phase(steps=800, batch=32, lr=2e-3),
    "video_projector": Phase(steps=1000, batch=32, lr=2e-3),
    "audio_projector": Phase(steps=400, batch=32, lr=2e-3),
    "image_signals": Phase(steps=500, batch=64, lr=2e-3),
    "video_signals": Phase(steps=300, batch=64, lr=2e-3),
    "audio_signals": Phase(steps=300, batch=64, lr=2e-3),
}


@dataclass(frozen=True)
class TrainSettings:
    seed: int = 0
    # Multiplies every phase's steps; tests train a small fraction to check the machinery.
    scale: float = 1.0
    # Pictures drawn per worker for the image phases (clips and sounds: a fraction of it).
    pool: int = 4000

    def steps(self, phase: str) -> int:
        return max(1, round(PHASES[phase].steps * self.scale))


@dataclass
class Worker:
    """What a phase needs to know about the process it runs in."""

    rank: int = 0
    world_size: int = 1
    # Wraps a module for data-parallel training (DDP under Ray Train); identity alone.
    wrap: Callable[[nn.Module], nn.Module] = lambda module: module
    report: Callable[[dict[str, Any]], None] = lambda metrics: None
    # Waits for every worker (torch.distributed's barrier under Ray Train).
    barrier: Callable[[], None] = lambda: None


def _batch(phase: str, worker: Worker) -> int:
    """One worker's share of the phase's batch: more workers, shorter steps."""
    return max(1, PHASES[phase].batch // worker.world_size)


# --- the models, from configs --------------------------------------------------------------------


def llm_tokenizer():
    from omnistage.actors.llm import ROLES

    signals = [token for modality, count in SIGNAL_TOKENS.items() for token in signal_token_names(modality, count)]
    specials = [f"<|{role}|>" for role in ROLES] + list(PLACEHOLDERS.values()) + signals
    return shapes.build_word_tokenizer(specials, model_max_length=2048)


def _text_encoder(tokenizer, seed: int) -> nn.Module:
    """A 2-layer CLIP text encoder over the world's words: a generator's own, trained with it."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=WIDTH,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=COND_LEN,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.eos_token_id,
        )
    )


def _resampler(num_latents: int, num_frames: int | None = None) -> dict[str, Any]:
    spec = {
        "type": "resampler",
        "in_dim": WIDTH,
        "out_dim": WIDTH,
        "num_latents": num_latents,
        "depth": 2,
        "num_heads": 4,
        "head_dim": 16,
    }
    return {**spec, "num_frames": num_frames} if num_frames else spec


def _autoencoder(channels: int, seed: int) -> nn.Module:
    """A three-level AutoencoderKL that divides each side by 4 into 4 latent channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
    )


def new_models(seed: int) -> dict[str, Any]:
    """Every model of the preset with fresh, seeded weights."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
        SpeechT5HifiGan,
        SpeechT5HifiGanConfig,
    )

    from omnistage.actors.input_projector import InputProjector
    from omnistage.actors.output_projector import OutputProjector
    from omnistage.actors.tiny import TINY_CHAT_TEMPLATE, whisper_encoder
    from omnistage.actors.unets import PositionalUNet2DConditionModel, PositionalUNet3DConditionModel

    models: dict[str, Any] = {}
    torch.manual_seed(seed)
    models["vision"] = CLIPVisionModel(
        CLIPVisionConfig(
            image_size=ENCODER_SIZE, patch_size=8, hidden_size=WIDTH, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128
        )
    )
    models["processor"] = CLIPImageProcessor(
        size={"shortest_edge": ENCODER_SIZE}, crop_size={"height": ENCODER_SIZE, "width": ENCODER_SIZE}
    )
    tokenizer = llm_tokenizer()
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    models["tokenizer"] = tokenizer
    torch.manual_seed(seed + 1)
    models["llm"] = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=WIDTH,
            intermediate_size=176,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=2048,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
    )
    # One autoencoder for pictures and video frames (64x64 <-> 16x16x4, 32x32 <-> 8x8x4): the
    # video generator's is a copy of it.
    models["vae"] = _autoencoder(3, seed + 2)
    torch.manual_seed(seed + 3)
    # Stable Diffusion's UNet plus a learned position map (omnistage.actors.unets): without it
    # the shape landed in a random third whatever the caption said.
    # The image and video UNets' shared sizes: two levels, 4 latent channels, cross-attention to
    # the text encoder's WIDTH-wide states.
    unet_sizes = {
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "cross_attention_dim": WIDTH,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    }
    models["unet"] = PositionalUNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4,
        # Cross-attention at 8x8 and in the middle only: at 16x16 it would triple the step time.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        **unet_sizes,
        # DeepFloyd IF's global path: the conditioning, attention-pooled, is added to the timestep
        # embedding that every ResNet block reads, so colour and place, properties of the whole
        # picture, reach every block and not only those with cross-attention.
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
    )
    text_tokenizer = shapes.build_word_tokenizer([], model_max_length=COND_LEN)
    models["text_tokenizer"] = text_tokenizer
    models["text_encoder"] = _text_encoder(text_tokenizer, seed + 4)
    torch.manual_seed(seed + 5)
    models["input_heads_spec"] = {
        "heads": {
            "image": {"type": "mlp2x_gelu", "in_dim": WIDTH, "out_dim": WIDTH},
            # 5 frames x 16 patches in, 8 tokens out, each frame tagged with its place in time.
            "video": _resampler(8, num_frames=ENCODER_FRAMES),
            "audio": _resampler(8),
        }
    }
    models["input_heads"] = InputProjector.build_heads(models["input_heads_spec"])
    torch.manual_seed(seed + 6)

    # Image and video: the text encoder's (COND_LEN, WIDTH) states, as GILL and NExT-GPT map to
    # Stable Diffusion's and Zeroscope's; audio: the one attribute code.
    transformer_head = {
        "type": "transformer",
        "in_dim": WIDTH,
        "d_model": WIDTH,
        "num_heads": 4,
        "num_encoder_layers": 1,
        "num_decoder_layers": 2,
        "ffn_dim": 128,
        "num_queries": COND_LEN,
        "out_dim": WIDTH,
    }
    models["output_heads_spec"] = {
        "heads": {
            "image": transformer_head,
            "video": dict(transformer_head),
            "audio": {
                "type": "mlp",
                "in_dim": WIDTH,
                "num_signal_tokens": SIGNAL_TOKENS["audio"],
                "hidden_dim": 128,
                "num_queries": 1,
                "out_dim": AUDIO_CODE,
            },
        }
    }
    models["output_heads"] = OutputProjector.build_heads(models["output_heads_spec"])
    torch.manual_seed(seed + 7)
    models["whisper"], models["feature_extractor"] = whisper_encoder(
        d_model=WIDTH, encoder_layers=3, encoder_ffn_dim=128, decoder_ffn_dim=16, max_target_positions=8
    )
    models["video_text_encoder"] = _text_encoder(text_tokenizer, seed + 8)
    torch.manual_seed(seed + 9)
    # Zeroscope's 3D UNet plus learned position maps over space and over frames (a clip moving
    # right starts on the left), and the pooled text in its timestep condition, as the picture
    # UNet has it: the direction of motion is a property of the whole clip.
    models["video_unet"] = PositionalUNet3DConditionModel(
        sample_size=VIDEO_SIZE // 4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        time_cond_proj_dim=WIDTH,
        **unet_sizes,
    )
    # AudioLDM's: mel spectrograms as one-channel pictures, 96 frames x 64 bins <-> 24x16x4.
    models["mel_vae"] = _autoencoder(1, seed + 10)
    torch.manual_seed(seed + 11)
    models["vocoder"] = SpeechT5HifiGan(
        SpeechT5HifiGanConfig(
            model_in_dim=MEL_BINS,
            sampling_rate=shapes.SOUND_RATE,
            upsample_initial_channel=64,
            upsample_rates=[8, 5, 4],  # 160 samples per mel frame
            upsample_kernel_sizes=[16, 10, 8],
            resblock_kernel_sizes=[3, 7],
            resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]],
            normalize_before=False,
        )
    )
    torch.manual_seed(seed + 12)
    # AudioLDM's UNet plus a learned position map: the beeps start and stop at given times.
    models["audio_unet"] = PositionalUNet2DConditionModel(
        sample_size=(round(AUDIO_SECONDS * shapes.SOUND_RATE / HOP) // 4, MEL_BINS // 4),
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        # AudioLDM's UNet takes no text sequence: only the pooled conditioning, as a class
        # embedding added to the timestep's.
        down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2,
        mid_block_type="UNetMidBlock2D",
        norm_num_groups=8,
        class_embed_type="simple_projection",
        projection_class_embeddings_input_dim=AUDIO_CODE,
    )
    return models


def scheduler():
    """Stable Diffusion's noise schedule rescaled to end in pure noise, sampled from its last
    timestep (zero terminal SNR and trailing timesteps, from Lin et al., "Common Diffusion Noise
    Schedules and Sample Steps Are Flawed"), the UNets predicting the clean latent: in this world a
    caption fixes its picture up to jitter, so the model learns it directly.

    Under the schedule as Stable Diffusion ships it, the noisiest training latent still holds a
    trace of the picture (the square root of alpha-bar is 0.07 there, and 0.12 at the first of 10
    sampled steps), from which the UNets learned where the shape was instead of from the caption;
    sampling starts from noise without that trace, so the shape landed in a random place (see
    ``omnistage.actors.unets`` for the measurement)."""
    from diffusers import DDIMScheduler

    from omnistage.actors.tiny import ddim_scheduler

    base = ddim_scheduler(prediction_type="sample")
    return DDIMScheduler.from_config(base.config, rescale_betas_zero_snr=True, timestep_spacing="trailing")


def caption_ids(tokenizer, texts: list[str]) -> torch.Tensor:
    """(n, COND_LEN) text-encoder ids, prompts padded as diffusers pads them in ``encode_prompt``
    (so a plain text prompt, or the empty negative prompt, drives the generator the same way)."""
    return tokenizer(texts, padding="max_length", max_length=COND_LEN, truncation=True, return_tensors="pt").input_ids


def text_conditioning(tokenizer, text_encoder: nn.Module, texts: list[str]) -> torch.Tensor:
    """(n, COND_LEN, WIDTH): the text encoder's last hidden states for ``caption_ids``."""
    return text_encoder(caption_ids(tokenizer, texts)).last_hidden_state


# --- training helpers -----------------------------------------------------------------------------


class _Schedule:
    """Learning rate: a short linear warm-up, then a cosine decay to 2% over the phase."""

    def __init__(self, optimizer: torch.optim.Optimizer, steps: int):
        self.optimizer, self.steps = optimizer, steps
        self.base = [group["lr"] for group in optimizer.param_groups]
        self.warmup = max(1, steps // 20)

    def set(self, step: int) -> None:
        if step < self.warmup:
            factor = (step + 1) / self.warmup
        else:
            factor = 0.5 * (1 + math.cos(math.pi * (step - self.warmup) / max(1, self.steps - self.warmup)))
        for group, base in zip(self.optimizer.param_groups, self.base):
            group["lr"] = base * max(factor, 0.02)


def _train(worker: Worker, phase: str, settings: TrainSettings, module: nn.Module, batch: Callable[[int], tuple]) -> float:
    """Run ``settings.steps(phase)`` AdamW steps of ``module(*batch(step))``, which returns the
    loss (the forward goes through the data-parallel wrapper, which syncs the gradients); returns
    the mean loss over the last tenth of the steps."""
    wrapped = worker.wrap(module)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=PHASES[phase].lr, weight_decay=0.0)
    steps = settings.steps(phase)
    schedule = _Schedule(optimizer, steps)
    wrapped.train()
    losses = []
    start = time.monotonic()
    for step in range(steps):
        schedule.set(step)
        loss = wrapped(*batch(step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
    module.eval()
    final = float(np.mean(losses[-max(1, steps // 10) :]))
    metrics = {"phase": phase, "steps": steps, "loss": final, "seconds": round(time.monotonic() - start, 1)}
    if worker.rank == 0:
        log.info("train_phase_done", **metrics)
    worker.report(metrics)
    return final


def _rng(settings: TrainSettings, worker: Worker, phase: str) -> random.Random:
    """Each worker, and each phase, draws its own data."""
    return random.Random(f"{settings.seed}/{phase}/{worker.rank}")


def _torch_rng(rng: random.Random) -> torch.Generator:
    return torch.Generator().manual_seed(rng.randrange(2**31))


def _pictures(n: int, rng: random.Random) -> tuple[np.ndarray, list[shapes.ShapeSpec]]:
    specs = [shapes.random_spec(rng) for _ in range(n)]
    return np.stack([shapes.render(spec, IMAGE_SIZE, rng) for spec in specs]), specs


def _sample(n_pool: int, batch: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, n_pool, (batch,), generator=gen)


def _freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


# --- phases ---------------------------------------------------------------------------------------

ATTRIBUTES = {
    "colour": list(shapes.COLOURS),
    "shape": list(shapes.SHAPES),
    "x": list(shapes.POSITIONS),  # which third of the width the shape is in
    "y": ["top", "middle", "bottom"],  # and of the height (video frames move up and down)
    "size": list(shapes.SIZES),  # pictures only: ignored for video frames
}
IGNORE = -100  # cross-entropy's ignore_index: no label


def _third(fraction: float) -> int:
    return min(2, max(0, int(fraction * 3)))


def _encoder_data(n: int, rng: random.Random) -> tuple[list[np.ndarray], dict[str, list[int]]]:
    """Pictures (two thirds) and single video frames (a third), two thirds of each drawn in varied
    styles and sizes, as other people make them, and their attribute labels."""
    images, labels = [], {name: [] for name in ATTRIBUTES}
    for i in range(n):
        varied = rng.random() < 2 / 3
        size = rng.choice((32, 48, 64, 96, 128)) if varied else IMAGE_SIZE
        if i % 3 < 2:
            spec = shapes.random_spec(rng)
            image = shapes.render(spec, size, rng, varied)
            found = (shapes.POSITIONS.index(spec.position), 1, shapes.SIZES.index(spec.size))
        else:
            motion = shapes.random_motion(rng)
            frames = rng.randint(5, 16)
            clip = shapes.render_clip(motion, frames, size if varied else VIDEO_SIZE, rng, varied)
            t = rng.randrange(frames)
            x, y = _clip_centre(clip[t])
            image, spec = clip[t], motion
            found = (_third(x), _third(y), IGNORE)
        images.append(image)
        for name, value in zip(ATTRIBUTES, (list(shapes.COLOURS).index(spec.colour), shapes.SHAPES.index(spec.shape), *found)):
            labels[name].append(value)
    return images, labels


def _clip_centre(frame: np.ndarray) -> tuple[float, float]:
    found = shapes.centre(frame)
    return found if found is not None else (0.5, 0.5)


class _AttributeHeads(nn.Module):
    """One linear head per attribute over a pooled feature, under the sum of their cross-entropies
    (an ``IGNORE`` label counts for nothing): how the encoders, and the video generator's text
    encoder, learn what a pretrained model would already tell apart."""

    def __init__(self, attributes: dict[str, list]):
        super().__init__()
        self.heads = nn.ModuleDict({name: nn.Linear(WIDTH, len(values)) for name, values in attributes.items()})

    def forward(self, pooled: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(F.cross_entropy(head(pooled), labels[name], ignore_index=IGNORE) for name, head in self.heads.items())


def _labels(specs: list, attributes: dict[str, list]) -> dict[str, torch.Tensor]:
    """Each attribute's value index for each spec, as ``_AttributeHeads`` reads them."""
    return {name: torch.tensor([values.index(getattr(spec, name)) for spec in specs]) for name, values in attributes.items()}


class _EncoderProbe(nn.Module):
    """The vision tower plus one linear head per attribute over the mean of the patch features
    the stage serves (last layer, CLS dropped), so those features learn the attributes."""

    def __init__(self, vision: nn.Module):
        super().__init__()
        self.vision = vision
        # Only the pooled CLS output goes through this norm, and it is not served.
        vision.post_layernorm.requires_grad_(False)
        self.heads = _AttributeHeads(ATTRIBUTES)

    def forward(self, pixels: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        features = self.vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
        return self.heads(features.mean(dim=1), labels)


def train_image_encoder(worker: Worker, settings: TrainSettings, models: dict[str, Any]) -> float:
    rng = _rng(settings, worker, "image_encoder")
    images, labels = _encoder_data(settings.pool, rng)
    pixels = models["processor"](images=images, return_tensors="pt")["pixel_values"]
    targets = {name: torch.tensor(values) for name, values in labels.items()}
    gen = _torch_rng(rng)

    def batch(step: int) -> tuple:
        idx = _sample(len(pixels), _batch("image_encoder", worker), gen)
        return pixels[idx], {name: values[idx] for name, values in targets.items()}

    loss = _train(worker, "image_encoder", settings, _EncoderProbe(models["vision"]), batch)
    _freeze(models["vision"])
    return loss


SOUND_ATTRIBUTES = {
    "count": list(shapes.COUNTS),
    "length": list(shapes.LENGTHS),
    "pitch": list(shapes.PITCHES),
    "timbre": list(shapes.TIMBRES),
}


def _sounds(n: int, rng: random.Random) -> tuple[list[AudioClip], list[shapes.SoundSpec]]:
    """Sounds, two thirds of them varied (other rates, levels, stereo, noise), as decoded clips."""
    specs = [shapes.random_sound(rng) for _ in range(n)]
    clips = [AudioClip(*shapes.synthesize(spec, rng, varied=rng.random() < 2 / 3)) for spec in specs]
    return clips, specs


class _AudioProbe(nn.Module):
    """The Whisper encoder plus one linear head per sound attribute over the mean of the features
    the stage serves (its last hidden states)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.heads = _AttributeHeads(SOUND_ATTRIBUTES)

    def forward(self, mels: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.heads(self.encoder(mels, output_hidden_states=True).hidden_states[-1].mean(dim=1), labels)


def train_audio_encoder(worker: Worker, settings: TrainSettings, models: dict[str, Any]) -> float:
    from omnistage.actors.media import to_mono_16k

    rng = _rng(settings, worker, "audio_encoder")
    clips, specs = _sounds(settings.pool // 2, rng)
    extractor = models["feature_extractor"]
    # As the audio encoder stage prepares clips: down-mixed and resampled to 16 kHz.
    waves = [to_mono_16k(clip, extractor.sampling_rate) for clip in clips]
    mels = extractor(waves, sampling_rate=extractor.sampling_rate, return_tensors="pt")["input_features"]
    targets = _labels(specs, SOUND_ATTRIBUTES)
    gen = _torch_rng(rng)

    def batch(step: int) -> tuple:
        idx = _sample(len(mels), _batch("audio_encoder", worker), gen)
        return mels[idx], {name: values[idx] for name, values in targets.items()}

    encoder = models["whisper"].get_encoder()
    loss = _train(worker, "audio_encoder", settings, _AudioProbe(encoder), batch)
    _freeze(models["whisper"])
    return loss


def _keywords(words: list[str], rng: random.Random) -> str:
    """A medium's attributes as words, shuffled: what the LLM learns to read its medium from."""
    words = list(words)
    rng.shuffle(words)
    return " ".join(words)


def _described(modality: Modality, rng: random.Random) -> tuple[list[str], str]:
    """A random picture, clip or sound of the world: (its attribute words, its caption)."""
    if modality == "image":
        spec = shapes.random_spec(rng)
        return [spec.size, spec.colour, spec.shape, spec.position], shapes.caption(spec)
    if modality == "video":
        motion = shapes.random_motion(rng)
        words = [motion.colour, motion.shape, motion.motion] + ([] if motion.motion == "still" else ["moving"])
        return words, shapes.motion_caption(motion)
    sound = shapes.random_sound(rng)
    return [sound.count, sound.length, sound.pitch, sound.timbre], shapes.sound_caption(sound)


QUESTIONS: dict[Modality, tuple[str, ...]] = {
    "image": shapes.QUESTIONS,
    "video": shapes.VIDEO_QUESTIONS,
    "audio": shapes.AUDIO_QUESTIONS,
}


def _user_turn(media: str, question: str) -> str:
    """A user message as the LLM stage gives a string template the parts ``parse_messages`` writes
    (the medium's part, then the question): joined by a newline."""
    return f"{media}\n{question}" if question else media


def _answer_ids(tokenizer, text: str, signals: Modality | None = None) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if signals:
        ids += tokenizer.convert_tokens_to_ids(signal_token_names(signals, SIGNAL_TOKENS[signals]))
    return ids + [tokenizer.eos_token_id]


def drawing_answer(spec: shapes.ShapeSpec) -> str:
    """What the LLM says before the signal tokens when asked to draw ``spec``."""
    return f"here is {shapes.caption(spec)}"


def video_answer(spec: shapes.MotionSpec) -> str:
    return f"here is a video of {shapes.motion_caption(spec)}"


def sound_answer(spec: shapes.SoundSpec) -> str:
    return f"{'here is' if spec.count == 'one' else 'here are'} {shapes.sound_caption(spec)}"


def request(modality: Modality, rng: random.Random) -> tuple[str, str, Any]:
    """An instruction asking for a medium, the LLM's answer before the signal tokens, and the spec
    of what it asks for."""
    if modality == "image":
        text, spec = shapes.instruction(rng)
        return text, drawing_answer(spec), spec
    if modality == "video":
        text, motion = shapes.video_instruction(rng)
        return text, video_answer(motion), motion
    text, sound = shapes.sound_instruction(rng)
    return text, sound_answer(sound), sound


@functools.lru_cache(maxsize=16384)
def _render(tokenizer, user: str, history: tuple[tuple[str, str], ...]) -> tuple[int, ...]:
    """The prompt's ids as the LLM stage renders and tokenizes it; cached because the chat
    template's rendering costs more than a training step's share of the model."""
    messages = []
    for earlier, answer in history:
        messages += [{"role": "user", "content": earlier}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": user})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def _prompt_ids(tokenizer, user: str, history: tuple[tuple[str, str], ...] = ()) -> list[int]:
    """``history``: earlier (user, assistant) turns of the same chat, as plain text."""
    return list(_render(tokenizer, user, history))


class _CausalLM(nn.Module):
    """Next-token loss on the answer tokens (labels -100 elsewhere)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask, labels=labels).loss


def _turn(rng: random.Random) -> tuple[str, str, Modality | None]:
    """A text-only exchange: (user message, answer, the modality whose signal tokens end the
    answer, if any). Mostly a medium described by its attribute words and a question about it,
    otherwise an instruction and its answer."""
    modality = rng.choice(MODALITIES)
    if rng.random() < 0.6:
        words, text = _described(modality, rng)
        return _user_turn(_keywords(words, rng), rng.choice(QUESTIONS[modality])), text, None
    text, answer, _ = request(modality, rng)
    return text, answer, modality


def _history(rng: random.Random) -> tuple[tuple[str, str], ...]:
    """The earlier exchange a third of the LLM's chats have, in words: asked to draw a blue square
    right after a red circle was described, an LLM trained on single turns said red."""
    if rng.random() < 1 / 3:
        earlier, answer, _ = _turn(rng)
        return ((earlier, answer),)
    return ()


def train_llm(worker: Worker, settings: TrainSettings, models: dict[str, Any]) -> float:
    """Text only: most examples describe a picture, a clip or a sound from its attribute words, put
    where the medium will go (so the model learns to read the attributes from its context), the
    rest answer an instruction with what it asks for and the modality's signal tokens."""
    rng = _rng(settings, worker, "llm")
    tokenizer = models["tokenizer"]

    def example() -> tuple[list[int], list[int]]:
        history = _history(rng)
        user, answer, signals = _turn(rng)
        return _prompt_ids(tokenizer, user, history), _answer_ids(tokenizer, answer, signals=signals)

    def batch(step: int) -> tuple:
        pairs = [example() for _ in range(_batch("llm", worker))]
        ids = _pad([p + a for p, a in pairs], tokenizer.pad_token_id)
        labels = _pad([[-100] * len(p) + a for p, a in pairs], -100)
        return ids, _pad([[1] * (len(p) + len(a)) for p, a in pairs], 0), labels

    loss = _train(worker, "llm", settings, _CausalLM(models["llm"]), batch)
    _freeze(models["llm"])
    return loss


def _to_unit(images: np.ndarray) -> torch.Tensor:
    """(n, h, w, 3) uint8 -> (n, 3, h, w) float in [-1, 1], as diffusers' VAEs take pictures."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


class _Autoencoder(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, noise: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        posterior = self.vae.encode(x).latent_dist
        recon = self.vae.decode(posterior.mean + posterior.std * noise).sample
        # A light KL term keeps the latents near unit scale, as in Stable Diffusion's VAE.
        return (weight * (recon - x) ** 2).mean() / weight.mean() + 1e-6 * posterior.kl().mean()


def _clips(n: int, rng: random.Random) -> tuple[np.ndarray, list[shapes.MotionSpec]]:
    """(n, VIDEO_FRAMES, VIDEO_SIZE, VIDEO_SIZE, 3) uint8 clips in the house style, as the video
    generator learns to make them."""
    specs = [shapes.random_motion(rng) for _ in range(n)]
    return np.stack([shapes.render_clip(spec, VIDEO_FRAMES, VIDEO_SIZE, rng) for spec in specs]), specs


def _shape_weights(images: np.ndarray) -> torch.Tensor:
    """Per-pixel loss weights, (n, 1, h, w): the shapes cover a tenth of a picture or less, and
    weighted evenly the reconstruction settles on one warm colour for red, orange and yellow
    (measured on 48 pictures after 400 steps: 30 colours kept, against 43 with the shapes' pixels
    weighted 11 times the background's)."""
    return 1 + 10 * torch.from_numpy(shapes.saturated(images)).float()[:, None]


def train_vae(worker: Worker, settings: TrainSettings, models: dict[str, Any]) -> float:
    """Pictures and video frames: each batch is half 32x32 crops of pictures, half whole frames."""
    rng = _rng(settings, worker, "vae")
    images, _ = _pictures(settings.pool // 2, rng)
    pixels = _to_unit(images)
    weights = _shape_weights(images)
    clips, _ = _clips(settings.pool // 16, rng)
    frames = clips.reshape(-1, VIDEO_SIZE, VIDEO_SIZE, 3)
    frame_pixels, frame_weights = _to_unit(frames), _shape_weights(frames)
    vae = models["vae"]
    gen = _torch_rng(rng)
    size = _batch("vae", worker)
    # Random 32x32 crops: the autoencoder is convolutional and a crop costs a quarter of a
    # picture, so the phase affords three times the steps. Whole pictures for 400 steps came back
    # as blobs; crops for 1200 steps kept 48 of 48 colours and 45 of 48 shapes recognisable.
    crop = IMAGE_SIZE // 2
    latent = (size, 4, crop // 4, crop // 4)

    def batch(step: int) -> tuple:
        idx = _sample(len(pixels), size - size // 2, gen)
        top, left = torch.randint(0, IMAGE_SIZE - crop + 1, (2,), generator=gen).tolist()
        window = (slice(None), slice(None), slice(top, top + crop), slice(left, left + crop))
        frame_idx = _sample(len(frame_pixels), size // 2, gen)
        x = torch.cat([pixels[idx][window], frame_pixels[frame_idx]])
        w = torch.cat([weights[idx][window], frame_weights[frame_idx]])
        return x, torch.randn(latent, generator=gen), w

    loss = _train(worker, "vae", settings, _Autoencoder(vae), batch)
    _freeze(vae)
    # The latents' scale, measured, so the UNet sees unit-variance latents (SD's 0.18215, fitted here).
    with torch.no_grad():
        latents = vae.encode(pixels[:256]).latent_dist.mode()
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return loss


class _Diffusion(nn.Module):
    """A UNet (2D or 3D) and its text encoder, trained together: x0-prediction MSE on VAE latents.

    With ``probe`` (attribute name -> values), ``_AttributeHeads`` also read the mean of the noised
    conditioning: a stand-in for the pretraining that gives Zeroscope's CLIP text encoder captions
    that differ where their words do."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, probe: dict[str, list] | None = None):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder
        self.probe = _AttributeHeads(probe) if probe else None

    def forward(
        self,
        noisy: torch.Tensor,
        t: torch.Tensor,
        ids: torch.Tensor,
        cond_noise: torch.Tensor,
        x0: torch.Tensor,
        weight: torch.Tensor,
        labels: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        # Noise on the conditioning: the output projector only approximates these embeddings, so
        # the UNet learns to draw the same picture from anything near them.
        cond = self.text_encoder(ids).last_hidden_state + cond_noise
        pred = self.unet(noisy, t, encoder_hidden_states=cond).sample
        loss = (weight * (pred - x0) ** 2).mean() / weight.mean()
        if self.probe is None:
            return loss
        # The probe reads through the same noise, so the captions must differ by more than it.
        return loss + self.probe(cond.mean(dim=1), labels)


class _Captions:
    """A diffusion phase's captions as ``caption_ids``, a share of each batch
    (``Phase.unconditional``) swapped for the empty caption: the negative prompt the pipelines
    embed under classifier-free guidance."""

    def __init__(self, tokenizer, captions: list[str], phase: str):
        self.all, self.empty = caption_ids(tokenizer, captions), caption_ids(tokenizer, [""])[0]
        self.share = PHASES[phase].unconditional

    def ids(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        ids = self.all[idx]
        if self.share:
            ids[torch.rand(len(idx), generator=gen) < self.share] = self.empty
        return ids


def _latent_weights(images: np.ndarray) -> torch.Tensor:
    """Loss weights over latent positions, (n, 1, h/4, w/4): 11 where a 4x4 patch holds any of a
    shape's pixels, else 1, as the autoencoder weights pixels. Weighted evenly, the background
    (nine tenths of a latent) drowns the shape: the UNet drew colour right but half the shapes
    unrecognisable and the place at chance."""
    mask = torch.from_numpy(shapes.saturated(images)).float()[:, None]
    return 1 + 10 * F.max_pool2d(mask, 4)


def train_generator(worker: Worker, settings: TrainSettings, models: dict[str, Any]) -> float:
    rng = _rng(settings, worker, "generator")
    images, specs = _pictures(settings.pool, rng)
    latents = _latents(models["vae"], images)
    weights = _latent_weights(images)
    captions = _Captions(models["text_tokenizer"], [shapes.caption(s) for s in specs], "generator")
    noise_schedule = scheduler()
    gen = _torch_rng(rng)
    size = _batch("generator", worker)

    def batch(step: int) -> tuple:
        idx = _sample(len(latents), size, gen)
        x0 = latents[idx]
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (size,), generator=gen)
        noisy = noise_schedule.add_noise(x0, torch.randn(x0.shape, generator=gen), t)
        return noisy, t, captions.ids(idx, gen), 0.1 * torch.randn(size, COND_LEN, WIDTH, generator=gen), x0, weights[idx]

    loss = _train(worker, "generator", settings, _Diffusion(models["unet"], models["text_encoder"]), batch)
    _freeze(models["unet"])
    _freeze(models["text_encoder"])
    return loss


def _latents(vae: nn.Module, images: np.ndarray) -> torch.Tensor:
    """(n, 4, h/4, w/4) scaled latents of (n, h, w, 3) uint8 images, in chunks."""
    with torch.no_grad():
        return torch.cat(
            [vae.encode(_to_unit(images[i : i + 256])).latent_dist.mode() for i in range(0, len(images), 256)]
        ) * vae.config.scaling_factor


# What the video generator's caption probe reads from a caption.
MOTION_ATTRIBUTES = {"colour": list(shapes.COLOURS), "shape": list(shapes.SHAPES), "motion": list(shapes.MOTIONS)}


def train_video_generator(worker: Worker, settings: TrainSettings, models: dict[str, Any]) -> float:
    """Zeroscope's recipe at this scale: a 3D UNet (temporal convolutions and attention between
    the spatial ones) and its own text encoder, on clips encoded frame by frame by the frozen
    picture autoencoder, x0-prediction as for pictures."""
    rng = _rng(settings, worker, "video_generator")
    clips, specs = _clips(settings.pool // 4, rng)
    n, frames = clips.shape[:2]
    latents = _latents(models["vae"], clips.reshape(-1, VIDEO_SIZE, VIDEO_SIZE, 3))
    # (n * frames, c, h, w) -> (n, c, frames, h, w), the layout of TextToVideoSDPipeline's latents
    latents = latents.view(n, frames, *latents.shape[1:]).permute(0, 2, 1, 3, 4).contiguous()
    weights = _latent_weights(clips.reshape(-1, VIDEO_SIZE, VIDEO_SIZE, 3))
    weights = weights.view(n, frames, *weights.shape[1:]).permute(0, 2, 1, 3, 4).contiguous()
    captions = _Captions(models["text_tokenizer"], [shapes.motion_caption(s) for s in specs], "video_generator")
    noise_schedule = scheduler()
    gen = _torch_rng(rng)
    size = _batch("video_generator", worker)

    labels = _labels(specs, MOTION_ATTRIBUTES)

    def batch(step: int) -> tuple:
        idx = _sample(n, size, gen)
        x0 = latents[idx]
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (size,), generator=gen)
        noisy = noise_schedule.add_noise(x0, torch.randn(x0.shape, generator=gen), t)
        cond_noise = 0.1 * torch.randn(size, COND_LEN, WIDTH, generator=gen)
        return noisy, t, captions.ids(idx, gen), cond_noise, x0, weights[idx], {name: v[idx] for name, v in labels.items()}

    # The caption probe. Without it the text encoder learned "to the left" and "to the right"
    # nearly alike: 0.8 apart at the word, as far as the conditioning noise moves a position, and
    # 0.1 apart in the mean over positions ("up" and "down": 1.3 and 0.5; "left" and "up": 10 and
    # 1.8). The UNet moved the shape along the asked axis, but often the wrong way: fed 100
    # captions directly, 59 clips moved the way asked; with the probe (same data, 1000 steps), 98,
    # and with 700 steps, 99.
    diffusion = _Diffusion(models["video_unet"], models["video_text_encoder"], MOTION_ATTRIBUTES)
    loss = _train(worker, "video_generator", settings, diffusion, batch)
    _freeze(models["video_unet"])
    _freeze(models["video_text_encoder"])
    return loss


@functools.lru_cache(maxsize=1)
def _mel_filters() -> torch.Tensor:
    from transformers.audio_utils import mel_filter_bank

    filters = mel_filter_bank(
        num_frequency_bins=N_FFT // 2 + 1,
        num_mel_filters=MEL_BINS,
        min_frequency=0.0,
        max_frequency=shapes.SOUND_RATE / 2,
        sampling_rate=shapes.SOUND_RATE,
        norm="slaney",
        mel_scale="slaney",
    )
    return torch.from_numpy(filters).float()


def log_mel(waves: torch.Tensor) -> torch.Tensor:
    """(batch, n) 16 kHz waveforms -> (batch, n // HOP, MEL_BINS) log-mel frames, scaled to about
    [-1.3, 1.5] (silence at -1.3): what the mel autoencoder reads and the vocoder turns back into
    sound. Differentiable, so the vocoder trains through it."""
    spectrum = torch.stft(waves, N_FFT, HOP, window=torch.hann_window(N_FFT), center=True, return_complex=True).abs()
    mel = (spectrum.transpose(1, 2) @ _mel_filters())[:, : waves.shape[1] // HOP]
    return (torch.log(mel.clamp(min=1e-5)) + 5) / 5


def sound_code(spec: shapes.SoundSpec) -> np.ndarray:
    """(AUDIO_CODE,) float32: the sound's pitch, length, count and timbre as one-hot codes,
    concatenated: the audio generator's conditioning."""
    code = []
    for name, values in (("pitch", shapes.PITCHES), ("length", shapes.LENGTHS), ("count", shapes.COUNTS), ("timbre", shapes.TIMBRES)):
        code += [float(getattr(spec, name) == value) for value in values]
    return np.array(code, np.float32)


def _house_sounds(n: int, rng: random.Random) -> tuple[torch.Tensor, list[shapes.SoundSpec]]:
    """(n, AUDIO_SECONDS * 16000) waveforms in the house style, as the audio generator plays them."""
    specs = [shapes.random_sound(rng) for _ in range(n)]
    length = round(AUDIO_SECONDS * shapes.SOUND_RATE)
    waves = np.stack([shapes.synthesize(spec, rng)[0][:length] for spec in specs])
    return torch.from_numpy(waves), specs


def mel_weights(mels: torch.Tensor) -> torch.Tensor:
    """The mel autoencoder's loss weights for (n, 1, frames, bins) log-mels: 11 on the beeps'
    sound and on the silence within three frames of a beep, else 1. The silence between two beeps
    (70 ms; two or three frames of the log-mel, whose window spreads each beep) must count as much
    as the beeps: weighted as the rest of the silence, it filled in, and round trips through the
    autoencoder played two beeps as one (the count right for 62% of 60 sounds after 300 steps,
    against 100% weighted so)."""
    loud = (mels > -0.5).float()
    beeping = loud.amax(dim=3, keepdim=True)
    near = F.max_pool2d(beeping, (7, 1), stride=1, padding=(3, 0))
    return 1 + 10 * (loud + near - beeping)


def train_mel_vae(worker: Worker, settings: TrainSettings, models: dict[str, Any]) -> float:
    """AudioLDM's autoencoder, over mel spectrograms as one-channel pictures (time x bins), on
    windows of 32 frames (a third of a sound, as pictures are cropped); the beeps' sound and the
    silence within three frames of a beep weighted 11 times the rest, as the shapes' pixels are."""
    rng = _rng(settings, worker, "mel_vae")
    waves, _ = _house_sounds(settings.pool // 4, rng)
    mels = log_mel(waves)[:, None]
    weights = mel_weights(mels)
    vae = models["mel_vae"]
    gen = _torch_rng(rng)
    size = _batch("mel_vae", worker)
    window = 32
    latent = (size, 4, window // 4, MEL_BINS // 4)

    def batch(step: int) -> tuple:
        idx = _sample(len(mels), size, gen)
        start = 4 * int(torch.randint(0, (mels.shape[2] - window) // 4 + 1, (1,), generator=gen))
        frames = slice(start, start + window)
        return mels[idx][:, :, frames], torch.randn(latent, generator=gen), weights[idx][:, :, frames]

    loss = _train(worker, "mel_vae", settings, _Autoencoder(vae), batch)
    _freeze(vae)
    with torch.no_grad():
        latents = vae.encode(mels[:256]).latent_dist.mode()
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return loss


class _Vocoder(nn.Module):
    """HiFi-GAN's generator without its discriminators, under a waveform MSE. The world's pitches
    make whole cycles in every mel hop (``shapes.PITCHES``), so each frame's samples follow from
    its spectrum and the waveform itself can be the target. Trained on spectral losses instead
    (log-mel L1, multi-resolution STFT), it stayed nearly silent (1-2% of the target's RMS after
    500 steps): quiet output costs little where most frames are silence, and the phase it would
    have to guess does not enter those losses anyway."""

    def __init__(self, vocoder: nn.Module):
        super().__init__()
        self.vocoder = vocoder

    def forward(self, mels: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        wave = self.vocoder(mels)[:, : target.shape[1]]  # its convolutions add a few samples
        return 20 * F.mse_loss(wave, target)  # scaled to about 1 at the start: sounds are at 0.5 and mostly silence


def train_vocoder(worker: Worker, settings: TrainSettings, models: dict[str, Any]) -> float:
    """On 0.32 s windows of house sounds (the vocoder is convolutional: a window costs a third of
    a sound), mel frames in, the window's samples out."""
    rng = _rng(settings, worker, "vocoder")
    waves, _ = _house_sounds(settings.pool // 4, rng)
    mels = log_mel(waves)
    gen = _torch_rng(rng)
    size = _batch("vocoder", worker)
    window = 32  # mel frames

    def batch(step: int) -> tuple:
        idx = _sample(len(mels), size, gen)
        start = int(torch.randint(0, mels.shape[1] - window + 1, (1,), generator=gen))
        return mels[idx, start : start + window], waves[idx, start * HOP : (start + window) * HOP]

    loss = _train(worker, "vocoder", settings, _Vocoder(models["vocoder"]), batch)
    _freeze(models["vocoder"])
    return loss


class _ClassDiffusion(nn.Module):
    """AudioLDM's UNet: x0-prediction MSE, conditioned only through its class embedding."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, code: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.unet(noisy, t, encoder_hidden_states=None, class_labels=code).sample, x0)


def train_audio_generator(worker: Worker, settings: TrainSettings, models: dict[str, Any]) -> float:
    rng = _rng(settings, worker, "audio_generator")
    waves, specs = _house_sounds(settings.pool // 2, rng)
    vae = models["mel_vae"]
    mels = log_mel(waves)[:, None]
    with torch.no_grad():
        latents = torch.cat([vae.encode(mels[i : i + 256]).latent_dist.mode() for i in range(0, len(mels), 256)])
    latents = latents * vae.config.scaling_factor
    codes = torch.from_numpy(np.stack([sound_code(spec) for spec in specs]))
    noise_schedule = scheduler()
    gen = _torch_rng(rng)
    size = _batch("audio_generator", worker)

    def batch(step: int) -> tuple:
        idx = _sample(len(latents), size, gen)
        x0 = latents[idx]
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (size,), generator=gen)
        noisy = noise_schedule.add_noise(x0, torch.randn(x0.shape, generator=gen), t)
        # Noise on the code, as on the text conditioning: the output projector only approximates it.
        return noisy, t, codes[idx] + 0.1 * torch.randn(codes[idx].shape, generator=gen), x0

    loss = _train(worker, "audio_generator", settings, _ClassDiffusion(models["audio_unet"]), batch)
    _freeze(models["audio_unet"])
    return loss


class _Captioner(nn.Module):
    """An input projector head, under the caption loss of the frozen LLM stage's model."""

    def __init__(self, head: nn.Module, llm):
        super().__init__()
        self.head = head
        self.llm = llm.model  # frozen: no gradient, so the data-parallel wrapper leaves it alone
        self.splice = llm.splice  # the LLM stage's own splice, so training fills what serving fills

    def forward(self, features: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        embeds = self.splice(ids, self.head(features))
        logits = self.llm(inputs_embeds=embeds, attention_mask=mask).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


def _media(modality: Modality, n: int, rng: random.Random) -> tuple[list, list[str]]:
    """Media of the world as the encoder stages take them, two thirds drawn in varied styles, and
    their captions: pictures of many sizes; clips of 5 to 20 frames of many sizes; decoded audio
    clips at many rates."""
    media, captions = [], []
    for _ in range(n):
        varied = rng.random() < 2 / 3
        if modality == "image":
            spec = shapes.random_spec(rng)
            media.append(shapes.render(spec, rng.choice((32, 48, 64, 96, 128)) if varied else IMAGE_SIZE, rng, varied))
            captions.append(shapes.caption(spec))
        elif modality == "video":
            motion = shapes.random_motion(rng)
            size = rng.choice((32, 48, 64, 96)) if varied else VIDEO_SIZE
            clip = shapes.render_clip(motion, rng.randint(5, 20) if varied else VIDEO_FRAMES, size, rng, varied)
            if varied and rng.random() < 0.5:
                # Sent as files are: H.264's chroma subsampling or GIF's palette, decoded by the
                # encoder stage as served.
                clip = EncodedMedia("video", encode_video(clip, fps=24, fmt=rng.choice(("mp4", "gif"))))
            media.append(clip)
            captions.append(shapes.motion_caption(motion))
        else:
            sound = shapes.random_sound(rng)
            media.append(AudioClip(*shapes.synthesize(sound, rng, varied)))
            captions.append(shapes.sound_caption(sound))
    return media, captions


@dataclass
class Projected:
    """Media as the LLM reads them once the input projector is trained: (n, tokens, WIDTH)
    projected features, and each medium's caption."""

    tokens: torch.Tensor
    captions: list[str]


def train_input_projector(
    worker: Worker, settings: TrainSettings, models: dict[str, Any], stages: dict[str, Any], modality: Modality
) -> tuple[float, Projected]:
    """Caption loss through the frozen LLM, on features from the modality's encoder stage as
    served. The placeholder is expanded to one position per projected token and the projected
    features spliced there, as the LLM stage splices them. Returns the loss and the media
    projected by the trained head."""
    phase = f"{modality}_projector"
    rng = _rng(settings, worker, phase)
    media, captions = _media(modality, settings.pool // 2 if modality == "image" else settings.pool // 4, rng)
    encoder, llm = stages[f"{modality}_encoder"], stages["llm"]
    features = torch.from_numpy(
        np.concatenate([np.stack([f.features for f in encoder(media[i : i + 256])]) for i in range(0, len(media), 256)])
    )
    head = models["input_heads"][modality]
    with torch.no_grad():
        n_tokens = head(features[:1]).shape[1]
    tokenizer = llm.tokenizer
    gen = _torch_rng(rng)

    def batch(step: int) -> tuple:
        idx = _sample(len(features), _batch(phase, worker), gen)
        rows, labels = [], []
        for i in idx.tolist():
            prompt = _prompt_ids(tokenizer, _user_turn(PLACEHOLDERS[modality], rng.choice(QUESTIONS[modality])))
            prompt = llm.expand(prompt, [n_tokens])
            answer = _answer_ids(tokenizer, captions[i])
            rows.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)
        ids = _pad(rows, tokenizer.pad_token_id)
        mask = _pad([[1] * len(r) for r in rows], 0)
        return features[idx], ids, mask, _pad(labels, -100)

    loss = _train(worker, phase, settings, _Captioner(head, llm), batch)
    with torch.no_grad():
        return loss, Projected(head(features), captions)


class _SignalProjector(nn.Module):
    """One modality's signal tokens' input embeddings and its output projector head, trained
    together under the frozen LLM stage's model."""

    def __init__(self, embeddings: torch.Tensor, head: nn.Module, llm):
        super().__init__()
        self.embeddings = nn.Parameter(embeddings.clone())
        self.head = head
        self.llm = llm.model

    def forward(self, prefix: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        inputs = torch.cat([prefix, self.embeddings.expand(prefix.shape[0], -1, -1)], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self.llm(inputs_embeds=inputs, attention_mask=mask, position_ids=positions, output_hidden_states=True).hidden_states[-1]
        # Each signal token's state is read where it was predicted, as the LLM stage reads it.
        count = self.embeddings.shape[0]
        states = signal_states(hidden[:, -count - 1 : -1], self.embeddings)
        return F.mse_loss(self.head(states), target)


def conditioning(models: dict[str, Any], modality: Modality, specs: list) -> torch.Tensor:
    """What each generator was trained to read for ``specs``: the picture's or clip's caption
    through its own text encoder, (n, COND_LEN, WIDTH); the sound's code, (n, 1, AUDIO_CODE)."""
    if modality == "image":
        return text_conditioning(models["text_tokenizer"], models["text_encoder"], [shapes.caption(s) for s in specs])
    if modality == "video":
        return text_conditioning(models["text_tokenizer"], models["video_text_encoder"], [shapes.motion_caption(s) for s in specs])
    return torch.from_numpy(np.stack([sound_code(s) for s in specs]))[:, None]


def train_output_projector(
    worker: Worker,
    settings: TrainSettings,
    models: dict[str, Any],
    stages: dict[str, Any],
    modality: Modality,
    media: dict[Modality, Projected],
) -> float:
    """L2 between the projected signal states and the conditioning of what each instruction asks
    for, the LLM's answer teacher-forced before the signal tokens. A third of the chats have an
    earlier exchange: mostly a real medium (``media``, spliced as the LLM stage splices it), a
    question and its caption, as a served chat has them, otherwise an earlier instruction. With
    earlier turns in words only, "Draw a blue square" after a captioned picture came out in the
    picture's colour: the signal states after projected media were outside what the head learned."""
    phase = f"{modality}_signals"
    rng = _rng(settings, worker, phase)
    llm = stages["llm"]
    tokenizer = llm.tokenizer
    count = SIGNAL_TOKENS[modality]
    signal_ids = tokenizer.convert_tokens_to_ids(signal_token_names(modality, count))
    embedding = llm.embed_tokens.weight
    module = _SignalProjector(embedding[signal_ids].detach(), models["output_heads"][modality], llm)
    size = _batch(phase, worker)

    def earlier() -> tuple[tuple[tuple[str, str], ...], list[torch.Tensor]]:
        """(the earlier exchange, if any, the projected tokens of its medium, if any)."""
        if rng.random() >= 1 / 3:
            return (), []
        if rng.random() < 0.6:
            shown = rng.choice(MODALITIES)
            i = rng.randrange(len(media[shown].captions))
            user = _user_turn(PLACEHOLDERS[shown], rng.choice(QUESTIONS[shown]))
            return ((user, media[shown].captions[i]),), [media[shown].tokens[i]]
        text, answer, _ = request(rng.choice(MODALITIES), rng)
        return ((text, answer),), []

    def batch(step: int) -> tuple:
        rows, spliced, specs = [], [], []
        for _ in range(size):
            history, tokens = earlier()
            text, answer, spec = request(modality, rng)
            prompt = _prompt_ids(tokenizer, text, history)
            rows.append(llm.expand(prompt, [len(t) for t in tokens]) + tokenizer(answer, add_special_tokens=False)["input_ids"])
            spliced += tokens
            specs.append(spec)
        width = max(len(r) for r in rows)
        # Left-padded, as the LLM stage decodes, so every group takes the last columns.
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * (len(r) + count) for r in rows])
        with torch.no_grad():
            prefix = llm.splice(ids, torch.cat(spliced)) if spliced else llm.embed_tokens(ids)
            target = conditioning(models, modality, specs)
        return prefix, mask, target

    loss = _train(worker, phase, settings, module, batch)
    with torch.no_grad():
        embedding[signal_ids] = module.embeddings
    return loss


# --- saving and the whole run ---------------------------------------------------------------------


def save_component(name: str, models: dict[str, Any], out: Path) -> None:
    from diffusers import AudioLDMPipeline, StableDiffusionPipeline, TextToVideoSDPipeline

    from omnistage.actors.heads import save_heads

    path = out / name
    if name == "image_encoder":
        models["vision"].save_pretrained(path)
        models["processor"].save_pretrained(path)
    elif name == "audio_encoder":
        models["whisper"].save_pretrained(path)
        models["feature_extractor"].save_pretrained(path)
    elif name == "llm":
        models["llm"].save_pretrained(path)
        models["tokenizer"].save_pretrained(path)
    elif name == "image_generator":
        StableDiffusionPipeline(
            vae=models["vae"],
            text_encoder=models["text_encoder"],
            tokenizer=models["text_tokenizer"],
            unet=models["unet"],
            scheduler=scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        ).save_pretrained(path)
    elif name == "video_generator":
        TextToVideoSDPipeline(
            vae=models["vae"],
            text_encoder=models["video_text_encoder"],
            tokenizer=models["text_tokenizer"],
            unet=models["video_unet"],
            scheduler=scheduler(),
        ).save_pretrained(path)
    elif name == "audio_generator":
        # No text encoder: the conditioning is the sound's code (AUDIO_CODE), which only the
        # output projector makes.
        AudioLDMPipeline(
            vae=models["mel_vae"],
            text_encoder=None,
            tokenizer=None,
            unet=models["audio_unet"],
            scheduler=scheduler(),
            vocoder=models["vocoder"],
        ).save_pretrained(path)
    elif name == "input_projector":
        save_heads(models["input_heads"], models["input_heads_spec"], path)
    elif name == "output_projector":
        save_heads(models["output_heads"], models["output_heads_spec"], path)
    else:
        raise ValueError(f"expected a component in {COMPONENTS}, got {name!r}")


def _stage(name: str, path: Path):
    """A serving stage over a frozen component, with the options cluster/presets/shapes.yaml gives it."""
    from omnistage.actors.registry import create_stage

    options: dict[str, Any] = {"model": str(path), "device": "cpu", "dtype": "float32"}
    if name == "llm":
        options["signal_tokens"] = dict(SIGNAL_TOKENS)
    if name in ("image_encoder", "video_encoder"):
        options.update(feature_layer=-1, drop_cls=True)
    if name == "video_encoder":
        options["num_frames"] = ENCODER_FRAMES
    stage = create_stage(name, options)
    _freeze(stage.model)
    return stage


MODALITIES: tuple[Modality, ...] = ("image", "video", "audio")


def train_all(worker: Worker, settings: TrainSettings, out_dir: str | Path) -> dict[str, float]:
    """Every phase in order; returns each phase's final loss.

    Worker 0 writes the frozen models that the projector phases load as stages into a staging
    folder beside ``out_dir`` (transformers saves on rank 0 only under torch.distributed), every
    worker loads them from there, and worker 0 finally swaps the finished preset into ``out_dir``.
    """
    torch.manual_seed(settings.seed)
    models = new_models(settings.seed)
    losses: dict[str, float] = {}
    out = Path(out_dir).resolve()
    staging = out.parent / f".{out.name}.partial"
    if worker.rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    losses["image_encoder"] = train_image_encoder(worker, settings, models)
    losses["audio_encoder"] = train_audio_encoder(worker, settings, models)
    losses["llm"] = train_llm(worker, settings, models)
    losses["vae"] = train_vae(worker, settings, models)
    losses["generator"] = train_generator(worker, settings, models)
    losses["video_generator"] = train_video_generator(worker, settings, models)
    losses["mel_vae"] = train_mel_vae(worker, settings, models)
    losses["vocoder"] = train_vocoder(worker, settings, models)
    losses["audio_generator"] = train_audio_generator(worker, settings, models)
    frozen = staging / "frozen"
    if worker.rank == 0:
        for name in ("image_encoder", "audio_encoder", "llm"):
            save_component(name, models, frozen)
    worker.barrier()
    stages = {
        "image_encoder": _stage("image_encoder", frozen / "image_encoder"),
        "video_encoder": _stage("video_encoder", frozen / "image_encoder"),  # the same tower, as served
        "audio_encoder": _stage("audio_encoder", frozen / "audio_encoder"),
        "llm": _stage("llm", frozen / "llm"),
    }
    media: dict[Modality, Projected] = {}
    for modality in MODALITIES:
        losses[f"{modality}_projector"], media[modality] = train_input_projector(worker, settings, models, stages, modality)
    for modality in MODALITIES:
        losses[f"{modality}_signals"] = train_output_projector(worker, settings, models, stages, modality, media)
    # The trained signal embeddings live in the stage's model; the preset's LLM is that one.
    models["llm"] = stages["llm"].model
    worker.barrier()  # every worker is done reading the staging folder
    if worker.rank == 0:
        for name in COMPONENTS:
            save_component(name, models, staging / "preset")
        (staging / "preset" / "training.json").write_text(
            json.dumps({"settings": asdict(settings), "workers": worker.world_size, "losses": losses}, indent=2) + "\n"
        )
        shutil.rmtree(out, ignore_errors=True)
        (staging / "preset").rename(out)
        shutil.rmtree(staging)
    return losses


def preset_config(preset_dir: str | Path):
    """The shipped ``shapes`` config with every stage reading its component from ``preset_dir``
    (a directory ``train_shapes`` wrote), to serve or measure a preset trained elsewhere."""
    from omnistage.cluster.config import load_config

    config = load_config("shapes")
    for name in COMPONENTS:
        getattr(config.stages, name).model = str(Path(preset_dir) / name)
    config.stages.video_encoder.model = str(Path(preset_dir) / "image_encoder")  # it shares the image tower
    return config


def _ray_train_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    torch.set_num_threads(config["threads"])
    context = ray.train.get_context()
    worker = Worker(
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        wrap=ray.train.torch.prepare_model,
        report=ray.train.report,
        barrier=torch.distributed.barrier if torch.distributed.is_initialized() else (lambda: None),
    )
    train_all(worker, TrainSettings(**config["settings"]), config["out_dir"])


def train_shapes(
    out_dir: str | Path, settings: TrainSettings | None = None, workers: int = 2, cpus_per_worker: float = 1.0
) -> Path:
    """Train the shapes preset with Ray Train and write it to ``out_dir`` (replaced if present).

    Each worker runs torch on as many threads as the CPUs it reserves (at least one). Two workers
    of one thread each is the default: on two cores it is the fastest layout measured, because two
    OpenMP threads in one process spin-wait on each other whenever anything else wants a core.

    Connects to the running Ray cluster if there is one (``RAY_ADDRESS``), else starts a local one.
    ``out_dir`` must be writable by the first worker: on a multi-node cluster, shared storage.
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    settings = settings or TrainSettings()
    out = Path(out_dir).resolve()
    if not ray.is_initialized():
        # The dashboard serves Ray's state API, which Ray Train polls to clean up after a failed
        # run; bound to loopback, as Ray's ports run code for whoever reaches them.
        ray.init(address=os.environ.get("RAY_ADDRESS"), dashboard_host="127.0.0.1")
    # Ray Train keeps run state in its storage path; the preset itself goes to out_dir.
    with tempfile.TemporaryDirectory(prefix="omnistage-ray-train-") as storage:
        trainer = TorchTrainer(
            _ray_train_loop,
            train_loop_config={
                "settings": asdict(settings),
                "out_dir": str(out),
                "threads": max(1, int(cpus_per_worker)),
            },
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": cpus_per_worker}),
            run_config=RunConfig(name="omnistage-shapes", storage_path=storage),
        )
        trainer.fit()
    return out
