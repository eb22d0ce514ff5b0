"""Train the ``shapes`` preset on the shapes world (``omnistage.pipelines.shapes``), on CPUs.

The survey's regime, scaled down. The tiny models have no pretrained weights, so each one is
pretrained first and then frozen:

1. ``image_encoder``: a CLIP vision tower learns to tell colour, shape, place and size apart
   (a classification head on its patch features, standing in for CLIP's contrastive pretraining).
2. ``llm``: a LLaMA learns the language of the world, on text only: answers that describe a
   picture from its attributes given as words where the picture will go, and answers to drawing
   instructions ending in the signal tokens ``[IMG0]..[IMG3]``.
3. ``vae`` and 4. ``generator``: a Stable Diffusion autoencoder, then its UNet together with its
   own text encoder, on pictures and their captions.
5. ``input_projector`` (encoder and LLM frozen): the caption loss, picture in, caption out.
6. ``output_projector`` (LLM and generator frozen): the signal tokens' embeddings and the output
   projector learn, with an L2 loss, to reproduce the generator's text-encoder embedding of the
   picture an instruction asks for (NExT-GPT's second stage).

Phases 5 and 6 read through the stage classes that serve the preset (the same features, prompt
template and placeholders), so what is trained is what is served. Ray Train's ``TorchTrainer``
runs the whole sequence, data parallel across its workers (DDP over gloo); each worker draws its
own pictures. ``train_shapes`` is what ``omnistage train shapes OUTDIR`` runs.
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
from omnistage.actors.payloads import NEXTGPT_SIGNAL_TOKENS, PLACEHOLDERS, signal_token_names
from omnistage.pipelines import shapes

log = structlog.get_logger(__name__)

IMAGE_SIZE = 64  # pictures drawn for the generator; the encoder's processor resizes to ENCODER_SIZE
ENCODER_SIZE = 32
COND_LEN = 16  # the generator's text-encoder length: the longest caption is 8 words
WIDTH = 64  # hidden size of every model, so the projectors are square
SIGNAL_TOKENS = NEXTGPT_SIGNAL_TOKENS["image"]
COMPONENTS = ("image_encoder", "llm", "image_generator", "input_projector", "output_projector")


@dataclass(frozen=True)
class Phase:
    steps: int
    batch: int
    lr: float


# Steps, batch (split across the workers) and learning rate of each phase: sized to finish in
# minutes on 2 cores.
PHASES: dict[str, Phase] = {
    "image_encoder": Phase(steps=800, batch=64, lr=2e-3),
    "llm": Phase(steps=700, batch=64, lr=3e-3),
    "vae": Phase(steps=1200, batch=16, lr=2e-3),
    "generator": Phase(steps=1200, batch=32, lr=1e-3),
    "input_projector": Phase(steps=500, batch=32, lr=2e-3),
    "output_projector": Phase(steps=600, batch=64, lr=2e-3),
}


@dataclass(frozen=True)
class TrainSettings:
    seed: int = 0
    # Multiplies every phase's steps; tests train a small fraction to check the machinery.
    scale: float = 1.0
    # Pictures drawn per worker for the image phases.
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

    specials = [f"<|{role}|>" for role in ROLES] + list(PLACEHOLDERS.values()) + signal_token_names("image", SIGNAL_TOKENS)
    return shapes.build_word_tokenizer(specials, model_max_length=2048)


def new_models(seed: int) -> dict[str, Any]:
    """Every model of the preset with fresh, seeded weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    from omnistage.actors.input_projector import InputProjector
    from omnistage.actors.output_projector import OutputProjector
    from omnistage.actors.tiny import TINY_CHAT_TEMPLATE

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
    torch.manual_seed(seed + 2)
    models["vae"] = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    )
    torch.manual_seed(seed + 3)
    models["unet"] = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        # Cross-attention at 8x8 and in the middle only: at 16x16 it would triple the step time.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=WIDTH,
        attention_head_dim=8,
        norm_num_groups=8,
        # DeepFloyd IF's global path: the conditioning, attention-pooled, is added to the timestep
        # embedding that every ResNet block reads, so colour and place, properties of the whole
        # picture, reach every block and not only the two with cross-attention.
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
    )
    text_tokenizer = shapes.build_word_tokenizer([], model_max_length=COND_LEN)
    models["text_tokenizer"] = text_tokenizer
    torch.manual_seed(seed + 4)
    models["text_encoder"] = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(text_tokenizer),
            hidden_size=WIDTH,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=COND_LEN,
            pad_token_id=text_tokenizer.pad_token_id,
            eos_token_id=text_tokenizer.eos_token_id,
            bos_token_id=text_tokenizer.eos_token_id,
        )
    )
    torch.manual_seed(seed + 5)
    models["input_heads_spec"] = {"heads": {"image": {"type": "mlp2x_gelu", "in_dim": WIDTH, "out_dim": WIDTH}}}
    models["input_heads"] = InputProjector.build_heads(models["input_heads_spec"])
    torch.manual_seed(seed + 6)
    models["output_heads_spec"] = {
        "heads": {
            "image": {
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
        }
    }
    models["output_heads"] = OutputProjector.build_heads(models["output_heads_spec"])
    return models


def scheduler():
    """The noise schedule of Stable Diffusion, predicting the clean latent: in this world a
    caption fixes its picture up to jitter, so the model learns it directly."""
    from omnistage.actors.tiny import ddim_scheduler

    return ddim_scheduler(prediction_type="sample")


def text_conditioning(tokenizer, text_encoder: nn.Module, texts: list[str]) -> torch.Tensor:
    """(n, COND_LEN, WIDTH): the text encoder's last hidden states, prompts padded as diffusers
    pads them in ``encode_prompt`` (so a plain text prompt drives the generator the same way)."""
    ids = tokenizer(texts, padding="max_length", max_length=COND_LEN, truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids).last_hidden_state


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
    "position": list(shapes.POSITIONS),
    "size": list(shapes.SIZES),
}


