"""Running on a real Ray cluster: ray_cluster.yaml against Ray's schema, the gpu-cluster preset
against its node types, the exported Serve config, the KubeRay RayService, and a simulated
multi-node cluster (``tests/cluster_scenario.py``, in its own process)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from omnistage.cluster.config import ConfigError, OmnistageConfig, load_config
from omnistage.cluster.manifests import (
    PLACEHOLDERS,
    RAY_CLUSTER_YAML,
    RAYSERVICE_YAML,
    load_ray_cluster,
    placement_problems,
    ray_cluster_offers,
    rayservice_offers,
    render_rayservice,
)
from omnistage.cluster.manifests import main as manifests_main
from omnistage.pipelines.serve_config import (
    SERVE_IMPORT_PATH,
    app_builder,
    config_from_serve_config,
    export_serve_config,
    pools,
)

SCENARIO = Path(__file__).with_name("cluster_scenario.py")


@pytest.fixture(scope="module")
def cluster_yaml():
    return load_ray_cluster()


@pytest.fixture(scope="module")
def gpu_config():
    return load_config("gpu-cluster")


@pytest.fixture(scope="module")
def rayservice_docs():
    return list(yaml.safe_load_all(RAYSERVICE_YAML.read_text()))


def _custom_resources(config):
    return {key for pool in pools(config).values() for key in pool.resources.custom}


# ray_cluster.yaml


def test_ray_cluster_yaml_is_valid_for_rays_schema_and_launcher(cluster_yaml):
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cluster_yaml, schema)
    # What `ray up` runs before launching: the provider's defaults filled in, then Ray's own checks.
    validate_config(prepare_config(cluster_yaml))


def test_ray_cluster_yaml_has_a_node_type_per_stage_family(cluster_yaml):
    types = cluster_yaml["available_node_types"]
    head = types[cluster_yaml["head_node_type"]]
    assert head["resources"]["CPU"] == 0, "no replica should land on the head"
    workers = {name: spec for name, spec in types.items() if name != cluster_yaml["head_node_type"]}
    offered = {key: name for name, spec in workers.items() for key in spec["resources"] if key.startswith("omnistage_")}
    assert offered == {
        "omnistage_encoder_node": "encoder_gpu",
        "omnistage_llm_node": "llm_gpu",
        "omnistage_generator_node": "generator_gpu",
    }
    for name, spec in workers.items():
        assert spec["resources"]["GPU"] >= 1 and spec["resources"]["CPU"] >= 1, name
        assert 0 <= spec["min_workers"] <= spec["max_workers"], name
    assert sum(spec["max_workers"] for spec in workers.values()) <= cluster_yaml["max_workers"]


def test_ray_cluster_yaml_installs_omnistage_and_starts_ray_safely(cluster_yaml):
    assert any("omnistage[server]" in cmd for cmd in cluster_yaml["setup_commands"])
    head = " ".join(cluster_yaml["head_start_ray_commands"])
    # GCS fault tolerance on an external Redis, as Ray documents for `ray start` / `ray up`.
    assert "RAY_REDIS_ADDRESS" in head and "--redis-password=" in head and "ray start --head" in head
    assert "--dashboard-host=127.0.0.1" in head, "the dashboard runs code for whoever reaches it"
    for commands in (cluster_yaml["head_start_ray_commands"], cluster_yaml["worker_start_ray_commands"]):
        assert "RAY_AUTH_MODE=token" in " ".join(commands)
    worker = " ".join(cluster_yaml["worker_start_ray_commands"])
    assert "unset RAY_REDIS_ADDRESS OMNISTAGE_GCS_REDIS_PASSWORD" in worker, "the GCS password stays on the head"
    # Secrets come from files outside the repository, never from the committed config.
    assert cluster_yaml["file_mounts"]["~/omnistage.env"].startswith("~/")


def test_head_start_refuses_to_run_without_the_gcs_redis(cluster_yaml, tmp_path):
    command = cluster_yaml["head_start_ray_commands"][1]
    env_file = tmp_path / "cluster.env"
    env_file.write_text("OMNISTAGE_REDIS_URL=redis://cache:6379/0\n")  # no RAY_REDIS_ADDRESS
    script = command.replace("~/omnistage.env", str(env_file)).replace("ulimit -n 65536", "true").replace("ray start", "echo ray start")
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert result.returncode != 0 and "RAY_REDIS_ADDRESS" in result.stderr
    env_file.write_text("RAY_REDIS_ADDRESS=10.0.0.9:6379\nOMNISTAGE_GCS_REDIS_PASSWORD=secret\n")
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "--redis-password=secret" in result.stdout


# The gpu-cluster preset against the node types


def test_gpu_cluster_preset_loads_without_its_checkpoints(gpu_config):
    models = {name: pool.model for name, pool in pools(gpu_config).items() if name != "ingress"}
    assert all(model.startswith("/models/") for model in models.values())
    assert not any(Path(model).exists() for model in models.values())
    assert gpu_config.cache.redis_url is None, "the cache URL (with its password) comes from OMNISTAGE_REDIS_URL"


def test_every_pool_of_the_gpu_preset_fits_a_node_type(gpu_config, cluster_yaml):
    offers = ray_cluster_offers(cluster_yaml)
    assert placement_problems(gpu_config, offers) == []
    offered = {key for offer in offers for key in offer.resources}
    assert _custom_resources(gpu_config) <= offered
    for name, pool in pools(gpu_config).items():
        if name != "ingress":
            assert pool.resources.custom, f"{name} is not pinned to a node type"


def _with(config: OmnistageConfig, stage: str, **changes) -> OmnistageConfig:
    data = config.model_dump()
    for section, values in changes.items():
        data["stages"][stage][section].update(values)
    return OmnistageConfig.model_validate(data)


def test_placement_check_names_the_pool_and_what_is_missing(gpu_config, cluster_yaml):
    offers = ray_cluster_offers(cluster_yaml)
    unknown = _with(gpu_config, "llm", resources={"custom": {"omnistage_tpu_node": 1}})
    (problem,) = placement_problems(unknown, offers)
    assert "pool llm" in problem and "omnistage_tpu_node" in problem
    too_big = _with(gpu_config, "llm", resources={"num_gpus": 2})
    (problem,) = placement_problems(too_big, offers)
    assert "pool llm" in problem and "'GPU': 2.0" in problem
    too_many = _with(gpu_config, "llm", scaling={"max_replicas": 5})
    (problem,) = placement_problems(too_many, offers)
    assert "['llm']" in problem and "5 GPU on llm_gpu" in problem and "max_workers 4" in problem


# The Serve config export


def test_exported_serve_config_is_rays_schema_and_deploys_the_config(gpu_config):
    from ray.serve._private.build_app import build_app
    from ray.serve.schema import ServeDeploySchema

    exported = export_serve_config(gpu_config)
    schema = ServeDeploySchema.model_validate(exported)
    (app,) = schema.applications
    assert app.import_path == SERVE_IMPORT_PATH and app.route_prefix == "/"
    assert schema.http_options.host == "0.0.0.0" and schema.http_options.port == 8000
    assert schema.http_options.request_timeout_s == gpu_config.server.request_timeout_s
    # Placement lives in `deployments` only; args plus deployments give back the whole config.
    stages = app.args["config"]["stages"]
    assert not any(section in stage for stage in stages.values() if stage for section in ("scaling", "resources", "queue"))
    assert config_from_serve_config(exported) == gpu_config
    llm = next(d for d in app.deployments if d.name == "llm")
    assert llm.ray_actor_options.resources == {"omnistage_llm_node": 0.01} and llm.ray_actor_options.num_gpus == 1
    assert llm.autoscaling_config["max_replicas"] == 4
    # Every override names a deployment the builder makes, and the builder makes no other.
    built = build_app(app_builder(app.args), name=app.name)
    assert {d.name for d in built.deployments} == {d.name for d in app.deployments} == set(pools(gpu_config))


def _code_version(exported):
    from ray.serve._private.deploy_utils import get_app_code_version
    from ray.serve.schema import ServeDeploySchema

    return get_app_code_version(ServeDeploySchema.model_validate(exported).applications[0])


def test_scaling_changes_update_in_place_and_model_changes_redeploy(gpu_config):
    """Serve restarts every replica when an app's code version (import path and args) changes;
    deployment options alone are applied in place."""
    base = export_serve_config(gpu_config)
    rescaled = export_serve_config(_with(gpu_config, "llm", scaling={"max_replicas": 3}, queue={"max_ongoing_requests": 32}))
    assert rescaled["applications"][0]["deployments"] != base["applications"][0]["deployments"]
    assert _code_version(rescaled) == _code_version(base)
    data = gpu_config.model_dump()
    data["stages"]["llm"]["model"] = "/models/another-7b"
    assert _code_version(export_serve_config(OmnistageConfig.model_validate(data))) != _code_version(base)
    # A new omnistage version alone redeploys too, so upgraded code reaches the replicas.
    upgraded = export_serve_config(gpu_config)
    upgraded["applications"][0]["runtime_env"]["env_vars"]["OMNISTAGE_VERSION"] = "99.0"
    assert _code_version(upgraded) != _code_version(base)


def test_app_builder_takes_a_preset_name_or_a_mapping(gpu_config):
    from ray.serve._private.build_app import build_app

    by_name = build_app(app_builder({"config": "tiny"}), name="a")
    by_mapping = build_app(app_builder({"config": load_config("tiny").model_dump(mode="json")}), name="b")
    assert [d.name for d in by_name.deployments] == [d.name for d in by_mapping.deployments]
    with pytest.raises(ConfigError, match="exactly one key 'config'"):
        app_builder({"preset": "tiny"})
    with pytest.raises(ConfigError, match="args.config is invalid"):
        app_builder({"config": {"name": "x"}})
    # A preset name in args is loaded on the cluster; deployments still set the placement.
    exported = export_serve_config(gpu_config)
    exported["applications"][0]["args"] = {"config": "gpu-cluster"}
    assert config_from_serve_config(exported) == gpu_config
    exported["applications"][0]["deployments"].append({"name": "ocr_encoder"})
    with pytest.raises(ConfigError, match="'ocr_encoder', which the app does not have"):
        config_from_serve_config(exported)


def test_cli_exports_the_serve_config_and_starts_nothing(tmp_path):
    out = tmp_path / "serve.yaml"
    result = subprocess.run(
        [str(Path(sys.executable).with_name("omnistage")), "serve", "--config", "gpu-cluster", "--export-config", str(out), "--port", "9100"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"serve deploy {out}" in result.stdout
    text = out.read_text()
    assert text.startswith("# Serve config for 'omnistage-gpu'")
    exported = yaml.safe_load(text)
    assert exported["http_options"]["port"] == 9100
    assert exported["applications"][0]["args"]["config"]["stages"]["llm"]["model"] == "/models/vicuna-7b-v1.5"


# KubeRay


def test_committed_rayservice_is_the_generated_one():
    assert RAYSERVICE_YAML.read_text() == render_rayservice(), (
        "cluster/kuberay/rayservice.yaml is stale: run `python -m omnistage.cluster.manifests`"
    )


def test_every_manifest_runs_the_installed_ray(rayservice_docs, cluster_yaml):
    import ray

    rayservice = next(d for d in rayservice_docs if d["kind"] == "RayService")
    assert rayservice["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
    assert cluster_yaml["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    dockerfile = (RAYSERVICE_YAML.parent / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-py311-gpu" in dockerfile


def test_rayservice_groups_serve_the_preset_with_gcs_fault_tolerance(rayservice_docs, gpu_config, cluster_yaml):
    rayservice = next(d for d in rayservice_docs if d["kind"] == "RayService")
    assert rayservice["apiVersion"] == "ray.io/v1"
    spec = rayservice["spec"]
    # Its Serve config is the exported one, and deploys the preset.
    serve_config = yaml.safe_load(spec["serveConfigV2"])
    assert serve_config == export_serve_config(gpu_config)
    deployed = config_from_serve_config(serve_config)
    assert deployed == gpu_config
    cluster = spec["rayClusterConfig"]
    ft = cluster["gcsFaultToleranceOptions"]
    assert ft["redisAddress"] and ft["redisPassword"]["valueFrom"]["secretKeyRef"]["key"] == "gcs-redis-password"
    assert cluster["authOptions"] == {"mode": "token"}
    # Every pool fits a group; the groups mirror ray_cluster.yaml's worker types.
    offers = rayservice_offers(rayservice)
    assert placement_problems(deployed, offers) == []
    launcher = {o.name.replace("_", "-"): o for o in ray_cluster_offers(cluster_yaml)}
    for offer in offers:
        twin = launcher[offer.name]
        custom = {k: v for k, v in offer.resources.items() if k not in ("CPU", "GPU")}
        assert custom == {k: v for k, v in twin.resources.items() if k not in ("CPU", "GPU")}, offer.name
        assert offer.resources["GPU"] == twin.resources.get("GPU", 0), offer.name
        assert (offer.min_workers, offer.max_workers) == (twin.min_workers, twin.max_workers), offer.name
    assert len(offers) == len(launcher)
    # Secrets are references, never values.
    env = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    assert {e["name"] for e in env if "valueFrom" in e} == {"OMNISTAGE_REDIS_URL", "OMNISTAGE_API_KEYS"}


# Values each deployment must give


def test_checked_in_files_mark_the_values_each_deployment_gives():
    root = RAY_CLUSTER_YAML.parent
    texts = {path: path.read_text() for path in [RAY_CLUSTER_YAML, RAYSERVICE_YAML, *root.glob("docs/*.md"), *root.glob("cluster/**/*.py")]}
    assert [str(path) for path, text in texts.items() if "CHANGE-ME" in text] == []
    assert {"${OMNISTAGE_AWS_ACCOUNT}", "${OMNISTAGE_MODELS_BUCKET}"} <= set(re.findall(r"\$\{OMNISTAGE_[A-Z_]+\}", texts[RAY_CLUSTER_YAML]))
    rayservice = next(d for d in yaml.safe_load_all(texts[RAYSERVICE_YAML]) if d["kind"] == "RayService")["spec"]["rayClusterConfig"]
    assert rayservice["gcsFaultToleranceOptions"]["redisAddress"] == "${OMNISTAGE_GCS_REDIS}"
    groups = [rayservice["headGroupSpec"], *rayservice["workerGroupSpecs"]]
    assert {c["image"] for g in groups for c in g["template"]["spec"]["containers"]} == {"${OMNISTAGE_IMAGE}"}


def test_the_rayservice_needs_an_image_and_a_gcs_redis(tmp_path, monkeypatch, capsys):
    for name in PLACEHOLDERS:
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "rayservice.yaml"
    with pytest.raises(SystemExit, match=r"expected --image or \$OMNISTAGE_IMAGE: the container image .*; got nothing"):
        manifests_main(["--out", str(out)])
    with pytest.raises(SystemExit, match=r"expected --gcs-redis or \$OMNISTAGE_GCS_REDIS: host:port .*; got nothing"):
        manifests_main(["--image", "registry.example/omnistage:1", "--out", str(out)])
    with pytest.raises(SystemExit, match=r"expected --gcs-redis as host:port, got 'redis://gcs'"):
        manifests_main(["--image", "registry.example/omnistage:1", "--gcs-redis", "redis://gcs", "--out", str(out)])
    with pytest.raises(SystemExit, match=r"expected --image to be a real value, got the marker"):
        manifests_main(["--image", "${OMNISTAGE_IMAGE}", "--gcs-redis", "gcs:6379", "--out", str(out)])
    assert not out.exists()
    monkeypatch.setenv("OMNISTAGE_GCS_REDIS", "gcs-redis.internal:6379")
    manifests_main(["--image", "registry.example/omnistage:1", "--out", str(out)])
    text = out.read_text()
    assert "${OMNISTAGE_" not in text
    # The same manifest as the template, with the two values in place.
    assert text == render_rayservice(image="registry.example/omnistage:1", gcs_redis="gcs-redis.internal:6379")
    rayservice = next(d for d in yaml.safe_load_all(text) if d["kind"] == "RayService")["spec"]["rayClusterConfig"]
    assert rayservice["gcsFaultToleranceOptions"]["redisAddress"] == "gcs-redis.internal:6379"
    assert rayservice["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/omnistage:1"


def test_filling_ray_cluster_yaml_refuses_until_every_value_is_given(tmp_path, monkeypatch):
    from ray.autoscaler._private.util import prepare_config, validate_config

    for name in PLACEHOLDERS:
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "my-cluster.yaml"
    with pytest.raises(SystemExit) as refused:
        manifests_main(["--fill", str(RAY_CLUSTER_YAML), "--out", str(out)])
    message = str(refused.value)
    assert "expected OMNISTAGE_AWS_ACCOUNT (the 12-digit AWS account id" in message and "got nothing" in message
    assert "expected OMNISTAGE_MODELS_BUCKET (the S3 bucket" in message and not out.exists()
    with pytest.raises(SystemExit, match=r"expected --set NAME=VALUE with NAME among .*, got 'BUCKET=x'"):
        manifests_main(["--fill", str(RAY_CLUSTER_YAML), "--set", "BUCKET=x"])
    monkeypatch.setenv("OMNISTAGE_MODELS_BUCKET", "acme-models")
    manifests_main(["--fill", str(RAY_CLUSTER_YAML), "--set", "OMNISTAGE_AWS_ACCOUNT=123456789012", "--out", str(out)])
    filled = load_ray_cluster(out)
    llm = filled["available_node_types"]["llm_gpu"]
    assert llm["node_config"]["IamInstanceProfile"]["Arn"] == "arn:aws:iam::123456789012:instance-profile/omnistage-worker"
    assert "aws s3 sync --only-show-errors s3://acme-models/llm/ /models/" in llm["initialization_commands"]
    # The start commands' own shell checks stay for the nodes to run.
    assert filled["head_start_ray_commands"] == load_ray_cluster()["head_start_ray_commands"]
    validate_config(prepare_config(filled))


# A simulated multi-node cluster


@pytest.mark.slow
def test_pools_land_on_their_node_types_and_survive_losing_a_node(tiny_preset, omnistage_home):
    env = {**os.environ, "OMNISTAGE_HOME": str(omnistage_home), "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)  # its own cluster, never the session's
    try:
        run = subprocess.run(
            [sys.executable, str(SCENARIO)], capture_output=True, text=True, timeout=900, env=env, cwd=SCENARIO.parent.parent
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the multi-node scenario ran past {exc.timeout} s; output tail:\n{(exc.stdout or b'')[-3000:]!r}")
    lines = [line for line in run.stdout.splitlines() if line.startswith(("RESULT ", "FAILED "))]
    assert lines, f"no result line (exit {run.returncode}); output tail:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    kind, _, payload = lines[-1].partition(" ")
    result = json.loads(payload)
    assert kind == "RESULT", result.get("traceback", result)

    # 1. Each pool's replica runs on a node of the type that offers its custom resource, and
    #    gets one of that node's declared GPUs.
    for pool, node_type in result["placement"].items():
        assert result["expected"][pool] == [node_type], (pool, node_type)
        assert len(result["gpu_ids"][pool]) == 1, pool
    assert set(result["placement"].values()) == {"encoder_gpu", "llm_gpu", "generator_gpu"}
    # 2. Requests succeed across the nodes.
    assert result["before"] == {"chat_status": 200, "image_status": 200, "chat_text_type": "str", "image_mime": "image/png"}
    # 3. Losing the LLM node moves the replica to the other LLM node; requests succeed again.
    assert result["removed_node_type"] == "llm_gpu" and result["llm_moved_to_type"] == "llm_gpu"
    assert result["after"] == result["before"]
    print("multi-node timings (s):", result["timings"])
