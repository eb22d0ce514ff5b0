"""Faults, overload and hostile input against the live Serve app (see docs/reliability.md)."""

import base64
import concurrent.futures
import contextlib
import io
import json
import os
import signal
import time

import httpx
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from omnistage.actors.media import encode_png, encode_video
from omnistage.pipelines.demo import sample_image, sample_video
from omnistage.pipelines.serve import APP_NAME

pytestmark = pytest.mark.slow


def _gcs_address():
    import ray

    return ray.get_runtime_context().gcs_address


def _replica_actors() -> dict[str, dict[str, int]]:
    """Deployment -> {replica actor name: pid} of the session app's live replicas."""
    from ray.util.state import list_actors

    prefix = f"ServeReplica:{APP_NAME}:"
    found: dict[str, dict[str, int]] = {}
    for actor in list_actors(address=_gcs_address(), filters=[("state", "=", "ALIVE")], detail=True, limit=10_000):
        if actor.class_name.startswith(prefix):
            found.setdefault(actor.class_name.removeprefix(prefix), {})[actor.name] = actor.pid
    return found


@contextlib.contextmanager
def _paused(pid: int):
    """A stopped replica still accepts calls but runs none, so the test decides when the next stage
    reads what the previous one produced."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        # Serve may have ended the process meanwhile: a replica stopped past its health checks.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def _kill_replica(deployment: str, pid: int, wait_until) -> None:
    """SIGKILL, as the OOM killer or a crash would; returns once Ray knows the actor is dead."""
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: pid not in _replica_actors().get(deployment, {}).values(), 30)


def _replaced(deployment: str, running_replicas) -> bool:
    """The one replica of ``deployment`` is a new actor, and running (checked after the old one died)."""
    return len(_replica_actors().get(deployment, {})) == 1 == running_replicas(deployment)


def _chat(serve_url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{serve_url}/v1/chat/completions", json=body, timeout=120)


def test_killing_the_llm_replica_under_load_loses_no_request(serve_url, serve_config, running_replicas, wait_until):
    """RELIABILITY row 1: in-flight requests fail fast as a retryable 503, the SDK retries them."""
    import ray
    from ray import serve

    from omnistage.clients import Client

    llm = serve.get_deployment_handle("llm", "omnistage")
    assert running_replicas("llm") == serve_config.stages.llm.scaling.min_replicas
    victim = llm.stats.remote().result()["actor_name"]
    image = sample_image()

    def one(i):
        with Client(serve_url, max_retries=10, timeout=240) as client:
            return isinstance(client.caption(image, prompt=f"request {i}", max_tokens=24), str)

    with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
        futures = [pool.submit(one, i) for i in range(50)]
        time.sleep(2)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        succeeded = [f.result() for f in futures]
    assert succeeded == [True] * 50
    # The controller replaces the replica: the pool is back at its size, on a new actor.
    assert wait_until(lambda: running_replicas("llm") >= serve_config.stages.llm.scaling.min_replicas, 120)
    assert llm.stats.remote().result()["actor_name"] != victim


def _kill_between_stages(serve_url: str, body: dict, producer: str, reader: str, wait_until) -> httpx.Response:
    """Posts ``body`` with the ``reader`` pool stopped, SIGKILLs the ``producer`` replica once it has
    handled the request, then lets ``reader`` go on: what it reads has outlived its producer."""
    from ray import serve

    handle = serve.get_deployment_handle(producer, APP_NAME)
    actors = _replica_actors()
    ((producer_pid,), (reader_pid,)) = (actors[producer].values(), actors[reader].values())
    handled = handle.stats.remote().result()["items"]
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        with _paused(reader_pid):
            answer = pool.submit(_chat, serve_url, body)
            assert wait_until(lambda: handle.stats.remote().result()["items"] > handled, 30)
            _kill_replica(producer, producer_pid, wait_until)
        return answer.result()


def test_killing_an_encoder_after_it_produced_features_loses_nothing(serve_url, running_replicas, wait_until):
    """RELIABILITY row 2, encoder side: the ingress made the encoder call, so the ingress owns its
    output; the features (here 144 KB, so in the node's object store) outlive the encoder."""
    video = base64.b64encode(encode_video(sample_video(n_frames=6, size=40), fps=4)).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{video}"}}]}], "max_tokens": 2}
    response = _kill_between_stages(serve_url, body, "video_encoder", "input_projector", wait_until)
    assert response.status_code == 200, response.text
    assert wait_until(lambda: _replaced("video_encoder", running_replicas), 120)


def test_killing_the_llm_after_it_answered_loses_nothing(serve_url, running_replicas, wait_until):
    """RELIABILITY row 2, LLM side: the LLM streams its signal groups to the ingress, and the caller
    of a stream owns what it yields, so the LLM replica killed once it has answered, before the
    output projector read the groups, costs the request nothing."""
    body = {"messages": [{"role": "user", "content": "a red circle"}], "max_tokens": 2, "modalities": ["text", "image"], "seed": 0}
    response = _kill_between_stages(serve_url, body, "llm", "output_projector", wait_until)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["media"][0]["type"] == "image"
    assert wait_until(lambda: _replaced("llm", running_replicas), 120)


def test_overloaded_pool_answers_503_with_retry_after(serve_url, serve_config, running_replicas, wait_until):
    """RELIABILITY row 5: a full queue refuses at once; the queued requests complete. The pool's
    replicas are stopped while the requests arrive, so its queue fills however the stages before
    it pace them."""
    body = {"prompt": "a bell", "seed": 0}
    # Every replica of the pool is the one stopped below: none still starting or stopping.
    minimum = serve_config.stages.audio_generator.scaling.min_replicas
    assert wait_until(lambda: running_replicas("audio_generator") == minimum == len(_replica_actors()["audio_generator"]), 120)

    def one(_):
        with httpx.Client(timeout=120) as c:
            return c.post(f"{serve_url}/v1/audio/generations", json=body)

    with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool, contextlib.ExitStack() as stopped:
        for pid in _replica_actors()["audio_generator"].values():
            stopped.enter_context(_paused(pid))
        futures = [pool.submit(one, i) for i in range(12)]
        # Refused at once: answered while the pool cannot run anything.
        assert wait_until(lambda: any(f.done() for f in futures), 60)
        stopped.close()
        responses = [f.result() for f in futures]
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 503}, codes  # excess refused, the queued ones completed
    refused = next(r for r in responses if r.status_code == 503)
    assert int(refused.headers["retry-after"]) >= 1 and refused.json()["error"]["type"] == "overloaded_error"