class _EncoderProbe(nn.Module):
    """The vision tower plus one linear head per attribute over the mean of the patch features
    the stage serves (last layer, CLS dropped), so those features learn the attributes."""

    def __init__(self, vision: nn.Module):
        super().__init__()
        self.vision = vision
        # Only the pooled CLS output goes through this norm, and it is not served.
        vision.post_layernorm.requires_grad_(False)
        self.heads = nn.ModuleDict({name: nn.Linear(WIDTH, len(values)) for name, values in ATTRIBUTES.items()})

    def forward(self, pixels: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        features = self.vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
        pooled = features.mean(dim=1)
        return sum(F.cross_entropy(head(pooled), labels[name]) for name, head in self.heads.items())


def train_image_encoder(worker: Worker, settings: TrainSettings, models: dict[str, Any]) -> float:
    rng = _rng(settings, worker, "image_encoder")
    images, specs = _pictures(settings.pool, rng)
    pixels = models["processor"](images=list(images), return_tensors="pt")["pixel_values"]
    labels = {
        name: torch.tensor([values.index(getattr(spec, name)) for spec in specs]) for name, values in ATTRIBUTES.items()
    }
    gen = _torch_rng(rng)

    def batch(step: int) -> tuple:
        idx = _sample(len(pixels), _batch("image_encoder", worker), gen)
        return pixels[idx], {name: values[idx] for name, values in labels.items()}

    loss = _train(worker, "image_encoder", settings, _EncoderProbe(models["vision"]), batch)
    _freeze(models["vision"])
    return loss


def _keywords(spec: shapes.ShapeSpec, rng: random.Random) -> str:
    words = [spec.size, spec.colour, spec.shape, spec.position]
    rng.shuffle(words)
    return " ".join(words)


def _user_turn(media: str, question: str) -> str:
    """A user message as the LLM stage gives a string template the parts ``parse_messages`` writes
    (the medium's part, then the question): joined by a newline."""
    return f"{media}\n{question}" if question else media


def _answer_ids(tokenizer, text: str, signals: bool = False) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if signals:
        ids += tokenizer.convert_tokens_to_ids(signal_token_names("image", SIGNAL_TOKENS))
    return ids + [tokenizer.eos_token_id]


def drawing_answer(spec: shapes.ShapeSpec) -> str:
    """What the LLM says before the signal tokens when asked to draw ``spec``."""
    return f"here is {shapes.caption(spec)}"


@functools.lru_cache(maxsize=16384)
def _render(tokenizer, user: str) -> tuple[int, ...]:
    """The prompt's ids as the LLM stage renders and tokenizes it; cached because the chat
    template's rendering costs more than a training step's share of the model."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def _prompt_ids(tokenizer, user: str) -> list[int]:
    return list(_render(tokenizer, user))


class _CausalLM(nn.Module):
    """Next-token loss on the answer tokens (labels -100 elsewhere)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask, labels=labels).loss


