"""The ``omnistage`` command line.

Commands import their heavy dependencies only when they run, so ``omnistage --help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omnistage.clients.errors import ConnectionError as ClientConnectionError
from omnistage.clients.errors import OmnistageError


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
    if args.config == "tiny":
        print("The tiny preset has random weights: its text and media are noise, the path through every stage is real.")


def _train_shapes(args: argparse.Namespace) -> None:
    import time

    from omnistage.pipelines.train import TrainSettings, train_shapes

    start = time.monotonic()
    out = train_shapes(args.dir, TrainSettings(seed=args.seed, scale=args.scale), workers=args.workers)
    print(f"wrote the shapes preset to {out} in {time.monotonic() - start:.0f} s")
    print(f"to serve it, copy cluster/presets/shapes.yaml and set each stage's `model:` to {out}/<stage> (the video encoder's to {out}/image_encoder)")


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

    if args.export_config:
        # For `serve deploy` / KubeRay: write the Serve config and start nothing.
        from omnistage.pipelines.serve_config import write_serve_config

        path = write_serve_config(args.config, args.export_config, host=args.host, port=args.port)
        if args.export_config != "-":
            print(f"wrote the Serve config for {args.config!r} to {path}; deploy it with: serve deploy {path}")
        return
    run_server(load_config(args.config), host=args.host, port=args.port, address=args.address)


# Client commands: they call a running server through the SDK and need only the client install.


def _add_server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="the server (default: $OMNISTAGE_URL, else http://127.0.0.1:8000)")
    parser.add_argument("--api-key", help="sent as a bearer token (default: $OMNISTAGE_API_KEY)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per call, retries included (default: 300)")
    parser.add_argument("--json", action="store_true", help="send JSON with base64 media instead of msgpack")


def _client(args: argparse.Namespace):
    from omnistage.clients.sdk import Client

    return Client(args.url, api_key=args.api_key, timeout=args.timeout, transport="json" if args.json else "msgpack")


def _models_server(args: argparse.Namespace) -> None:
    with _client(args) as client:
        for model in client.models():
            print(f"{model.id}\tinput: {','.join(model.input_modalities)}\toutput: {','.join(model.output_modalities)}")


def _chat(args: argparse.Namespace) -> None:
    options = dict(
        prompt=args.question, images=args.image, audio=args.audio, videos=args.video, model=args.model,
        max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
    )
    with _client(args) as client:
        if args.stream:
            with client.chat_stream(**options) as stream:
                for delta in stream:
                    print(delta, end="", flush=True)
            print()
        else:
            print(client.chat(**options).text)


def _generate(args: argparse.Namespace) -> None:
    with _client(args) as client:
        if args.modality == "image":
            result = client.generate_image(args.prompt, size=args.size, seed=args.seed)
        elif args.modality == "video":
            result = client.generate_video(args.prompt, size=args.size, num_frames=args.num_frames, seed=args.seed)
        else:
            result = client.generate_audio(args.prompt, duration_s=args.duration, seed=args.seed)
    result.save(args.output)
    print(f"wrote {args.output}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnistage", description="Serve five-stage multimodal LLMs.")
    commands = parser.add_subparsers(dest="command", required=True)

    models = commands.add_parser(
        "models", help="list a server's models; `models list` / `models build` for the built-in ones",
        description="With no subcommand, list the models the server at --url serves.",
    )
    _add_server_options(models)
    models.set_defaults(func=_models_server)
    models_commands = models.add_subparsers(dest="models_command")
    models_commands.add_parser("list", help="list built-in models and config presets").set_defaults(func=_models_list)
    build = models_commands.add_parser("build", help="write a built-in preset's checkpoints to a directory")
    build.add_argument("name", help="built-in preset, e.g. tiny")
    build.add_argument("dir", help="output directory")
    build.add_argument("--seed", type=int, default=0)
    build.set_defaults(func=_models_build)

    chat = commands.add_parser("chat", help="ask a running server a question, with images, audio or video")
    chat.add_argument("question")
    chat.add_argument("--image", action="append", help="image file (repeatable)")
    chat.add_argument("--audio", action="append", help="audio file: WAV, FLAC, OGG or MP3 (repeatable)")
    chat.add_argument("--video", action="append", help="video file: MP4, WebM or GIF (repeatable)")
    chat.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    chat.add_argument("--model", help="model id (default: the server's)")
    chat.add_argument("--max-tokens", type=int)
    chat.add_argument("--temperature", type=float)
    chat.add_argument("--seed", type=int)
    _add_server_options(chat)
    chat.set_defaults(func=_chat)

    generate = commands.add_parser("generate", help="generate an image, video or audio clip on a running server")
    generate.add_argument("modality", choices=("image", "video", "audio"))
    generate.add_argument("prompt")
    generate.add_argument("-o", "--output", required=True, help="file to write (.png/.jpg, .mp4/.gif, .wav/.flac)")
    generate.add_argument("--seed", type=int)
    generate.add_argument("--size", help="WIDTHxHEIGHT (image, video)")
    generate.add_argument("--num-frames", type=int, help="video frames")
    generate.add_argument("--duration", type=float, help="audio seconds")
    _add_server_options(generate)
    generate.set_defaults(func=_generate)

    serve = commands.add_parser("serve", help="serve the OpenAI-compatible HTTP API on Ray Serve until Ctrl-C")
    serve.add_argument("--config", default="shapes", help="preset name or YAML path (default: shapes)")
    serve.add_argument("--host", help="bind address (default: the config's, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: the config's, 8000)")
    serve.add_argument("--address", help="join this Ray cluster (e.g. auto) instead of starting a local one")
    serve.add_argument(
        "--export-config", metavar="FILE",
        help="write the Serve config (`serve deploy` format) for --config to FILE (- for stdout) and exit",
    )
    serve.set_defaults(func=_serve)

    train = commands.add_parser("train", help="train a preset on Ray Train")
    train_commands = train.add_subparsers(dest="train_command", required=True)
    shapes = train_commands.add_parser(
        "shapes", help="train the shapes preset (minutes on a laptop CPU)",
        description="Pretrain the image and audio encoders, the LLM and the image, video and audio generators "
        "on the shapes world, then the projectors, and write the preset to DIR (replaced if it exists).",
    )
    shapes.add_argument("dir", help="output directory")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--workers", type=int, default=2, help="data-parallel Ray Train workers, one CPU each (default: 2)")
    shapes.add_argument("--scale", type=float, default=1.0, help="multiply every phase's steps (default: 1)")
    shapes.set_defaults(func=_train_shapes)

    samples = commands.add_parser("samples", help="write a sample image, video and audio file to try requests with")
    samples.add_argument("dir", nargs="?", default=".", help="output directory (default: .)")
    samples.set_defaults(func=_samples)

    demo = commands.add_parser("demo", help="run sample requests through every stage in this process")
    demo.add_argument("--config", default="shapes", help="preset name or YAML path (default: shapes)")
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
        job.add_argument("--config", default="shapes", help="preset name or YAML path (default: shapes)")
        job.add_argument("--modality", choices=("image", "video", "audio"), default="image", help="default: image")
        job.add_argument("--id-column", default="id", help="unique row id, the resume key (default: id)")
        job.add_argument("--max-tokens", type=int, help="text tokens per answer (default: the model's, llm.defaults)")
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
    except OmnistageError as exc:
        # The server refused the request, or could not be reached.
        hint = " (is the server running? set --url or OMNISTAGE_URL)" if isinstance(exc, ClientConnectionError) else ""
        print(f"omnistage: error: {exc}{hint}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        # A server-side command in a client-only install.
        print(
            f"omnistage: error: `omnistage {args.command}` needs the server install "
            f"(pip install 'omnistage[server]'); missing module {exc.name!r}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
