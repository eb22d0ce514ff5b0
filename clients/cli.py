"""The ``omnistage`` command line.

Commands import their heavy dependencies only when they run, so ``omnistage --help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _models_list(args: argparse.Namespace) -> None:
    from omnistage.actors.builtin import BUILTIN_PRESETS
    from omnistage.cluster.config import preset_names

    print("Built-in models (use as `model:` in a stage config):")
    for name, description in BUILTIN_PRESETS.items():
        print(f"  {name}: {description}")
    print("Config presets (use with --config):")
    for name in preset_names():
        print(f"  {name}")


def _models_build(args: argparse.Namespace) -> None:
    from omnistage.actors.builtin import build_preset

    out = build_preset(args.name, args.dir, seed=args.seed)
    print(f"wrote preset {args.name!r} to {out}")


def _demo(args: argparse.Namespace) -> None:
    from omnistage.pipelines.demo import run_demo

    run_demo(args.config, Path(args.out), seed=args.seed)
    print("The tiny preset has random weights: its text and media are noise, the path through every stage is real.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnistage", description="Serve five-stage multimodal LLMs.")
    commands = parser.add_subparsers(dest="command", required=True)

    models = commands.add_parser("models", help="list or build built-in models")
    models_commands = models.add_subparsers(dest="models_command", required=True)
    models_commands.add_parser("list", help="list built-in models and config presets").set_defaults(func=_models_list)
    build = models_commands.add_parser("build", help="write a built-in preset's checkpoints to a directory")
    build.add_argument("name", help="built-in preset, e.g. tiny")
    build.add_argument("dir", help="output directory")
    build.add_argument("--seed", type=int, default=0)
    build.set_defaults(func=_models_build)

    demo = commands.add_parser("demo", help="run sample requests through every stage in this process")
    demo.add_argument("--config", default="tiny", help="preset name or YAML path (default: tiny)")
    demo.add_argument("--out", default="out", help="directory for generated media (default: ./out)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        # Bad input or config: one line naming the problem, no traceback.
        print(f"omnistage: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
