"""The encoder feature cache: content keys, msgpack values, LRU bounds, Redis sharing and outages."""

import base64
import time

import msgpack
import numpy as np
import pytest
import redis
from structlog.testing import capture_logs

from omnistage.actors.cache import CachedEncoder, LocalCache, RedisCache, decode_array, encode_array
from omnistage.actors.media import encode_png
from omnistage.cluster.config import ImageEncoderConfig
from omnistage.pipelines.demo import sample_image

RNG = np.random.default_rng(0)


def test_values_are_msgpack_and_malformed_entries_are_misses():
    array = RNG.standard_normal((5, 3)).astype(np.float32)
    blob = encode_array(array)
    entry = msgpack.unpackb(blob)
    assert entry["dtype"] == "float32" and entry["shape"] == [5, 3] and isinstance(entry["data"], bytes)
    np.testing.assert_array_equal(decode_array(blob), array)
    assert decode_array(b"\x00garbage") is None
    assert decode_array(msgpack.packb({"dtype": "float32", "shape": [9, 9], "data": b"1234"})) is None
    assert decode_array(msgpack.packb({"dtype": "object", "shape": [1], "data": b"12345678"})) is None


def test_local_cache_evicts_least_recently_used_by_bytes():
    cache = LocalCache(max_bytes=10)
    cache.put("a", b"aaaa")
    cache.put("b", b"bbbb")
    assert cache.get("a") == b"aaaa"  # a is now the most recent
    cache.put("c", b"cccc")
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (b"aaaa", None, b"cccc")
    cache.put("huge", b"x" * 11)
    assert cache.get("huge") is None


@pytest.fixture(scope="module")
def encoder(tiny_preset):
    from omnistage.actors.image_encoder import ImageEncoder

    return ImageEncoder(ImageEncoderConfig())


def test_hits_return_the_encoders_own_output(encoder):
    cached = CachedEncoder(encoder, LocalCache(1 << 20), max_value_bytes=1 << 20)
    images = [sample_image(), RNG.integers(0, 256, (30, 30, 3), dtype=np.uint8)]
    first = cached(images)
    again = cached([images[1], images[0], images[1]])
    assert cached.cache_stats()["hits"] == 3 and cached.cache_stats()["misses"] == 2
    np.testing.assert_array_equal(again[1].features, first[0].features)
    # Batched and single forward passes agree to float rounding.
    np.testing.assert_allclose(again[1].features, encoder([images[0]])[0].features, atol=1e-5)
    np.testing.assert_array_equal(again[0].features, first[1].features)
    assert again[0].modality == "image"


def test_keys_separate_models_and_settings(encoder, tiny_preset):
    from omnistage.actors.image_encoder import ImageEncoder

    other_layer = ImageEncoder(ImageEncoderConfig(feature_layer=-1))
    store = LocalCache(1 << 20)
    a, b = CachedEncoder(encoder, store, 1 << 20), CachedEncoder(other_layer, store, 1 << 20)
    image = sample_image()
    assert a.key(image) != b.key(image)
    assert a.key(image) == CachedEncoder(encoder, LocalCache(1), 1).key(image.copy())
    assert a.key(image) != a.key(image[:, ::-1])


def _redis_encoder(encoder, url, ttl_s=60, max_value_bytes=1 << 20):
    return CachedEncoder(encoder, RedisCache(url, ttl_s), max_value_bytes)


def test_redis_is_shared_between_replicas(encoder, redis_server):
    redis.Redis.from_url(redis_server.url).flushall()
    image = RNG.integers(0, 256, (30, 30, 3), dtype=np.uint8)
    replica_a, replica_b = _redis_encoder(encoder, redis_server.url), _redis_encoder(encoder, redis_server.url)
    computed = replica_a([image])[0].features
    served = replica_b([image])[0].features
    assert replica_b.cache_stats()["hits"] == 1 and replica_b.cache_stats()["misses"] == 0
    np.testing.assert_array_equal(served, computed)
    key_ttl = redis.Redis.from_url(redis_server.url).ttl(replica_a.key(image))
    assert 0 < key_ttl <= 60


def test_redis_needs_the_password_and_bounds_values(encoder, redis_server):
    wrong = redis_server.url.replace(redis_server.password, "wrong")
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(wrong).get("x")
    unauthenticated = _redis_encoder(encoder, wrong)
    out = unauthenticated([sample_image()])  # refused by Redis: still answered, through the model
    assert out[0].features.shape == (225, 32) and unauthenticated.cache_stats()["errors"] == 1
    tiny_values = _redis_encoder(encoder, redis_server.url, max_value_bytes=100)
    image = RNG.integers(0, 256, (30, 30, 3), dtype=np.uint8)
    tiny_values([image])
    assert redis.Redis.from_url(redis_server.url).get(tiny_values.key(image)) is None


def test_outage_and_flush_fall_back_to_the_model_and_recover(encoder, redis_server):
    cached = CachedEncoder(encoder, RedisCache(redis_server.url, 60, retry_s=0.2), 1 << 20)
    image = RNG.integers(0, 256, (30, 30, 3), dtype=np.uint8)
    expected = cached([image])[0].features
    redis.Redis.from_url(redis_server.url).flushall()
    np.testing.assert_array_equal(cached([image])[0].features, expected)  # flushed: a miss, recomputed
    redis_server.stop()
    try:
        with capture_logs() as logs:
            for _ in range(5):
                np.testing.assert_array_equal(cached([image])[0].features, expected)
                time.sleep(0.1)
        warnings = [entry for entry in logs if entry["event"] == "feature_cache_unavailable"]
        assert len(warnings) == 1 and cached.cache_stats()["errors"] >= 1
    finally:
        redis_server.start()
    time.sleep(0.3)  # past the retry window
    hits_before = cached.cache_stats()["hits"]
    with capture_logs() as logs:
        cached([image])  # reconnects; the entry was lost with the server, so this stores it again
        cached([image])
    assert cached.cache_stats()["hits"] == hits_before + 1
    assert [entry["event"] for entry in logs] == ["feature_cache_recovered"]


@pytest.mark.slow
def test_a_repeated_image_skips_the_encoder_across_serve_replicas(client, redis_server):
    from ray import serve

    from omnistage.pipelines.serve import APP_NAME

    redis.Redis.from_url(redis_server.url).flushall()
    image = RNG.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    url = "data:image/png;base64," + base64.b64encode(encode_png(image)).decode()
    handle = serve.get_deployment_handle("image_encoder", APP_NAME)
    before = _per_replica(handle)
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}], "max_tokens": 2}
    for _ in range(20):
        assert client.post("/v1/chat/completions", json=body).status_code == 200
    after = _per_replica(handle)
    delta = {r: {k: after[r][k] - before.get(r, {}).get(k, 0) for k in ("hits", "misses")} for r in after}
    assert len(after) == 2
    assert sum(d["misses"] for d in delta.values()) == 1 and sum(d["hits"] for d in delta.values()) == 19
    # The replica that never encoded this image still answered from the cache.
    assert any(d["misses"] == 0 and d["hits"] > 0 for d in delta.values())


def _per_replica(handle, calls=40):
    """Cache totals of every replica (the handle spreads calls over them)."""
    seen = {}
    for _ in range(calls):
        stats = handle.stats.remote().result()
        seen[stats["replica"]] = stats["cache"]
    return seen
