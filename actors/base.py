"""What every stage shares: device and dtype resolution, and finding its checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import structlog

from omnistage.actors.builtin import resolve_checkpoint

if TYPE_CHECKING:
    import torch

    from omnistage.cluster.config import StageConfig

log = structlog.get_logger(__name__)


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when this process can see a GPU, else CPU."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was configured but this process sees no CUDA device")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is float16 on CUDA and float32 on CPU, where half precision is slow or missing."""
    import torch

    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


class Stage:
    """A batched model stage.

    Subclasses load their model in ``__init__`` and implement ``__call__(items) -> outputs``, one
    output per input, in order, and ``check(item)`` or ``prepare(item)``, which raise
    ``InvalidInputError`` for an item the stage cannot take. Servers prepare each item before
    batching it, so one bad request never fails the others in its batch. ``component`` names the
    part of a built-in preset they load.
    """

    component: ClassVar[str]

    def __init__(self, config: StageConfig):
        from transformers.utils import logging as transformers_logging

        # Per-shard loading bars would flood a server's logs; load events are logged below instead.
        transformers_logging.disable_progress_bar()
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.checkpoint: Path = resolve_checkpoint(config.model, self.component)
        log.info("stage_loading", stage=type(self).__name__, checkpoint=str(self.checkpoint), device=str(self.device))

    def check(self, item: Any) -> None:
        raise NotImplementedError

    def prepare(self, item: Any) -> Any:
        """``item`` checked, in the form the stage's call takes: encoders decode media files here
        (so their pool, not the HTTP ingress, pays for it). Raises ``InvalidInputError``."""
        self.check(item)
        return item