def test_health_stays_green_after_faults(client):
    assert client.get("/healthz").status_code == 200


def test_object_store_returns_to_baseline_after_many_requests(serve_url, wait_until):
    """RELIABILITY row 6: features and signal states are freed once their request is answered."""
    from ray.util.state import summarize_objects

    def store_bytes():
        summary = summarize_objects(address=_gcs_address(), raise_on_missing_output=False)["cluster"]["summary"]
        return sum(group["total_size_mb"] for group in summary.values())

    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(encode_png(sample_image(96))).decode()}}
    body = {"messages": [{"role": "user", "content": [image, {"type": "text", "text": "?"}]}], "max_tokens": 2, "modalities": ["text", "image"]}

    def one(_):
        with httpx.Client(timeout=120) as c:
            return c.post(f"{serve_url}/v1/chat/completions", json=body).status_code

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(one, range(20)))  # warm-up
    baseline = store_bytes()
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        codes = list(pool.map(one, range(300)))
    assert codes == [200] * 300
    assert wait_until(lambda: store_bytes() <= baseline + 1.0, 60), (baseline, store_bytes())


# Hostile input: whatever the bytes, a 4xx and never a 500; the server stays healthy.

_PARTS = {
    "image": lambda data: {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}},
    "video": lambda data: {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(data).decode()}},
    "audio": lambda data: {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": "wav"}},
}


def _mutated_png(data: bytes, position: int, value: int) -> bytes:
    png = bytearray(encode_png(sample_image(16)))
    png[position % len(png)] = value
    return bytes(png) + data


# derandomize: the same examples on every run, so the suite stays deterministic.
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kind=st.sampled_from(sorted(_PARTS)),
    data=st.binary(max_size=256),
    position=st.integers(0, 400),
    value=st.integers(0, 255),
)
def test_fuzzed_media_never_cause_a_500(client, kind, data, position, value):
    payload = _mutated_png(data, position, value) if kind == "image" else data
    body = {"messages": [{"role": "user", "content": [_PARTS[kind](payload)]}], "max_tokens": 1}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code in (200, 400, 413, 415), response.text


