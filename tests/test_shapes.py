"""The shapes world, the training that makes the ``shapes`` preset, and the shipped preset itself."""

from __future__ import annotations

import base64
import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omnistage.pipelines import shapes
from omnistage.pipelines.shapes import COLOURS, SHAPES, ShapeSpec


def _image_part(image: np.ndarray) -> dict:
    return {"type": "image_url", "image_url": image}


# --- the world -------------------------------------------------------------------------------------


def test_captions_name_every_attribute():
    assert shapes.caption(ShapeSpec("red", "circle", "left", "big")) == "a big red circle on the left"
    assert shapes.caption(ShapeSpec("blue", "cross", "middle", "small")) == "a small blue cross in the middle"
    assert shapes.parse_caption("Here is a big orange triangle on the right.") == ("orange", "triangle")
    assert shapes.parse_caption("a red thing") is None


def test_instructions_ask_for_the_canonical_picture():
    rng = random.Random(0)
    seen_defaults = 0
    for _ in range(300):
        text, spec = shapes.instruction(rng)
        words = text.lower().rstrip(".").split()
        assert shapes.parse_caption(text) == (spec.colour, spec.shape)
        assert spec.size == next((w for w in words if w in shapes.SIZES), shapes.DEFAULT_SIZE)
        assert spec.position == next((w for w in words if w in shapes.POSITIONS), shapes.DEFAULT_POSITION)
        # "an" before a vowel: "an orange square", "a big orange square"
        article = words[words.index(next(w for w in words if w in (*shapes.SIZES, *COLOURS))) - 1]
        assert article == ("an" if words[words.index(article) + 1][0] in "aeiou" else "a")
        seen_defaults += spec.size == "big" and "big" not in words
    assert seen_defaults > 50


def test_renders_show_colour_shape_place_and_size():
    rng = random.Random(1)
    areas = {}
    for colour in COLOURS:
        for shape in SHAPES:
            for position, centre in (("left", 16), ("middle", 32), ("right", 48)):
                for size in shapes.SIZES:
                    image = shapes.render(ShapeSpec(colour, shape, position, size), 64, rng)
                    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
                    assert shapes.dominant_colour(image) == colour
                    saturated = np.argwhere(shapes.saturated(image))
                    assert abs(saturated[:, 1].mean() - centre) < 5
                    areas.setdefault(size, []).append(len(saturated))
    assert max(areas["small"]) < min(areas["big"])
    assert shapes.dominant_colour(np.full((8, 8, 3), 220, np.uint8)) is None


def test_renders_are_seeded():
    spec = ShapeSpec("green", "triangle", "right", "big")
    a, b = (shapes.render(spec, 64, random.Random(7)) for _ in range(2))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, shapes.render(spec, 64, random.Random(8)))


