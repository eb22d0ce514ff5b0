"""Peak memory of loading each pool's part of an end-to-end checkpoint (LLaVA, BLIP-2,
InstructBLIP), against loading the whole model once.

A random model of 180M to 235M parameters (float32 files in 5 shards, ``--dir``; built once) is loaded
in ``--dtype`` on the CPU, each way in a fresh process, which reports how far its peak resident
memory (ru_maxrss) rose above where it stood after its imports.

    .venv/bin/python benchmarks/part_memory.py llava --dir /tmp/mem-llava
    .venv/bin/python benchmarks/part_memory.py blip-2 --dir /tmp/mem-blip2
    .venv/bin/python benchmarks/part_memory.py instructblip --dir /tmp/mem-instructblip
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

# Vision tower, language model and Q-Former sizes: about 19M, 150M (OPT) to 200M (LLaMA), 9M to 13M.
VISION = {"hidden_size": 512, "num_hidden_layers": 6, "num_attention_heads": 8, "intermediate_size": 2048}
TEXT = {"hidden_size": 1024, "num_hidden_layers": 12, "num_attention_heads": 16}
QFORMER = {"hidden_size": 512, "num_hidden_layers": 2, "num_attention_heads": 8, "intermediate_size": 2048}

WAYS = {
    "whole": "from transformers import AutoModelForImageTextToText",
    "image_encoder": "from omnistage.actors.image_encoder import ImageEncoder\nfrom omnistage.cluster.config import ImageEncoderConfig",
    "input_projector": "from omnistage.actors.input_projector import InputProjector\nfrom omnistage.cluster.config import InputProjectorConfig",
    "llm": "from omnistage.actors.llm import LLM\nfrom omnistage.cluster.config import LLMConfig",
}
LOADS = {
    "whole": "AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype))",
    "image_encoder": "ImageEncoder(ImageEncoderConfig(model=path, dtype=dtype, device='cpu'))",
    "input_projector": "InputProjector(InputProjectorConfig(model=path, dtype=dtype, device='cpu'))",
    "llm": "LLM(LLMConfig(model=path, dtype=dtype, device='cpu', signal_tokens={}))",
}


def build(model_type: str, path: Path) -> int:
    """The tiny builder's tokenizer and processor files, with a model of the sizes above in place
    of its weights; returns the parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from omnistage.actors import tiny

    builders = {"llava": tiny.build_llava, "blip-2": tiny.build_blip2, "instructblip": tiny.build_instructblip}
    builders[model_type](path, seed=0)
    config = AutoConfig.from_pretrained(path)
    config.vision_config.update({**VISION, "image_size": 224, "patch_size": 14})
    ffn = 4 * TEXT["hidden_size"]
    if config.text_config.model_type == "llama":  # LLaVA's, InstructBLIP's Vicuna
        head_dim = TEXT["hidden_size"] // TEXT["num_attention_heads"]
        config.text_config.update({**TEXT, "intermediate_size": ffn, "num_key_value_heads": TEXT["num_attention_heads"], "head_dim": head_dim})
    else:  # BLIP-2's OPT
        config.text_config.update({**TEXT, "ffn_dim": ffn, "word_embed_proj_dim": TEXT["hidden_size"]})
    if model_type != "llava":
        config.qformer_config.update({**QFORMER, "encoder_hidden_size": VISION["hidden_size"]})
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config)
    n = sum(p.numel() for p in model.parameters())
    for weights in path.glob("*.safetensors"):
        weights.unlink()  # the tiny model's
    # Four float32 shards of n bytes each.
    model.save_pretrained(path, max_shard_size=f"{n // 2**20 + 1}MB")
    (path / "preprocessor_config.json").write_text(
        (path / "preprocessor_config.json").read_text().replace('"height": 30', '"height": 224').replace('"width": 30', '"width": 224')
        .replace('"shortest_edge": 30', '"shortest_edge": 224')
    )
    return sum(p.numel() for p in model.parameters())


def measure(way: str, path: Path, dtype: str) -> float:
    """MiB by which loading ``way`` raised a fresh process's peak memory above its imports'."""
    script = (
        "import resource, torch\n"
        f"{WAYS[way]}\n"
        f"path, dtype = {str(path)!r}, {dtype!r}\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"loaded = {LOADS[way]}\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"loading {way} failed:\n{done.stderr[-3000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_type", choices=["llava", "blip-2", "instructblip"])
    parser.add_argument("--dir", required=True, type=Path, help="the checkpoint; built here when it has no config.json")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--build-only", action="store_true", help="build the checkpoint, print its parameter count")
    args = parser.parse_args()
    if args.build_only:
        print(build(args.model_type, args.dir))
        return
    report = {"model_type": args.model_type, "dtype": args.dtype}
    if not (args.dir / "config.json").is_file():
        # In a process of its own: Linux keeps a process's peak memory across fork and exec, so
        # building here would raise every measuring child's starting peak to the builder's.
        command = [sys.executable, __file__, args.model_type, "--dir", str(args.dir), "--build-only"]
        built = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        report["parameters_m"] = round(int(built.strip().splitlines()[-1]) / 1e6, 1)
    report["shards"] = len(list(args.dir.glob("*.safetensors")))
    for way in WAYS:
        report[f"{way}_mib"] = round(measure(way, args.dir, args.dtype))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
