"""The Prometheus series the stages export, and the Grafana dashboard shipped for them
(``cluster/grafana/omnistage.json``)."""

import json
import re
from pathlib import Path

import httpx
import pytest

DASHBOARD = Path(__file__).parents[1] / "cluster" / "grafana" / "omnistage.json"
# Names in a PromQL expression that are not series: functions, keywords, label names, Grafana's variables.
_SERIES = re.compile(r"\bray_[A-Za-z0-9_:]+\b")


@pytest.fixture(scope="module")
def dashboard():
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard):
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _dashboard_series(dashboard) -> set[str]:
    return {name for panel in _panels(dashboard) for target in panel.get("targets", []) for name in _SERIES.findall(target["expr"])}


def _defined_metrics(monkeypatch) -> list[tuple[str, str]]:
    """``(kind, name)`` of every metric the stage replicas create, recorded from the constructors."""
    from ray.util import metrics

    from omnistage.pipelines import deployments

    made: list[tuple[str, str]] = []

    def recorder(kind: str) -> type:
        class Metric:
            def __init__(self, name: str, *args, **kwargs):
                made.append((kind, name))

            def set_default_tags(self, tags):
                pass

        return Metric

    for kind in ("Counter", "Gauge", "Histogram"):
        monkeypatch.setattr(metrics, kind, recorder(kind))
    deployments._Metrics("image_encoder")
    deployments._EngineMetrics("llm", "replica-1")
    return made


def _prometheus_names(kind: str, name: str) -> set[str]:
    """How Prometheus shows a Ray metric: ``ray_`` first; a counter as ``_total`` (Ray also keeps
    a gauge without it, deprecated); a histogram as its buckets, sum and count."""
    name = f"ray_{name}"
    if kind == "Counter":
        return {f"{name}_total"}
    if kind == "Histogram":
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return {name}


def test_dashboard_is_grafana_json_with_a_datasource_variable(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["uid"] and dashboard["title"]
    panels = list(_panels(dashboard))
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    graphs = [p for p in panels if p["type"] != "row"]
    assert len(graphs) >= 10
    for panel in graphs:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys() and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        assert panel["targets"] and len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]
        for target in panel["targets"]:
            assert _SERIES.search(target["expr"]) and target["expr"].count("(") == target["expr"].count(")"), target["expr"]


def test_dashboard_shows_every_series_the_stages_export_and_no_other(dashboard, monkeypatch):
    defined = _defined_metrics(monkeypatch)
    assert {name for _, name in defined} >= {
        "omnistage_stage_queue_length", "omnistage_stage_batch_size", "omnistage_stage_batch_latency_s", "omnistage_stage_requests",
        "omnistage_stage_errors", "omnistage_cache_hits", "omnistage_cache_misses", "omnistage_llm_running_seqs",
        "omnistage_llm_waiting_seqs", "omnistage_llm_kv_cache_tokens", "omnistage_llm_time_to_first_token_s",
        "omnistage_llm_time_per_output_token_s", "omnistage_llm_generated_tokens",
    }
    exported = set().union(*(_prometheus_names(kind, name) for kind, name in defined))
    shown = _dashboard_series(dashboard)
    assert shown <= exported, f"the dashboard asks for series nobody exports: {sorted(shown - exported)}"
    # Each metric is on the dashboard (a histogram through any of its series).
    families = {re.sub(r"_(bucket|sum|count)$", "", name) for name in shown}
    missing = [name for kind, name in defined if not (_prometheus_names(kind, name) & shown or f"ray_{name}" in families)]
    assert missing == [], f"exported but not on the dashboard: {missing}"


def test_docs_name_the_series_as_prometheus_shows_them(monkeypatch):
    root = Path(__file__).parents[1]
    docs = {path.name: path.read_text() for path in [root / "README.md", *(root / "docs").glob("*.md")]}
    defined = _defined_metrics(monkeypatch)
    exported = set().union(*(_prometheus_names(kind, name) for kind, name in defined))
    mentioned = {name for text in docs.values() for name in re.findall(r"`(ray_omnistage_[a-z0-9_]+)", text)}
    assert mentioned and mentioned <= exported, sorted(mentioned - exported)
    # A metric's own name, with no `ray_` before it, is not what Prometheus shows.
    bare = {doc: [name for _, name in defined if re.search(rf"(?<![A-Za-z0-9_]){name}", text)] for doc, text in docs.items()}
    assert {doc: names for doc, names in bare.items() if names} == {}, "series named without Prometheus' ray_ prefix"


def test_serve_prints_where_its_metrics_are():
    from omnistage.cluster.config import ServerConfig
    from omnistage.pipelines.serve import serving_message

    assert ServerConfig().metrics_port == 8080
    line = serving_message("omnistage-tiny", "0.0.0.0", 8000, "http://127.0.0.1:8080/metrics")
    assert line == (
        "omnistage: serving 'omnistage-tiny': playground at http://127.0.0.1:8000/, API at http://127.0.0.1:8000/v1, "
        "Prometheus metrics at http://127.0.0.1:8080/metrics (Ctrl-C to stop)"
    )


def test_a_taken_metrics_port_falls_back_to_one_ray_picks(capsys):
    """Ray's node start times out without naming the port when its metrics port is taken, so
    `omnistage serve` checks it first."""
    import socket

    from omnistage.pipelines.serve import free_metrics_port

    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert free_metrics_port(port) is None
        assert f"server.metrics_port {port} is in use" in capsys.readouterr().out
    assert free_metrics_port(port) == port


@pytest.mark.slow
def test_the_live_app_exports_the_dashboards_series(serve_url, client, dashboard, metrics_port, wait_until):
    """Scraped from the session's metrics port (``server.metrics_port`` as `omnistage serve` sets it)
    once requests have gone through every kind of stage: a cache miss then a hit, a refused image,
    generated tokens."""
    import base64

    from omnistage.actors.media import encode_png
    from omnistage.pipelines.demo import sample_image
    from omnistage.pipelines.serve import metrics_url

    url = "data:image/png;base64," + base64.b64encode(encode_png(sample_image(24))).decode()
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]}], "max_tokens": 4}
    assert [client.post("/v1/chat/completions", json=image).status_code for _ in range(2)] == [200, 200]
    # A header the ingress reads, pixels the encoder cannot: the encoder counts an error.
    truncated = "data:image/png;base64," + base64.b64encode(encode_png(sample_image(16))[:60]).decode()
    broken = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": truncated}}]}]}
    assert client.post("/v1/chat/completions", json=broken).status_code == 400
    endpoint = metrics_url()
    assert endpoint.endswith(f":{metrics_port}/metrics")
    # Every series but the cache's error counter, which only a Redis outage moves.
    expected = _dashboard_series(dashboard) - {"ray_omnistage_cache_errors_total"}
    seen: set[str] = set()

    def scraped() -> bool:
        text = httpx.get(endpoint, timeout=10).text
        seen.update(re.findall(r"^(ray_omnistage_[a-z0-9_]+)[{ ]", text, re.MULTILINE))
        return expected <= seen

    assert wait_until(scraped, 90), sorted(expected - seen)
