"""Built-in model presets, built offline from small configs.

A preset is a directory with one checkpoint per component, each in the ordinary transformers or
diffusers layout, so stages load it with ``from_pretrained`` exactly as they load downloaded
checkpoints. ``tiny`` has random, seeded weights (``omnistage.actors.tiny``), built on first use:
building it twice gives identical files. ``shapes`` is trained (``omnistage.pipelines.train``) and
ships with the package.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

# Bump when a builder changes, so caches built by an older version are not reused.
BUILD_VERSION = 1

BUILTIN_PRESETS: dict[str, str] = {
    "tiny": "random weights from tiny configs (CPU, seconds to build); its answers and media are noise",
    "shapes": "trained on the shapes world (captions and makes pictures of coloured shapes, clips of them moving, and beeps); ships with the package",
}
# Presets whose weights ship inside the package (trained, not built), in omnistage.cluster/presets/.
SHIPPED_PRESETS = ("shapes",)


def build_preset(name: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write every component of the built-in preset ``name`` under ``out_dir`` (a shipped preset
    is copied; ``seed`` applies to built ones)."""
    if name not in BUILTIN_PRESETS:
        raise ValueError(f"expected a built-in preset ({', '.join(BUILTIN_PRESETS)}), got {name!r}")
    out = Path(out_dir)
    if name in SHIPPED_PRESETS:
        shutil.copytree(ensure_preset(name), out, dirs_exist_ok=True)
        return out
    # The builders import torch, transformers and diffusers: only when a preset is built.
    from omnistage.actors.tiny import TINY_BUILDERS

    out.mkdir(parents=True, exist_ok=True)
    for index, (component, builder) in enumerate(TINY_BUILDERS.items()):
        builder(out / component, seed + index)
        log.info("preset_component_built", preset=name, component=component)
    return out


def cache_root() -> Path:
    """Where built-in presets are built on first use: ``$OMNISTAGE_HOME`` or ``~/.cache/omnistage``."""
    return Path(os.environ.get("OMNISTAGE_HOME", Path.home() / ".cache" / "omnistage"))


def ensure_preset(name: str) -> Path:
    """The directory of built-in preset ``name``, building it first if this machine lacks it.

    Several processes may race to build it (one per Ray actor); each builds into its own temporary
    directory and the first rename wins, so readers never see a half-written preset. A shipped
    preset is never built: its directory in the package is returned.
    """
    if name in SHIPPED_PRESETS:
        shipped = Path(str(resources.files("omnistage.cluster") / "presets" / name))
        if not (shipped / "llm").is_dir():
            raise FileNotFoundError(
                f"expected the {name!r} preset's weights in {str(shipped)!r}, found none; "
                f"train them with `omnistage train {name} DIR` and point each stage's `model:` at DIR/<stage>"
            )
        return shipped
    target = cache_root() / "presets" / f"{name}-v{BUILD_VERSION}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build_preset(name, tmp)
        os.rename(tmp, target)
        log.info("preset_built", preset=name, path=str(target))
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_presets(models: Iterable[str]) -> None:
    """Build (or find) each built-in preset among ``models`` once, in this process, so that the
    replicas or actors that load it later do not all build it at the same time."""
    for name in sorted(set(models) & set(BUILTIN_PRESETS)):
        ensure_preset(name)


def resolve_checkpoint(model: str, component: str) -> Path:
    """The checkpoint directory for ``component``: from a built-in preset, or ``model`` itself."""
    if model in BUILTIN_PRESETS:
        return ensure_preset(model) / component
    path = Path(model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"model {model!r} for {component} is neither a built-in preset "
            f"({', '.join(BUILTIN_PRESETS)}) nor an existing checkpoint directory"
        )
    return path