def train_llm(worker: Worker, settings: TrainSettings, models: dict[str, Any]) -> float:
    """Text only: half the examples describe a picture from its attribute words, put where the
    picture will go (so the model learns to read the attributes from its context), half answer a
    drawing instruction with the picture's caption and the signal tokens."""
    rng = _rng(settings, worker, "llm")
    tokenizer = models["tokenizer"]

    def example() -> tuple[list[int], list[int]]:
        if rng.random() < 0.5:
            spec = shapes.random_spec(rng)
            return _prompt_ids(tokenizer, _user_turn(_keywords(spec, rng), rng.choice(shapes.QUESTIONS))), _answer_ids(tokenizer, shapes.caption(spec))
        text, spec = shapes.instruction(rng)
        return _prompt_ids(tokenizer, text), _answer_ids(tokenizer, drawing_answer(spec), signals=True)

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


def train_vae(worker: Worker, settings: TrainSettings, models: dict[str, Any]) -> float:
    rng = _rng(settings, worker, "vae")
    images, _ = _pictures(settings.pool // 2, rng)
    pixels = _to_unit(images)
    # The shapes cover a tenth of a picture or less: weighted evenly, the reconstruction settles
    # on one warm colour for red, orange and yellow (measured on 48 pictures after 400 steps: 30
    # colours kept, against 43 with the shapes' pixels weighted 11 times the background's).
    weights = 1 + 10 * torch.from_numpy(shapes.saturated(images)).float()[:, None]
    vae = models["vae"]
    gen = _torch_rng(rng)
    size = _batch("vae", worker)
    # Random 32x32 crops: the autoencoder is convolutional and a crop costs a quarter of a
    # picture, so the phase affords three times the steps. Whole pictures for 400 steps came back
    # as blobs; crops for 1200 steps kept 48 of 48 colours and 45 of 48 shapes recognisable.
    crop = IMAGE_SIZE // 2
    latent = (size, 4, crop // 4, crop // 4)

    def batch(step: int) -> tuple:
        idx = _sample(len(pixels), size, gen)
        top, left = torch.randint(0, IMAGE_SIZE - crop + 1, (2,), generator=gen).tolist()
        window = (slice(None), slice(None), slice(top, top + crop), slice(left, left + crop))
        return pixels[idx][window], torch.randn(latent, generator=gen), weights[idx][window]

    loss = _train(worker, "vae", settings, _Autoencoder(vae), batch)
    _freeze(vae)
    # The latents' scale, measured, so the UNet sees unit-variance latents (SD's 0.18215, fitted here).
    with torch.no_grad():
        latents = vae.encode(pixels[:256]).latent_dist.mode()
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return loss


class _Diffusion(nn.Module):
    """The UNet and the text encoder, trained together: x0-prediction MSE on VAE latents."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, ids: torch.Tensor, cond_noise: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        cond = self.text_encoder(ids).last_hidden_state
        # Noise on the conditioning: the output projector only approximates these embeddings, so
        # the UNet learns to draw the same picture from anything near them.
        return F.mse_loss(self.unet(noisy, t, encoder_hidden_states=cond + cond_noise).sample, x0)


def train_generator(worker: Worker, settings: TrainSettings, models: dict[str, Any]) -> float:
    rng = _rng(settings, worker, "generator")
    images, specs = _pictures(settings.pool, rng)
    vae = models["vae"]
    with torch.no_grad():
        latents = torch.cat(
            [vae.encode(_to_unit(images[i : i + 256])).latent_dist.mode() for i in range(0, len(images), 256)]
        ) * vae.config.scaling_factor
    ids = models["text_tokenizer"](
        [shapes.caption(s) for s in specs], padding="max_length", max_length=COND_LEN, truncation=True, return_tensors="pt"
    ).input_ids
    noise_schedule = scheduler()
    gen = _torch_rng(rng)
    size = _batch("generator", worker)

    def batch(step: int) -> tuple:
        idx = _sample(len(latents), size, gen)
        x0 = latents[idx]
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (size,), generator=gen)
        noisy = noise_schedule.add_noise(x0, torch.randn(x0.shape, generator=gen), t)
        return noisy, t, ids[idx], 0.1 * torch.randn(size, COND_LEN, WIDTH, generator=gen), x0

    loss = _train(worker, "generator", settings, _Diffusion(models["unet"], models["text_encoder"]), batch)
    _freeze(models["unet"])
    _freeze(models["text_encoder"])
    return loss


class _Captioner(nn.Module):
    """The input projector's image head, under the caption loss of the frozen LLM stage's model."""

    def __init__(self, head: nn.Module, llm):
        super().__init__()
        self.head = head
        self.llm = llm.model  # frozen: no gradient, so the data-parallel wrapper leaves it alone
        self.splice = llm.splice  # the LLM stage's own splice, so training fills what serving fills

    def forward(self, features: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        embeds = self.splice(ids, self.head(features))
        logits = self.llm(inputs_embeds=embeds, attention_mask=mask).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


def train_input_projector(worker: Worker, settings: TrainSettings, models: dict[str, Any], stages: dict[str, Any]) -> float:
    """Caption loss through the frozen LLM, on features from the image encoder stage as served.
    The placeholder is expanded to one position per feature token and the projected features
    spliced there, as the LLM stage splices them."""
    rng = _rng(settings, worker, "input_projector")
    images, specs = _pictures(settings.pool // 2, rng)
    encoder, llm = stages["image_encoder"], stages["llm"]
    features = torch.from_numpy(np.stack([f.features for f in encoder(list(images))]))
    n_tokens = features.shape[1]
    tokenizer = llm.tokenizer
    gen = _torch_rng(rng)

    def batch(step: int) -> tuple:
        idx = _sample(len(features), _batch("input_projector", worker), gen)
        rows, labels = [], []
        for i in idx.tolist():
            prompt = _prompt_ids(tokenizer, _user_turn(PLACEHOLDERS["image"], rng.choice(shapes.QUESTIONS)))
            prompt = llm.expand(prompt, [n_tokens])
            answer = _answer_ids(tokenizer, shapes.caption(specs[i]))
            rows.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)
        ids = _pad(rows, tokenizer.pad_token_id)
        mask = _pad([[1] * len(r) for r in rows], 0)
        return features[idx], ids, mask, _pad(labels, -100)

    return _train(worker, "input_projector", settings, _Captioner(models["input_heads"]["image"], llm), batch)


class _SignalProjector(nn.Module):
    """The signal tokens' input embeddings and the output projector head, trained together under
    the frozen LLM stage's model."""

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
        states = signal_states(hidden[:, -SIGNAL_TOKENS - 1 : -1], self.embeddings)
        return F.mse_loss(self.head(states), target)


def train_output_projector(worker: Worker, settings: TrainSettings, models: dict[str, Any], stages: dict[str, Any]) -> float:
    """L2 between the projected signal states and the generator's text-encoder embedding of the
    picture each instruction asks for, the LLM's answer teacher-forced before the signal tokens."""
    rng = _rng(settings, worker, "output_projector")
    llm = stages["llm"]
    tokenizer = llm.tokenizer
    signal_ids = tokenizer.convert_tokens_to_ids(signal_token_names("image", SIGNAL_TOKENS))
    embedding = llm.embed_tokens.weight
    module = _SignalProjector(embedding[signal_ids].detach(), models["output_heads"]["image"], llm)
    size = _batch("output_projector", worker)

    def batch(step: int) -> tuple:
        rows, specs = [], []
        for _ in range(size):
            text, spec = shapes.instruction(rng)
            answer = tokenizer(drawing_answer(spec), add_special_tokens=False)["input_ids"]
            rows.append(_prompt_ids(tokenizer, text) + answer)
            specs.append(spec)
        width = max(len(r) for r in rows)
        # Left-padded, as the LLM stage decodes, so every group takes the last columns.
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * (len(r) + SIGNAL_TOKENS) for r in rows])
        with torch.no_grad():
            prefix = llm.embed_tokens(ids)
            target = text_conditioning(models["text_tokenizer"], models["text_encoder"], [shapes.caption(s) for s in specs])
        return prefix, mask, target

    loss = _train(worker, "output_projector", settings, module, batch)
    with torch.no_grad():
        embedding[signal_ids] = module.embeddings
    return loss


