"""The Serve app over HTTP: OpenAI routes, msgpack, streaming, errors, batching, placement and
independent scaling. One app is deployed for the module (it takes tens of seconds)."""

import base64
import io
import json
import threading

import av
import httpx
import msgpack
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from omnistage.actors.media import encode_png, encode_video, encode_wav
from omnistage.pipelines.demo import sample_audio, sample_image, sample_video

pytestmark = pytest.mark.slow

def _url(mime, data):
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


PNG = encode_png(sample_image())
IMAGE = {"type": "image_url", "image_url": {"url": _url("image/png", PNG)}}
VIDEO = {"type": "video_url", "video_url": {"url": _url("video/mp4", encode_video(sample_video(), fps=8))}}
AUDIO = {"type": "input_audio", "input_audio": {"data": base64.b64encode(encode_wav(*sample_audio())).decode(), "format": "wav"}}


def _chat(*parts, text="What is this?", **extra):
    messages = [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]
    return {"model": "omnistage-tiny", "messages": messages, "max_tokens": 6, "seed": 0, "temperature": 0, **extra}


def _handle(name):
    from ray import serve

    from omnistage.pipelines.serve import APP_NAME

    return serve.get_deployment_handle(name, APP_NAME)


def test_health_and_models(client):
    assert client.get("/healthz").json() == {"status": "ok", "unavailable": []}
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    (entry,) = models["data"]
    assert entry["id"] == "omnistage-tiny" and entry["object"] == "model"
    assert entry["output_modalities"] == ["text", "image", "video", "audio"]


@pytest.mark.parametrize("part", [IMAGE, VIDEO, AUDIO], ids=["image", "video", "audio"])
def test_chat_answers_in_openai_shape(client, part):
    response = client.post("/v1/chat/completions", json=_chat(part), headers={"X-Request-ID": "trace-123"})
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == "trace-123"
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == "omnistage-tiny"
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] and usage["completion_tokens"] <= 6


def test_served_answer_equals_the_in_process_pipeline(client, pipeline):
    served = client.post("/v1/chat/completions", json=_chat(IMAGE, AUDIO)).json()
    local = pipeline.chat(_chat(IMAGE, AUDIO)["messages"], max_tokens=6, seed=0)
    assert served["choices"][0]["message"]["content"] == local.text
    assert served["usage"]["prompt_tokens"] == local.usage["prompt_tokens"]


def test_msgpack_carries_raw_bytes_both_ways(client):
    body = _chat({"type": "image_url", "image_url": {"url": PNG}}, modalities=["text", "image"])
    response = client.post(
        "/v1/chat/completions",
        content=msgpack.packb(body, use_bin_type=True),
        headers={"Content-Type": "application/msgpack", "Accept": "application/msgpack"},
    )
    assert response.status_code == 200 and response.headers["content-type"] == "application/msgpack"
    answer = msgpack.unpackb(response.content, raw=False)
    (media,) = answer["choices"][0]["message"]["media"]
    assert isinstance(media["data"], bytes) and Image.open(io.BytesIO(media["data"])).format == "PNG"
    # The same request as JSON gets the same text.
    as_json = client.post("/v1/chat/completions", json=_chat(IMAGE, modalities=["text", "image"])).json()
    assert as_json["choices"][0]["message"]["content"] == answer["choices"][0]["message"]["content"]


