"""The config schema: presets load, bad files fail at load naming the field and the value."""

import subprocess
import sys

import pytest

from omnistage.cluster import ConfigError, load_config, preset_names


def test_tiny_preset_loads_with_every_stage():
    config = load_config("tiny")
    assert "tiny" in preset_names()
    assert config.stages.input_modalities() == ["image", "video", "audio"]
    assert config.stages.output_modalities() == ["image", "video", "audio"]
    # Fractional CPUs, or a multi-pool pipeline deadlocks on a 2-core machine.
    assert config.stages.llm.resources.num_cpus < 1
    assert config.stages.video_encoder.num_frames == 5


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_bad_value_names_field_path_and_value(tmp_path):
    path = _write(tmp_path, "name: x\nstages:\n  llm:\n    engine:\n      max_running_seqs: 0\n")
    with pytest.raises(ConfigError, match=r"stages\.llm\.engine\.max_running_seqs.*got 0"):
        load_config(path)


def test_the_llm_takes_engine_bounds_not_batching(tmp_path):
    path = _write(tmp_path, "name: x\nstages:\n  llm:\n    batching: {max_batch_size: 8}\n")
    with pytest.raises(ConfigError, match=r"stages\.llm.*engine\.max_running_seqs instead of batching"):
        load_config(path)


def test_misspelt_key_is_refused(tmp_path):
    path = _write(tmp_path, "name: x\nstages:\n  llm:\n    modle: tiny\n")
    with pytest.raises(ConfigError, match=r"stages\.llm\.modle"):
        load_config(path)


def test_replica_bounds_show_both_values(tmp_path):
    path = _write(tmp_path, "name: x\nstages:\n  llm:\n    scaling: {min_replicas: 3, max_replicas: 2}\n")
    with pytest.raises(ConfigError, match=r"min_replicas \(3\).*max_replicas \(2\)"):
        load_config(path)


def test_generator_without_output_projector_is_refused(tmp_path):
    path = _write(tmp_path, "name: x\nstages:\n  llm: {}\n  image_generator: {}\n")
    with pytest.raises(ConfigError, match="output_projector is missing"):
        load_config(path)


def test_unknown_preset_and_missing_file():
    with pytest.raises(ConfigError, match=r"expected a preset name \(.*tiny.*\).*got 'nope'"):
        load_config("nope")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/config.yaml")


def test_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="must be a YAML mapping, got list"):
        load_config(_write(tmp_path, "- 1\n- 2\n"))


def test_config_and_client_imports_stay_light():
    code = (
        "import sys, omnistage.cluster, omnistage.clients, omnistage.clients.cli, omnistage.actors; "
        "heavy = [m for m in ('torch', 'transformers', 'diffusers', 'ray') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