# --- saving and the whole run ---------------------------------------------------------------------


def save_component(name: str, models: dict[str, Any], out: Path) -> None:
    from diffusers import StableDiffusionPipeline

    from omnistage.actors.heads import save_heads

    path = out / name
    if name == "image_encoder":
        models["vision"].save_pretrained(path)
        models["processor"].save_pretrained(path)
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
    elif name == "input_projector":
        save_heads(models["input_heads"], models["input_heads_spec"], path)
    elif name == "output_projector":
        save_heads(models["output_heads"], models["output_heads_spec"], path)
    else:
        raise ValueError(f"expected a component in {COMPONENTS}, got {name!r}")


def _stage(name: str, path: Path):
    from omnistage.actors.registry import create_stage

    options: dict[str, Any] = {"model": str(path), "device": "cpu", "dtype": "float32"}
    if name == "llm":
        options["signal_tokens"] = {"image": SIGNAL_TOKENS}
    if name == "image_encoder":
        options.update(feature_layer=-1, drop_cls=True)  # as cluster/presets/shapes.yaml serves it
    stage = create_stage(name, options)
    _freeze(stage.model)
    return stage


def train_all(worker: Worker, settings: TrainSettings, out_dir: str | Path) -> dict[str, float]:
    """Every phase in order; returns each phase's final loss.

    Worker 0 writes the frozen models that phases 5 and 6 load as stages into a staging folder
    beside ``out_dir`` (transformers saves on rank 0 only under torch.distributed), every worker
    loads them from there, and worker 0 finally swaps the finished preset into ``out_dir``.
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
    losses["llm"] = train_llm(worker, settings, models)
    losses["vae"] = train_vae(worker, settings, models)
    losses["generator"] = train_generator(worker, settings, models)
    if worker.rank == 0:
        for name in ("image_encoder", "llm"):
            save_component(name, models, staging / "frozen")
    worker.barrier()
    stages = {name: _stage(name, staging / "frozen" / name) for name in ("image_encoder", "llm")}
    losses["input_projector"] = train_input_projector(worker, settings, models, stages)
    losses["output_projector"] = train_output_projector(worker, settings, models, stages)
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
