"""Shared fixtures. Everything runs offline: models are built from configs, never downloaded."""

import os

# Set before transformers / diffusers are imported anywhere in the test session.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def omnistage_home(tmp_path_factory):
    """Built-in presets are built into a per-session directory, never the user's cache."""
    home = tmp_path_factory.mktemp("omnistage_home")
    previous = os.environ.get("OMNISTAGE_HOME")
    os.environ["OMNISTAGE_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("OMNISTAGE_HOME", None)
    else:
        os.environ["OMNISTAGE_HOME"] = previous


@pytest.fixture(scope="session")
def tiny_preset(omnistage_home):
    """The built-in tiny preset, built once per session through the same path users hit."""
    from omnistage.actors.builtin import ensure_preset

    return ensure_preset("tiny")


@pytest.fixture(scope="session")
def pipeline(tiny_preset):
    from omnistage.pipelines import LocalPipeline

    return LocalPipeline.from_config("tiny")


@pytest.fixture(scope="session")
def ray_session(omnistage_home):
    """One local Ray for the whole session (Ray takes seconds to start).

    Logical CPUs and GPUs are declared beyond this machine's: stage actors ask for fractions of a
    CPU, and declared GPUs let GPU placement be tested while models still run on the CPU.
    """
    import ray

    ray.init(
        num_cpus=8,
        num_gpus=4,
        include_dashboard=False,
        runtime_env={"env_vars": {"OMNISTAGE_HOME": str(omnistage_home), "HF_HUB_OFFLINE": "1"}},
    )
    yield ray
    ray.shutdown()