def _sse(response):
    events = [line[len("data: "):] for line in response.text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_streaming_gives_openai_chunks_and_the_same_text(client):
    plain = client.post("/v1/chat/completions", json=_chat(IMAGE, max_tokens=12)).json()
    response = client.post(
        "/v1/chat/completions", json=_chat(IMAGE, max_tokens=12, stream=True, stream_options={"include_usage": True})
    )
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    chunks = _sse(response)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == plain["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]


def test_streaming_with_media_and_bad_input(client):
    chunks = _sse(client.post("/v1/chat/completions", json=_chat(text="draw", stream=True, modalities=["text", "audio"])))
    media = [m for c in chunks if c["choices"] for m in c["choices"][0]["delta"].get("media", [])]
    assert [m["type"] for m in media] == ["audio"]
    bad = client.post("/v1/chat/completions", json=_chat({"type": "image_url", "image_url": {"url": _url("image/png", b"junk")}}, stream=True))
    assert bad.status_code == 400 and "could not be decoded" in bad.json()["error"]["message"]


def test_chat_generates_each_medium(client):
    body = client.post("/v1/chat/completions", json=_chat(text="make all", modalities=["text", "image", "video", "audio"])).json()
    media = {m["type"]: base64.b64decode(m["data"]) for m in body["choices"][0]["message"]["media"]}
    assert Image.open(io.BytesIO(media["image"])).size == (64, 64)
    with av.open(io.BytesIO(media["video"])) as container:
        assert sum(1 for _ in container.decode(video=0)) == 8
    samples, rate = sf.read(io.BytesIO(media["audio"]))
    assert rate == 16000 and len(samples) == 16000


def test_generation_routes(client):
    images = client.post("/v1/images/generations", json={"prompt": "a cat", "n": 2, "seed": 3}).json()
    pictures = [np.array(Image.open(io.BytesIO(base64.b64decode(d["b64_json"])))) for d in images["data"]]
    assert len(pictures) == 2 and pictures[0].shape == (64, 64, 3)
    assert not np.array_equal(pictures[0], pictures[1])  # seeds 3 and 4
    again = client.post("/v1/images/generations", json={"prompt": "a cat", "n": 1, "seed": 3}).json()
    repeat = np.array(Image.open(io.BytesIO(base64.b64decode(again["data"][0]["b64_json"])))).astype(int)
    # The same seed draws the same picture. Not always to the bit: the signal states come from a
    # batch shared with other requests (here the first call's second item), whose padding moves
    # float rounding in the last place.
    assert np.abs(repeat - pictures[0]).max() <= 2
    video = client.post("/v1/videos/generations", json={"prompt": "waves", "seed": 0}).json()["data"][0]
    assert video["mime_type"] == "video/mp4"
    audio = client.post("/v1/audio/generations", json={"prompt": "a bell", "duration_s": 1.0}).json()["data"][0]
    assert sf.read(io.BytesIO(base64.b64decode(audio["b64_json"])))[1] == 16000
    wrong = client.post("/v1/images/generations", json={"prompt": "a cat", "size": "1024x1024"})
    assert wrong.status_code == 400 and "64x64" in wrong.json()["error"]["message"]


@pytest.mark.parametrize(
    "send,status,fragment",
    [
        (lambda c: c.post("/v1/chat/completions", json=_chat({"type": "image_url", "image_url": {"url": _url("image/png", b"\x89PNG bad")}})),
         400, "could not be decoded"),
        (lambda c: c.post("/v1/chat/completions", json=_chat(IMAGE, model="gpt-9")), 404, "'gpt-9' does not exist"),
        (lambda c: c.post("/v1/chat/completions", content=b"<xml/>", headers={"Content-Type": "text/xml"}), 415, "application/json"),
        (lambda c: c.post("/v1/chat/completions", content=b"{", headers={"Content-Type": "application/json"}), 400, "JSON body"),
        (lambda c: c.post("/v1/chat/completions", content=b"\xc1\xff", headers={"Content-Type": "application/msgpack"}), 400, "msgpack"),
        (lambda c: c.post("/v1/chat/completions", json={"messages": []}), 400, "messages"),
        (lambda c: c.post("/v1/chat/completions", json=_chat(n=2)), 400, "n=1"),
        (lambda c: c.post("/v1/chat/completions", json=_chat(modalities=["smell"])), 415, "smell"),
        (lambda c: c.post("/v1/chat/completions", json=_chat({"type": "image_url", "image_url": {"url": "https://x.test/a.png"}})), 400, "remote URLs"),
        (lambda c: c.post("/v1/chat/completions", content=b"x" * (2_000_001), headers={"Content-Type": "application/json"}), 413, "2000000"),
        (lambda c: c.get("/v1/nothing"), 404, "Not Found"),
    ],
    ids=["undecodable", "unknown-model", "content-type", "bad-json", "bad-msgpack", "no-messages", "n", "modality", "remote-url", "too-large", "route"],
)
def test_errors_are_openai_shaped_with_the_right_status(client, send, status, fragment):
    response = send(client)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error["message"] and error["code"] == status
    assert "Traceback" not in response.text


def test_features_never_pass_through_the_ingress(client):
    response = client.post("/v1/chat/completions", json=_chat(IMAGE, VIDEO, AUDIO, modalities=["text", "image"]))
    assert response.status_code == 200, response.text
    ingress = _handle("ingress").stats.remote().result()
    assert ingress["array_bytes_received"] == 0
    # Nor does the ingress decode media: each file goes to its encoder pool as bytes, decoded there.
    assert ingress["decoded_media"] == {}
    for modality in ("image", "video", "audio"):
        decoded = [s["decoded_media"] for s in (_handle(f"{modality}_encoder").stats.remote().result() for _ in range(4))]
        assert max(d.get(modality, 0) for d in decoded) > 0, modality


def _replica_stats(name, replicas, polls=64):
    """Stats of each replica of pool ``name``, by replica id: the router picks a replica per call,
    so it polls until it has seen ``replicas`` of them."""
    handle = _handle(name)
    seen = {}
    for _ in range(polls):
        stats = handle.stats.remote().result()
        seen[stats["replica"]] = stats
        if len(seen) == replicas:
            break
    assert len(seen) == replicas, f"expected stats from {replicas} {name} replicas, reached {len(seen)}"
    return seen


def test_concurrent_requests_share_a_batch(client, running_replicas):
    replicas = running_replicas("image_encoder")
    before = _replica_stats("image_encoder", replicas)
    encoder = _handle("image_encoder")
    responses = [encoder.remote(sample_image(), request_id=f"b{i}") for i in range(8)]
    assert all(r.result().features.shape == (225, 32) for r in responses)
    after = _replica_stats("image_encoder", replicas)
    assert after.keys() == before.keys()
    # Counted for this test alone: the 8 items went in fewer than 8 batches.
    items = sum(after[r]["items"] - before[r]["items"] for r in after)
    batches = sum(after[r]["batches"] - before[r]["batches"] for r in after)
    assert items == 8 and batches < items, (items, batches)


def _llm_replica_stats(polls=12):
    """Stats of each LLM replica the handle reached, by replica id."""
    handle = _handle("llm")
    return {s["replica"]: s for s in (handle.stats.remote().result() for _ in range(polls))}


def test_a_short_chat_answers_while_long_streams_decode(serve_url, client):
    import concurrent.futures
    import time

    long = {"model": "omnistage-tiny", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 300, "temperature": 0, "stream": True}
    decoding = [threading.Event() for _ in range(3)]
    finished = {}

    def stream(i):
        with httpx.Client(base_url=serve_url, timeout=120) as c, c.stream("POST", "/v1/chat/completions", json=long) as r:
            events = []
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    events.append(json.loads(line[6:]))
                    if any(choice["delta"].get("content") for choice in events[-1]["choices"]):
                        decoding[i].set()
        finished[i] = time.monotonic()
        return events

    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        streams = [pool.submit(stream, i) for i in range(3)]
        assert all(event.wait(60) for event in decoding)
        start = time.monotonic()
        short = client.post("/v1/chat/completions", json={**_chat(), "max_tokens": 4})
        answered = time.monotonic()
        events = [f.result() for f in streams]
    assert short.status_code == 200, short.text
    # The long streams really were long: each ran to its max_tokens.
    assert all(next(c["finish_reason"] for e in ev for c in e["choices"] if c["finish_reason"]) == "length" for ev in events)
    # Admitted at the next step, the short chat was answered while every long stream still decoded.
    assert answered < min(finished.values()), (answered - start, [t - start for t in finished.values()])


def test_a_client_that_disconnects_frees_its_sequence(serve_url, wait_until):
    before = sum(s["aborted"] for s in _llm_replica_stats().values())
    body = {"model": "omnistage-tiny", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 1024, "temperature": 0, "stream": True}
    with httpx.Client(base_url=serve_url, timeout=120) as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                break  # the answer has started; hang up
    # The LLM drops the sequence at its next step instead of decoding the rest of the 1024 tokens.
    assert wait_until(lambda: sum(s["aborted"] for s in _llm_replica_stats().values()) == before + 1, 30)
    assert wait_until(lambda: all(s["running"] == 0 for s in _llm_replica_stats().values()), 30)


def test_gpu_pools_are_placed_on_declared_gpus(client):
    stats = _handle("llm").stats.remote().result()
    assert len(stats["gpu_ids"]) == 1 and stats["device"] == "cpu"  # no CUDA here: models run on the CPU
    assert _handle("image_encoder").stats.remote().result()["gpu_ids"] == []


def test_image_generation_load_scales_only_its_path(client, serve_url, serve_config, running_replicas, wait_until):
    _running = running_replicas
    untouched = ["image_encoder", "video_encoder", "audio_encoder", "input_projector"]
    minimum = {n: getattr(serve_config.stages, n).scaling.min_replicas for n in [*untouched, "image_generator"]}
    assert wait_until(lambda: all(_running(n) == minimum[n] for n in minimum), 60)
    stop = threading.Event()

    def load():
        with httpx.Client(base_url=serve_url, timeout=120) as c:
            while not stop.is_set():
                assert c.post("/v1/images/generations", json={"prompt": "load", "seed": 1}).status_code == 200

    # Three in flight against a target of one per replica asks for the pool's maximum of two.
    # The second replica loads its model while the first keeps both cores busy, which can take
    # over a minute here: the window is generous, and a passing run ends as soon as it is up.
    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        scaled = wait_until(lambda: _running("image_generator") == 2, 180)
        during = {n: _running(n) for n in untouched}
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert scaled, "the image generator pool did not scale up under load"
    assert during == {n: minimum[n] for n in untouched}
    assert wait_until(lambda: _running("image_generator") == 1, 60), "the image generator pool did not scale back down"


def test_api_keys_guard_v1_routes_only(serve_url, monkeypatch, tmp_path):
    import hashlib

    from ray import serve

    from omnistage.cluster.config import OmnistageConfig, load_config
    from omnistage.pipelines.serve import deploy

    digests = tmp_path / "keys"
    digests.write_text(f"# ops team\n{hashlib.sha256(b'from-file').hexdigest()}\n")
    monkeypatch.setenv("OMNISTAGE_API_KEYS", "key-one, key-two")
    # An app of its own (text only, so it starts quickly): a failure here leaves the shared app alone.
    data = load_config("tiny").model_dump()
    data["stages"] = {"llm": data["stages"]["llm"]}
    data["server"]["api_key_hashes_file"] = str(digests)
    deploy(OmnistageConfig.model_validate(data), name="keyed", route_prefix="/keyed")
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    try:
        with httpx.Client(base_url=f"{serve_url}/keyed", timeout=120) as keyed:
            assert keyed.get("/healthz").status_code == 200
            for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic key-one"}):
                refused = keyed.get("/v1/models", headers=headers)
                assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
                assert refused.json()["error"]["message"] == "invalid or missing API key"
            assert keyed.post("/v1/chat/completions", json=chat).status_code == 401
            for key in ("key-one", "key-two", "from-file"):
                assert keyed.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
            answer = keyed.post("/v1/chat/completions", json=chat, headers={"Authorization": "Bearer key-two"})
            assert answer.status_code == 200, answer.text
    finally:
        serve.delete("keyed")


def test_a_projector_placed_in_the_encoder_pool_answers_the_same(serve_url, pipeline):
    from ray import serve

    from omnistage.cluster.config import OmnistageConfig, load_config
    from omnistage.pipelines.serve import deploy

    # An app of its own: image in, text out, the input projector inside the image encoder's replicas.
    data = load_config("tiny").model_dump()
    data["stages"] = {name: data["stages"][name] for name in ("image_encoder", "input_projector", "llm")}
    data["stages"]["input_projector"]["placement"] = "encoders"
    deploy(OmnistageConfig.model_validate(data), name="fused", route_prefix="/fused")
    try:
        deployments = serve.status().applications["fused"].deployments
        assert set(deployments) == {"ingress", "image_encoder", "llm"}
        ports = serve.get_deployment_handle("image_encoder", "fused").ports.remote().result()
        assert set(ports) == {"image_encoder", "input_projector"}
        with httpx.Client(base_url=f"{serve_url}/fused", timeout=120) as fused:
            served = fused.post("/v1/chat/completions", json=_chat(IMAGE)).json()
        local = pipeline.chat(_chat(IMAGE)["messages"], max_tokens=6, seed=0)
        assert served["choices"][0]["message"]["content"] == local.text
        assert served["usage"]["prompt_tokens"] == local.usage["prompt_tokens"]
    finally:
        serve.delete("fused")


def test_pools_follow_a_shifting_mix_under_the_utilisation_policy(serve_url, running_replicas, wait_until):
    """Video questions, then image generations: the video encoder pool grows, then the image
    generator pool grows while the encoder pool shrinks back."""
    from ray import serve

    from omnistage.cluster.config import OmnistageConfig, load_config
    from omnistage.pipelines.serve import deploy

    data = load_config("tiny").model_dump()
    names = ("video_encoder", "input_projector", "llm", "output_projector", "image_generator")
    data["stages"] = {name: data["stages"][name] for name in names}
    for name in ("video_encoder", "image_generator"):
        data["stages"][name]["scaling"].update(
            policy="utilisation", min_replicas=1, max_replicas=2, target_utilisation=0.5,
            upscale_delay_s=0.5, downscale_delay_s=3, metrics_interval_s=0.5, look_back_period_s=2,
        )
    deploy(OmnistageConfig.model_validate(data), name="mix", route_prefix="/mix")
    statuses: list[int] = []
    stop = threading.Event()

    def load(body):
        with httpx.Client(base_url=f"{serve_url}/mix", timeout=120) as c:
            while not stop.is_set():
                statuses.append(c.post("/v1/chat/completions", json=body).status_code)

    def phase(body, condition):
        stop.clear()
        threads = [threading.Thread(target=load, args=(body,)) for _ in range(6)]
        for t in threads:
            t.start()
        try:
            return wait_until(condition, 180)  # replicas load while the others keep both cores busy
        finally:
            stop.set()
            for t in threads:
                t.join()

    def running():
        return {name: running_replicas(name, "mix") for name in ("video_encoder", "image_generator")}

    question = _chat(VIDEO, max_tokens=2)
    draw = {"messages": [{"role": "user", "content": "Draw a red circle."}], "max_tokens": 4, "seed": 0, "modalities": ["text", "image"]}
    try:
        assert phase(question, lambda: running()["video_encoder"] == 2), f"video questions: {running()}"
        assert phase(draw, lambda: running() == {"video_encoder": 1, "image_generator": 2}), f"generations: {running()}"
        assert statuses and set(statuses) == {200}, sorted(set(statuses))
    finally:
        serve.delete("mix")
