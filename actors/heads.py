"""Shared machinery of the two projector stages: one small head per modality, kept in one
checkpoint directory (``config.json`` plus ``model.safetensors``; safetensors holds tensors only,
so loading runs no code)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from omnistage.actors.base import Stage
from omnistage.actors.errors import InvalidInputError, UnsupportedMediaError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save_heads(heads: nn.ModuleDict, config: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    # contiguous() because safetensors refuses views; clone() breaks storage shared between tensors.
    state = {k: v.detach().contiguous().clone() for k, v in heads.state_dict().items()}
    save_file(state, str(path / WEIGHTS_NAME))


class HeadStage(Stage):
    """A stage holding one head per modality. Subclasses set ``make_head`` and the payload fields.

    Items are grouped by modality and length, and each group goes through its head in one pass.
    """

    make_head: ClassVar[Any]  # staticmethod(spec) -> nn.Module giving a tensor or {field: tensor}
    in_field: ClassVar[str]  # the input payload's array attribute
    output_type: ClassVar[type]  # the output payload class
    out_field: ClassVar[str]  # the output payload's array attribute

    @classmethod
    def build_heads(cls, config: dict[str, Any]) -> nn.ModuleDict:
        return nn.ModuleDict({modality: cls.make_head(spec) for modality, spec in config["heads"].items()})

    def __init__(self, config):
        super().__init__(config)
        self.spec, heads = self.load_heads()
        self.heads = heads.to(self.device, self.dtype).eval()

    def load_heads(self) -> tuple[dict[str, Any], nn.Module]:
        """(spec, heads) from the checkpoint directory; subclasses may read other layouts."""
        config_file = self.checkpoint / CONFIG_NAME
        if not config_file.is_file():
            raise FileNotFoundError(f"expected {CONFIG_NAME} in checkpoint directory {str(self.checkpoint)!r}")
        spec = json.loads(config_file.read_text())
        if "heads" not in spec:
            raise ValueError(
                f"{str(config_file)!r} has no 'heads' entry: it is not a {type(self).__name__} checkpoint "
                f"(model_type {spec.get('model_type')!r})"
            )
        heads = self.build_heads(spec)
        # strict: a missing or extra tensor means config.json does not describe these weights.
        heads.load_state_dict(load_file(str(self.checkpoint / WEIGHTS_NAME)), strict=True)
        return spec, heads

    @property
    def modalities(self) -> list[str]:
        return list(self.spec["heads"])

    def head_spec(self, modality: str) -> dict[str, Any]:
        return self.spec["heads"][modality]

    def check(self, item: Any) -> None:
        if item.modality not in self.heads:
            raise UnsupportedMediaError(
                f"{type(self).__name__} expected a modality in {self.modalities}, got {item.modality!r}"
            )
        array = getattr(item, self.in_field)
        in_dim = self.head_spec(item.modality)["in_dim"]
        if not isinstance(array, np.ndarray) or array.ndim != 2 or array.shape[0] == 0 or array.shape[1] != in_dim:
            got = getattr(array, "shape", type(array).__name__)
            raise InvalidInputError(
                f"{type(self).__name__} expected {item.modality} {self.in_field} of shape (n_tokens, {in_dim}), got {got}"
            )

    @torch.inference_mode()
    def __call__(self, items: list) -> list:
        for item in items:
            self.check(item)
        arrays = [getattr(item, self.in_field) for item in items]
        results: list = [None] * len(items)
        groups: dict[tuple[str, int], list[int]] = {}
        for i, (item, array) in enumerate(zip(items, arrays)):
            groups.setdefault((item.modality, array.shape[0]), []).append(i)
        for (modality, _), indices in groups.items():
            batch = torch.from_numpy(np.stack([arrays[i] for i in indices])).to(self.device, self.dtype)
            head = self.heads[modality]
            if getattr(head, "reads_instruction", False):
                out = head(batch, [items[i].instruction for i in indices])
            elif getattr(head, "reads_image_size", False):
                out = head(batch, [items[i].image_size for i in indices])
            else:
                out = head(batch)
            if isinstance(out, list):
                # One tensor per item where lengths differ item to item (LLaVA-NeXT's packing).
                for tensor, i in zip(out, indices):
                    results[i] = self.output_type(modality=modality, **{self.out_field: tensor.float().cpu().numpy()})
                continue
            # A head gives one tensor (for out_field) or, when it fills several payload fields,
            # a dict of field name to tensor.
            fields = out if isinstance(out, dict) else {self.out_field: out}
            outputs = {name: tensor.float().cpu().numpy() for name, tensor in fields.items()}
            for row, i in enumerate(indices):
                results[i] = self.output_type(modality=modality, **{name: array[row] for name, array in outputs.items()})
        return results
