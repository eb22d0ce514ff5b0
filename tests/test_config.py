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


def test_the_input_projector_can_run_in_the_encoder_pools():
    from omnistage.pipelines.graph import Graph
    from omnistage.pipelines.serve_config import pools

    config = load_config("tiny")
    assert Graph.of(config).pools["input_projector"] == ("input_projector",)
    stages = config.stages.model_copy(
        update={"input_projector": config.stages.input_projector.model_copy(update={"placement": "encoders"})}
    )
    fused = config.model_copy(update={"stages": stages})
    graph = Graph.of(fused)
    assert "input_projector" not in graph.pools and "input_projector" not in pools(fused)
    assert graph.pools["video_encoder"] == ("video_encoder", "input_projector")
    # The hops and their contract stay the same: only where the projector runs changes.
    assert graph.hops == Graph.of(config).hops and graph.stages == Graph.of(config).stages


def test_the_utilisation_policy_counts_work_not_requests():
    from types import SimpleNamespace

    from omnistage.pipelines.autoscaling import UtilisationPolicy
    from omnistage.pipelines.serve import deployment_options

    config = load_config("tiny")
    pool = config.stages.image_generator.model_copy(
        update={"scaling": config.stages.image_generator.scaling.model_copy(update={"policy": "utilisation", "target_utilisation": 0.5})}
    )
    policy = deployment_options(pool, "image_generator")["autoscaling_config"]["policy"]
    assert policy == {"policy_function": "omnistage.pipelines.autoscaling:UtilisationPolicy", "policy_kwargs": {"target_utilisation": 0.5}}
    assert "policy" not in deployment_options(config.stages.llm, "llm")["autoscaling_config"]
    llm = config.stages.llm.model_dump()
    llm["scaling"]["policy"] = "utilisation"
    with pytest.raises(ValueError, match="LLM pool scales on sequences in flight.*got 'utilisation'"):
        type(config.stages.llm).model_validate(llm)

    decide = UtilisationPolicy(target_utilisation=0.5, drain_s=2.0)

    def ctx(busy, backlog_s, cost_s, queued_at_handles=0):
        metrics = {"busy": busy, "backlog_s": backlog_s, "cost_s": cost_s}
        return SimpleNamespace(aggregated_metrics=metrics, total_queued_requests=queued_at_handles, target_num_replicas=3)

    # Two replicas each busy 0.9 of the time want 0.9 * 2 / 0.5 = 3.6 replicas; idle ones want none.
    assert decide(ctx({"a": 0.9, "b": 0.9}, {"a": 0, "b": 0}, {"a": 0.1, "b": 0.1}))[0] == pytest.approx(3.6)
    assert decide(ctx({"a": 0.0}, {"a": 0.0}, {"a": 0.1}))[0] == 0
    # Work queued in the replicas and at the handles counts at its cost, drained over drain_s.
    assert decide(ctx({"a": 0.5}, {"a": 1.0}, {"a": 0.2}, queued_at_handles=10))[0] == pytest.approx((0.5 + (1.0 + 2.0) / 2) / 0.5)
    # Before any replica reports, the pool keeps its size.
    assert decide(SimpleNamespace(aggregated_metrics={}, total_queued_requests=0, target_num_replicas=3))[0] == 3


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
