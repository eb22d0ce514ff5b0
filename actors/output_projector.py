"""Output projector stage: signal-token hidden states (S_X) to a generator's conditioning (H_X).

Two designs, one head per output modality in one checkpoint:
``transformer`` (NExT-GPT / GILL: a linear map in, an encoder-decoder transformer whose decoder
reads ``num_queries`` learnable queries, a linear map out to the generator's conditioning width)
and ``mlp`` (a two-layer MLP over the flattened signal states, reshaped to the conditioning).

A head whose spec has a ``generated`` entry also fills ``Conditioning.generated_embeds``, for
generators that take two conditionings (AudioLDM 2): ``generated`` is a head spec of its own, of
either type, reading the same signal states (its ``in_dim`` is the outer head's).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from omnistage.actors.heads import HeadStage
from omnistage.actors.payloads import Conditioning

HEAD_TYPES = ("transformer", "mlp")


class TransformerHead(nn.Module):
    def __init__(self, spec: dict[str, Any]):
        super().__init__()
        d = spec["d_model"]
        self.proj_in = nn.Linear(spec["in_dim"], d)
        self.queries = nn.Parameter(torch.randn(1, spec["num_queries"], d) * 0.02)
        # Dropout 0 and pre-norm, as in NExT-GPT's output projector; batch_first for (B, K, d) inputs.
        with warnings.catch_warnings():
            # PyTorch notes that pre-norm layers cannot use its nested-tensor fast path; expected.
            warnings.filterwarnings("ignore", message="enable_nested_tensor is True")
            self.transformer = nn.Transformer(
                d_model=d,
                nhead=spec["num_heads"],
                num_encoder_layers=spec["num_encoder_layers"],
                num_decoder_layers=spec["num_decoder_layers"],
                dim_feedforward=spec["ffn_dim"],
                dropout=0.0,
                batch_first=True,
                norm_first=True,
            )
        self.proj_out = nn.Linear(d, spec["out_dim"])

    def forward(self, signals: torch.Tensor) -> torch.Tensor:
        queries = self.queries.expand(signals.shape[0], -1, -1)
        return self.proj_out(self.transformer(self.proj_in(signals), queries))


class MLPHead(nn.Module):
    def __init__(self, spec: dict[str, Any]):
        super().__init__()
        self.shape = (spec["num_queries"], spec["out_dim"])
        self.mlp = nn.Sequential(
            nn.Flatten(1),
            nn.Linear(spec["num_signal_tokens"] * spec["in_dim"], spec["hidden_dim"]),
            nn.GELU(),
            nn.Linear(spec["hidden_dim"], spec["num_queries"] * spec["out_dim"]),
        )

    def forward(self, signals: torch.Tensor) -> torch.Tensor:
        return self.mlp(signals).view(signals.shape[0], *self.shape)


class TwoConditioningHead(nn.Module):
    """Two heads over the same signal states: ``embeds`` and ``generated_embeds`` of ``Conditioning``."""

    def __init__(self, spec: dict[str, Any]):
        super().__init__()
        generated = spec["generated"]
        if generated.get("in_dim", spec["in_dim"]) != spec["in_dim"]:
            raise ValueError(
                f"expected the generated head to read the signal states' width {spec['in_dim']}, "
                f"got in_dim {generated['in_dim']}"
            )
        self.embeds = _single_head({k: v for k, v in spec.items() if k != "generated"})
        self.generated_embeds = _single_head({**generated, "in_dim": spec["in_dim"]})

    def forward(self, signals: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"embeds": self.embeds(signals), "generated_embeds": self.generated_embeds(signals)}


def _single_head(spec: dict[str, Any]) -> nn.Module:
    if spec["type"] == "transformer":
        return TransformerHead(spec)
    if spec["type"] == "mlp":
        return MLPHead(spec)
    raise ValueError(f"expected an output projector type in {HEAD_TYPES}, got {spec['type']!r}")


def make_head(spec: dict[str, Any]) -> nn.Module:
    return TwoConditioningHead(spec) if "generated" in spec else _single_head(spec)


class OutputProjector(HeadStage):
    """Signal groups to generator conditioning.

    Input: ``SignalGroup`` (n_signal_tokens, d_llm). Output: ``Conditioning`` (num_queries, out_dim),
    with ``generated_embeds`` (generated num_queries, generated out_dim) where the head has ``generated``.
    """

    component = "output_projector"
    make_head = staticmethod(make_head)
    in_field = "hidden"
    output_type = Conditioning
    out_field = "embeds"

    def conditioning_shape(self, modality: str) -> tuple[int, int]:
        head = self.head_spec(modality)
        return head["num_queries"], head["out_dim"]

    def generated_shape(self, modality: str) -> tuple[int, int] | None:
        """Shape of ``Conditioning.generated_embeds`` for ``modality``; None if the head makes none."""
        generated = self.head_spec(modality).get("generated")
        return None if generated is None else (generated["num_queries"], generated["out_dim"])
