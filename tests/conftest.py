"""Shared fixtures. Everything runs offline: models are built from configs, never downloaded."""

import os
import shutil
import socket
import subprocess
import time

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
    CPU, and declared GPUs let GPU placement be tested while models still run on the CPU. The
    dashboard (on loopback) serves Ray's state API, which the reliability tests read.
    """
    import ray

    ray.init(
        # "local" always starts a new instance, never joining one another process left running.
        address="local",
        num_cpus=8,
        num_gpus=4,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        # As `omnistage serve` does (server.metrics_port): the metrics tests scrape this port.
        _metrics_export_port=METRICS_PORT,
        runtime_env={"env_vars": {"OMNISTAGE_HOME": str(omnistage_home), "HF_HUB_OFFLINE": "1"}},
    )
    yield ray
    ray.shutdown()


class RedisServer:
    """A real redis-server on loopback with a password, which tests may stop and start again."""

    password = "omnistage-test"

    def __init__(self, directory):
        self.port = _free_port()
        self.directory = directory
        self.process = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--requirepass", self.password,
             "--save", "", "--appendonly", "no", "--dir", str(self.directory),
             "--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        for _ in range(100):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed; `make test` installs it")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    if server.process.poll() is None:
        server.stop()


# Picked per session, so two suites on one machine never talk to each other's server.
SERVE_PORT = _free_port()
METRICS_PORT = _free_port()


@pytest.fixture(scope="session")
def serve_config(redis_server):
    """The tiny preset with settings that make serving behaviour observable in tests."""
    from omnistage.cluster.config import OmnistageConfig, load_config

    data = load_config("tiny").model_dump()
    # Fast autoscaling on the image generation path's generator and on the pools that load must
    # not touch, so scaling happens (or visibly does not) within a test. The other pools keep one
    # replica: scaling them would start replicas no test looks at.
    for name in ("video_encoder", "audio_encoder", "input_projector", "image_generator"):
        data["stages"][name]["scaling"].update(
            min_replicas=1, max_replicas=2, target_ongoing_requests=1,
            upscale_delay_s=0.5, downscale_delay_s=3, metrics_interval_s=0.5, look_back_period_s=2,
        )
    # GPUs declared by the session's ray.init: placement is real, the models still run on the CPU.
    data["stages"]["llm"]["resources"]["num_gpus"] = 1
    data["stages"]["image_generator"]["resources"]["num_gpus"] = 1
    data["server"]["max_request_bytes"] = 2_000_000
    # A tight queue on one generator pool, so overload is observable.
    data["stages"]["audio_generator"]["queue"].update(max_ongoing_requests=1, max_queued_requests=1)
    # A partial batch waits a little on one encoder pool, so requests sent together observably
    # share a batch however busy the machine is.
    data["stages"]["image_encoder"]["batching"]["batch_wait_timeout_s"] = 0.05
    # Quick health checks on one pool, so a replica failing them is replaced within a test.
    data["stages"]["audio_encoder"]["health"] = {"period_s": 1, "timeout_s": 2}
    # Two image encoder replicas share the Redis feature cache.
    data["stages"]["image_encoder"]["scaling"].update(min_replicas=2, max_replicas=2)
    data["cache"]["redis_url"] = redis_server.url
    return OmnistageConfig.model_validate(data)


@pytest.fixture(scope="session")
def serve_url(ray_session, serve_config):
    """One deployed Serve app for the session: deploying takes tens of seconds on two cores."""
    from ray import serve

    from omnistage.pipelines.serve import APP_NAME, deploy

    serve.start(http_options={"host": "127.0.0.1", "port": SERVE_PORT})
    deploy(serve_config)
    yield f"http://127.0.0.1:{SERVE_PORT}"
    serve.delete(APP_NAME)
    serve.shutdown()


@pytest.fixture(scope="session")
def metrics_port(ray_session):
    """The session Ray's Prometheus port (Ray's metrics agent serves /metrics there)."""
    return METRICS_PORT


@pytest.fixture()
def client(serve_url):
    import httpx

    with httpx.Client(base_url=serve_url, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def wait_until():
    """``wait_until(condition, timeout)``: poll every half second until it holds; False on timeout."""

    def wait(condition, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(0.5)
        return False

    return wait


@pytest.fixture(scope="session")
def running_replicas(serve_url):
    """``running(name, app)``: how many replicas of deployment ``name`` of ``app`` (default: the
    session app) are running."""
    from ray import serve

    from omnistage.pipelines.serve import APP_NAME

    def running(name: str, app: str = APP_NAME) -> int:
        return serve.status().applications[app].deployments[name].replica_states.get("RUNNING", 0)

    return running