JSON, MSGPACK = "application/json", "application/msgpack"


def _assert_clean(response: httpx.Response) -> None:
    """A 2xx, or a 4xx in OpenAI's error shape; never a 5xx, in the status or in a stream's events."""
    if response.status_code < 300:
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            events = [json.loads(line[5:]) for line in response.text.splitlines() if line.startswith("data: {")]
            codes = [event["error"]["code"] for event in events if "error" in event]
            assert all(400 <= code < 500 for code in codes), codes
        return
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str), error
    assert error["code"] == response.status_code, error


def _encodings(body) -> list[tuple[bytes, str]]:
    """``body`` in each encoding that can carry it: JSON has no bytes, msgpack no integer past 64 bits."""
    encoded = []
    with contextlib.suppress(TypeError, ValueError):  # ValueError: too deep to encode
        encoded.append((json.dumps(body).encode(), JSON))  # NaN and Infinity as Python writes them
    with contextlib.suppress(TypeError, ValueError, OverflowError):
        encoded.append((msgpack.packb(body, use_bin_type=True), MSGPACK))
    return encoded


_LEAVES = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20) | st.sampled_from([2**64, -(2**63) - 1, 10**40, float("nan"), float("inf"), "\x00", ""])
)
_NESTED = st.recursive(
    _LEAVES, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20
)


# derandomize: the same examples on every run, so the suite stays deterministic.
@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(st.binary(max_size=300), _NESTED))
def test_fuzzed_bodies_never_cause_a_500(client, body):
    """Random bytes as either content type; random values as the whole body and as a message's
    content, in JSON and in msgpack."""
    if isinstance(body, bytes):
        requests = [(body, JSON), (body, MSGPACK)]
    else:
        requests = _encodings(body) + _encodings({"messages": [{"role": "user", "content": body}], "max_tokens": 1})
    for content, content_type in requests:
        _assert_clean(client.post("/v1/chat/completions", content=content, headers={"Content-Type": content_type}))


_TINY_PNG = encode_png(sample_image(8))
_CHAT_BODY = {
    "model": "omnistage-tiny",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(_TINY_PNG).decode(), "detail": "low"}},
        ]},
        {"role": "assistant", "content": [{"type": "text", "text": "A picture."}]},
        {"role": "user", "content": "And now?"},
    ],
    "max_tokens": 1, "max_completion_tokens": 1, "temperature": 0, "top_p": 1, "seed": 0, "stop": ["\n"], "n": 1,
    "stream": False, "stream_options": {"include_usage": True}, "modalities": ["text"],
}
_GENERATION_BODY = {"prompt": "a red circle", "model": "omnistage-tiny", "n": 1, "seed": 0, "response_format": "b64_json", "size": "64x64"}


