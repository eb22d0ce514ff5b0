"""The built-in tiny preset: reproducible builds, the usual checkpoint layout, and the CLI."""

import hashlib
import io
import json

import pytest
from PIL import Image

from omnistage.actors.builtin import build_preset, resolve_checkpoint
from omnistage.actors.tiny import TINY_BUILDERS
from omnistage.clients.cli import main


def _digests(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_build_is_byte_identical_and_in_hub_layout(tmp_path, tiny_preset):
    build_preset("tiny", tmp_path / "again")
    first, second = _digests(tiny_preset), _digests(tmp_path / "again")
    assert first == second
    assert sorted({name.split("/")[0] for name in first}) == sorted(TINY_BUILDERS)
    # transformers and diffusers layouts, so from_pretrained of those libraries reads them.
    assert json.loads((tiny_preset / "llm" / "config.json").read_text())["model_type"] == "llama"
    assert json.loads((tiny_preset / "image_generator" / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert all(not name.endswith((".bin", ".pt", ".pkl")) for name in first)  # safetensors only


def test_resolve_checkpoint(tiny_preset, tmp_path):
    assert resolve_checkpoint("tiny", "llm") == tiny_preset / "llm"
    assert resolve_checkpoint(str(tmp_path), "llm") == tmp_path
    with pytest.raises(FileNotFoundError, match=r"'/no/such/dir' for llm is neither a built-in preset \(tiny, shapes\)"):
        resolve_checkpoint("/no/such/dir", "llm")


def test_cli_models_list_warns_about_random_weights(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "tiny: random weights" in out and "noise" in out


def test_cli_models_build_and_errors(tmp_path, capsys):
    assert main(["models", "build", "huge", str(tmp_path)]) == 1
    assert "expected a built-in preset (tiny, shapes), got 'huge'" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_demo_writes_media_that_open(tmp_path, tiny_preset, capsys):
    assert main(["demo", "--config", "tiny", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for title in ("image question", "video question", "audio question"):
        assert f"[{title}]" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audio.wav", "image.png", "video.mp4"]
    assert Image.open(io.BytesIO((tmp_path / "image.png").read_bytes())).size == (64, 64)
