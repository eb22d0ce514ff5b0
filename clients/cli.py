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


def _batch_caption(args: argparse.Namespace) -> None:
    from omnistage.pipelines.batch import run_caption

    summary = run_caption(
        args.input,
        args.output,
        config=args.config,
        modality=args.modality,
        id_column=args.id_column,
        media_column=args.media_column,
        prompt_column=args.prompt_column,
        prompt=args.prompt,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )
    print(summary)


def _batch_generate(args: argparse.Namespace) -> None:
    from omnistage.pipelines.batch import run_generate

    summary = run_generate(
        args.input,
        args.output,
        config=args.config,
        modality=args.modality,
        id_column=args.id_column,
        prompt_column=args.prompt_column,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )
    print(summary)


def _batch_sample(args: argparse.Namespace) -> None:
    from omnistage.pipelines.batch_io import make_sample_dataset

    path, corrupt = make_sample_dataset(
        args.output, args.rows, args.modality, corrupt=args.corrupt, paths=args.paths, seed=args.seed, file_format=args.format
    )
    column = "prompt" if args.modality == "text" else args.modality
    print(f"wrote {args.rows} rows (columns id, {column}) to {path}" + (f"; corrupt ids: {', '.join(corrupt)}" if corrupt else ""))


def _samples(args: argparse.Namespace) -> None:
    from omnistage.pipelines.demo import write_samples

    for path in write_samples(Path(args.dir)):
        print(path)


def _serve(args: argparse.Namespace) -> None:
    from omnistage.cluster.config import load_config
    from omnistage.pipelines.serve import run_server

    run_server(load_config(args.config), host=args.host, port=args.port, address=args.address)


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

    serve = commands.add_parser("serve", help="serve the OpenAI-compatible HTTP API on Ray Serve until Ctrl-C")
    serve.add_argument("--config", default="tiny", help="preset name or YAML path (default: tiny)")
    serve.add_argument("--host", help="bind address (default: the config's, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: the config's, 8000)")
    serve.add_argument("--address", help="join this Ray cluster (e.g. auto) instead of starting a local one")
    serve.set_defaults(func=_serve)

    samples = commands.add_parser("samples", help="write a sample image, video and audio file to try requests with")
    samples.add_argument("dir", nargs="?", default=".", help="output directory (default: .)")
    samples.set_defaults(func=_samples)

    demo = commands.add_parser("demo", help="run sample requests through every stage in this process")
    demo.add_argument("--config", default="tiny", help="preset name or YAML path (default: tiny)")
    demo.add_argument("--out", default="out", help="directory for generated media (default: ./out)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)

    batch = commands.add_parser("batch", help="offline jobs over Parquet / Arrow datasets on Ray Data")
    batch_commands = batch.add_subparsers(dest="batch_command", required=True)
    for name, func, help_text in (
        ("caption", _batch_caption, "answer a prompt about each row's image, video or audio"),
        ("generate", _batch_generate, "generate an image, video or audio clip for each row's prompt"),
    ):
        job = batch_commands.add_parser(name, help=help_text)
        job.add_argument("--input", required=True, help="Parquet or Arrow IPC file, folder or URI (s3://...)")
        job.add_argument("--output", required=True, help="Parquet output folder or URI; ids already there are skipped")
        job.add_argument("--config", default="tiny", help="preset name or YAML path (default: tiny)")
        job.add_argument("--modality", choices=("image", "video", "audio"), default="image", help="default: image")
        job.add_argument("--id-column", default="id", help="unique row id, the resume key (default: id)")
        job.add_argument("--max-tokens", type=int, default=32, help="text tokens per answer (default: 32)")
        job.add_argument("--seed", type=int, default=0, help="combined with each row's id into the row's seed")
        job.set_defaults(func=func)
        if name == "caption":
            job.add_argument("--media-column", help="bytes, paths or {bytes, path} structs (default: the modality)")
            job.add_argument("--prompt-column", help="per-row prompts (default: use --prompt)")
            job.add_argument("--prompt", help="prompt for every row (default: 'Describe this <modality>.')")
        else:
            job.add_argument("--prompt-column", default="prompt", help="default: prompt")
    sample = batch_commands.add_parser("sample", help="write a seeded sample dataset for the batch jobs")
    sample.add_argument("--output", required=True, help="folder to write sample.parquet (or sample.arrow) into")
    sample.add_argument("--rows", type=int, default=200)
    sample.add_argument("--modality", choices=("image", "video", "audio", "text"), default="image",
                        help="media to caption, or text: prompts for `batch generate` (default: image)")
    sample.add_argument("--corrupt", type=int, default=0, help="rows with bad media or a null prompt (default: 0)")
    sample.add_argument("--paths", action="store_true", help="store media as files under OUTPUT/media, by path")
    sample.add_argument("--format", choices=("parquet", "arrow"), default="parquet")
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(func=_batch_sample)
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