def _paths(value, prefix=()):
    """Every place in ``value`` a field or an item sits, as a path of keys and indices."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield (*prefix, key)
        yield from _paths(child, (*prefix, key))


def _replaced(body, path, value):
    body = json.loads(json.dumps(body))
    *parents, last = path
    target = body
    for key in parents:
        target = target[key]
    target[last] = value
    return body


_ROUTES = {"/v1/chat/completions": _CHAT_BODY, "/v1/images/generations": _GENERATION_BODY}
_FIELDS = [(route, path) for route, body in _ROUTES.items() for path in _paths(body)]


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(_FIELDS), value=_NESTED | st.integers(1, 400).map(lambda depth: json.loads("[" * depth + "]" * depth)))
def test_a_wrong_value_at_any_field_is_a_4xx(client, field, value):
    """Every field of a valid chat and generation body, down to each content part's URL, replaced
    by a value of any type (huge integers, NaN, bytes, nested lists), in JSON and in msgpack."""
    route, path = field
    body = _replaced(_ROUTES[route], path, value)
    for content, content_type in _encodings(body):
        _assert_clean(client.post(route, content=content, headers={"Content-Type": content_type}))


_DEEP = 100_000
_CHAT_PREFIX = b'{"messages": [{"role": "user", "content": '
_HOSTILE = {
    "json-deep-lists": (b"[" * _DEEP + b"]" * _DEEP, JSON),
    "json-deep-objects": (b'{"a":' * _DEEP + b"1" + b"}" * _DEEP, JSON),
    "json-deep-content": (_CHAT_PREFIX + b"[" * _DEEP + b"]" * _DEEP + b"}]}", JSON),
    "msgpack-deep-arrays": (b"\x91" * _DEEP + b"\xc0", MSGPACK),
    "msgpack-deep-maps": (b"\x81\xa1a" * _DEEP + b"\xc0", MSGPACK),
    # Headers declaring 4 GiB or 4 billion items, followed by a few bytes.
    "msgpack-str32-4gib": (b"\xdb\xff\xff\xff\xffabc", MSGPACK),
    "msgpack-bin32-4gib": (b"\xc6\xff\xff\xff\xffabc", MSGPACK),
    "msgpack-ext32-4gib": (b"\xc9\xff\xff\xff\xff\x01abc", MSGPACK),
    "msgpack-array32-4g-items": (b"\xdd\xff\xff\xff\xff\xc0", MSGPACK),
    "msgpack-map32-4g-items": (b"\xdf\xff\xff\xff\xff\xa1a\xc0", MSGPACK),
    "msgpack-huge-messages-array": (b"\x81\xa8messages\xdd\xff\xff\xff\xff" + b"\xc0" * 16, MSGPACK),
    "json-not-utf8": (_CHAT_PREFIX + b'"caf\xe9 \xff\xfe"}]}', JSON),
    "msgpack-not-utf8": (b"\x81\xa8messages\x91\x82\xa4role\xa4user\xa7content\xa2\xff\xfe", MSGPACK),
    "json-lone-surrogate": (_CHAT_PREFIX + rb'"\ud800"}], "max_tokens": 1}', JSON),
    "json-nan": (_CHAT_PREFIX + b'"hi"}], "temperature": NaN}', JSON),
    "json-infinity": (_CHAT_PREFIX + b'"hi"}], "seed": Infinity}', JSON),
    "json-minus-infinity": (_CHAT_PREFIX + b'"hi"}], "top_p": -Infinity}', JSON),
    "json-float-overflow": (_CHAT_PREFIX + b'"hi"}], "temperature": 1e999}', JSON),
    "json-5000-digit-int": (_CHAT_PREFIX + b'"hi"}], "max_tokens": 1' + b"0" * 5000 + b"}", JSON),
    "json-seed-past-64-bits": (_CHAT_PREFIX + b'"hi"}], "max_tokens": 1, "seed": 18446744073709551616}', JSON),
    "json-duplicate-keys": (b'{"messages": [{"role": "user", "content": "hi"}], "messages": 5}', JSON),
    "msgpack-top-seed": (msgpack.packb({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "seed": 2**64 - 1}), MSGPACK),
    "msgpack-bytes-keys": (msgpack.packb({b"messages": [{b"role": b"user", b"content": b"hi"}]}, use_bin_type=True), MSGPACK),
    "msgpack-ext-as-image": (
        msgpack.packb({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": msgpack.ExtType(5, b"x" * 9)}]}]}),
        MSGPACK,
    ),
    "msgpack-timestamp-as-audio": (
        msgpack.packb({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": msgpack.Timestamp(0)}]}]}),
        MSGPACK,
    ),
    "msgpack-trailing-bytes": (msgpack.packb({"messages": [{"role": "user", "content": "hi"}]}) + b"\xc0", MSGPACK),
    "json-empty": (b"", JSON),
    "msgpack-empty": (b"", MSGPACK),
    "json-null": (b"null", JSON),
}


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/images/generations"])
def test_hostile_bodies_get_a_4xx_in_openais_shape(client, route):
    """Deep nesting, huge declared lengths, text that is not UTF-8, NaN and Infinity, numbers
    past any field's range, duplicate keys, extension types: each a 4xx, the server healthy after."""
    answers = {name: client.post(route, content=content, headers={"Content-Type": content_type}) for name, (content, content_type) in _HOSTILE.items()}
    for name, response in answers.items():
        assert 400 <= response.status_code < 500, (name, response.status_code, response.text[:300])
        _assert_clean(response)
    if route == "/v1/chat/completions":
        messages = {name: answers[name].json()["error"]["message"] for name in ("json-deep-lists", "json-nan", "json-lone-surrogate", "json-seed-past-64-bits")}
        assert "nest too deeply" in messages["json-deep-lists"]
        assert "got NaN, which JSON does not have" in messages["json-nan"]
        assert "do not parse as UTF-8 JSON" in messages["json-lone-surrogate"]
        assert "seed" in messages["json-seed-past-64-bits"]
    seed = client.post("/v1/images/generations", json={"prompt": "x", "seed": 2**64})
    assert seed.status_code == 400 and "seed" in seed.json()["error"]["message"]
    assert client.get("/healthz").status_code == 200