def test_word_tokenizer_round_trips_and_marks_unknown_words():
    tokenizer = shapes.build_word_tokenizer(["<image>"], model_max_length=16)
    ids = tokenizer("<image>A big RED circle, on the left?", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a big red circle , on the left ?"
    assert tokenizer.convert_tokens_to_ids("<image>") == ids[0]
    assert tokenizer("zebra", add_special_tokens=False)["input_ids"] == [tokenizer.unk_token_id]


# --- training ----------------------------------------------------------------------------------------


def _weights(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*.safetensors"))}


def test_training_is_seeded(tmp_path):
    from omnistage.pipelines.train import TrainSettings, Worker, train_all

    settings = TrainSettings(seed=3, scale=0.004, pool=32)
    first = train_all(Worker(), settings, tmp_path / "a")
    second = train_all(Worker(), settings, tmp_path / "b")
    assert first == second
    weights = _weights(tmp_path / "a")
    assert len(weights) >= 7  # encoder, LLM, 2 projectors, UNet, VAE, text encoder
    assert weights == _weights(tmp_path / "b")
    other = train_all(Worker(), TrainSettings(seed=4, scale=0.004, pool=32), tmp_path / "c")
    assert other != first


@pytest.mark.slow
def test_train_shapes_runs_data_parallel_on_ray_train(ray_session, tmp_path):
    from omnistage.pipelines.local import LocalPipeline
    from omnistage.pipelines.train import COMPONENTS, TrainSettings, preset_config, train_shapes

    out = train_shapes(tmp_path / "shapes", TrainSettings(scale=0.004, pool=32), workers=2, cpus_per_worker=0.25)
    assert sorted(p.name for p in out.iterdir()) == sorted([*COMPONENTS, "training.json"])
    record = json.loads((out / "training.json").read_text())
    assert record["workers"] == 2 and set(record["losses"]) == {"image_encoder", "llm", "vae", "generator", "input_projector", "output_projector"}
    pipeline = LocalPipeline(preset_config(out))
    result = pipeline.chat([{"role": "user", "content": "Draw a red circle"}], max_tokens=4, seed=0, modalities=["image"])
    assert result.media[0].array.shape == (64, 64, 3)


def test_cli_train_shapes_takes_its_options():
    from omnistage.clients.cli import build_parser

    args = build_parser().parse_args(["train", "shapes", "out", "--workers", "4", "--seed", "2"])
    assert (args.func.__name__, args.dir, args.workers, args.seed, args.scale) == ("_train_shapes", "out", 4, 2, 1.0)
    assert build_parser().parse_args(["train", "shapes", "out"]).workers == 2


# --- the shipped preset -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained():
    from omnistage.pipelines.local import LocalPipeline

    return LocalPipeline.from_config("shapes")


def test_shipped_preset_is_small():
    from omnistage.actors.builtin import ensure_preset

    size = sum(p.stat().st_size for p in ensure_preset("shapes").rglob("*") if p.is_file())
    assert size <= 20 * 2**20, f"{size / 2**20:.1f} MiB"


def test_shipped_preset_captions_held_out_pictures(trained):
    rng = random.Random("test captions")
    right = 0
    for _ in range(20):
        spec = shapes.random_spec(rng)
        question = {"type": "text", "text": "What is in this image?"}
        answer = trained.chat([{"role": "user", "content": [_image_part(shapes.render(spec, 64, rng)), question]}]).text
        right += shapes.parse_caption(answer) == (spec.colour, spec.shape)
    assert right >= 17


def test_shipped_preset_draws_what_it_is_asked(trained):
    rng = random.Random("test drawings")
    right = 0
    for seed in range(8):
        prompt, spec = shapes.instruction(rng)
        result = trained.chat([{"role": "user", "content": prompt}], seed=seed, modalities=["image"])
        assert shapes.parse_caption(result.text) == (spec.colour, spec.shape), result.text
        right += shapes.dominant_colour(result.media[0].array) == spec.colour
    assert right >= 6


def test_demo_on_the_default_preset_captions_and_draws(tmp_path, capsys):
    from omnistage.clients.cli import main

    assert main(["demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "answer: 'a big red circle on the left'" in out
    assert "[video question] skipped: config 'shapes' has no video input" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.png"]
    assert shapes.dominant_colour(np.asarray(Image.open(tmp_path / "image.png").convert("RGB"))) == "blue"


def test_models_build_copies_the_shipped_preset(tmp_path):
    from omnistage.actors.builtin import ensure_preset
    from omnistage.clients.cli import main

    assert main(["models", "build", "shapes", str(tmp_path)]) == 0
    assert _weights(tmp_path) == _weights(ensure_preset("shapes"))


@pytest.mark.slow
def test_readme_examples_through_serve(ray_session, tmp_path):
    """The README's first requests, on the default preset served as its own app: the sample
    picture's caption, and a drawn blue square."""
    import httpx
    from conftest import SERVE_PORT
    from ray import serve

    from omnistage.clients.cli import main
    from omnistage.cluster.config import load_config
    from omnistage.pipelines.serve import build_app

    assert main(["samples", str(tmp_path)]) == 0
    image = base64.b64encode((tmp_path / "sample.png").read_bytes()).decode()
    serve.start(http_options={"host": "127.0.0.1", "port": SERVE_PORT})
    serve.run(build_app(load_config("shapes")), name="shapes", route_prefix="/shapes")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{SERVE_PORT}/shapes/v1", timeout=120) as client:
            caption = client.post("/chat/completions", json={
                "model": "omnistage-shapes", "max_tokens": 16, "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                    {"type": "text", "text": "What is in this image?"}]}],
            })
            drawing = client.post("/images/generations", json={"model": "omnistage-shapes", "prompt": "Draw a blue square", "seed": 0})
        assert caption.status_code == 200, caption.text
        assert caption.json()["choices"][0]["message"]["content"] == "a big red circle on the left"
        assert drawing.status_code == 200, drawing.text
        picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(drawing.json()["data"][0]["b64_json"]))).convert("RGB"))
        assert picture.shape == (64, 64, 3) and shapes.dominant_colour(picture) == "blue"
    finally:
        serve.delete("shapes")