def test_decompression_bomb_and_deep_nesting_are_refused_without_decoding(client):
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, format="PNG")  # 400 megapixels in a few KB
    response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [_PARTS["image"](bomb.getvalue())]}]})
    assert response.status_code == 413 and "pixels" in response.json()["error"]["message"]
    nested = b"\x91" * 5000 + b"\xc0"  # 5000 nested msgpack arrays
    response = client.post("/v1/chat/completions", content=nested, headers={"Content-Type": "application/msgpack"})
    assert response.status_code == 400
    many = [_PARTS["image"](encode_png(sample_image(8)))] * 9
    response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": many}]})
    assert response.status_code == 400 and "at most 8 media items" in response.json()["error"]["message"]
    assert client.get("/healthz").status_code == 200


def test_a_request_past_its_deadline_gets_408_and_the_server_carries_on(client, serve_config):
    """RELIABILITY row 4: a stage that takes too long costs a 408; downstream calls are cancelled."""
    from omnistage.pipelines.serve import deploy

    hurried = serve_config.model_copy(update={"server": serve_config.server.model_copy(update={"request_timeout_s": 0.3})})
    # Serve restarts every deployment on a redeploy, not only the ingress whose setting changed.
    deploy(hurried)
    try:
        slow = {"messages": [{"role": "user", "content": "write a long story"}], "max_tokens": 1024, "temperature": 0}
        start = time.monotonic()
        response = client.post("/v1/chat/completions", json=slow)
        assert response.status_code == 408 and response.json()["error"]["type"] == "timeout_error"
        assert time.monotonic() - start < 10
    finally:
        deploy(serve_config)
    quick = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert client.post("/v1/chat/completions", json=quick).status_code == 200



def test_a_worker_stuck_past_its_limit_fails_the_health_check(ray_session, tiny_preset):
    """RELIABILITY row 3, the check: ``check_health`` raises while the worker thread is on a call
    older than ``stuck_after_s``, and passes again once it returns."""
    import asyncio

    from omnistage.cluster.config import load_config
    from omnistage.pipelines.deployments import StageServer

    config = load_config("tiny").stages.output_projector.model_copy(update={"stuck_after_s": 0.2})
    server = StageServer("output_projector", config.model_dump(mode="json"))

    async def scenario():
        server.check_health()
        call = asyncio.ensure_future(server._on_worker(time.sleep, 1.0))  # a call that will not return in time
        await asyncio.sleep(0.5)
        with pytest.raises(RuntimeError, match=r"expected the output_projector worker to finish a call within stuck_after_s=0.2, got one running for"):
            server.check_health()
        await call
        server.check_health()

    asyncio.run(scenario())


def test_a_failing_health_check_replaces_that_replica_and_no_other(serve_url, serve_config, running_replicas, wait_until):
    """RELIABILITY row 3, the replacement: the audio encoder's checks (every 1 s, 2 s to answer in
    the session config) fail while its process is stopped; Serve replaces that replica, every other
    pool keeps its replicas, and an audio question succeeds."""
    from omnistage.actors.media import encode_wav
    from omnistage.pipelines.demo import sample_audio

    assert serve_config.stages.audio_encoder.health.timeout_s <= 2
    before = _replica_actors()
    ((victim, pid),) = before["audio_encoder"].items()
    with _paused(pid):
        assert wait_until(lambda: _replica_actors().get("audio_encoder", {}).keys() - {victim} and running_replicas("audio_encoder") == 1, 60)
    assert wait_until(lambda: victim not in _replica_actors().get("audio_encoder", {}), 60)
    after = _replica_actors()
    assert len(after["audio_encoder"]) == 1
    assert {name: replicas for name, replicas in after.items() if name != "audio_encoder"} == {
        name: replicas for name, replicas in before.items() if name != "audio_encoder"
    }
    audio = base64.b64encode(encode_wav(*sample_audio())).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}}]}], "max_tokens": 2}
    assert _chat(serve_url, body).status_code == 200
