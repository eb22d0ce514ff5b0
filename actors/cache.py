"""A content-addressed cache of encoder outputs, shared through Redis or kept in process.

Keys hash the decoded input together with the stage's model and preprocessing settings, so two
models never share an entry. Values are msgpack maps of dtype, shape and raw bytes: nothing is
ever unpickled. A Redis outage turns into cache misses, logged once, and the cache reconnects by
itself when Redis returns.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections import OrderedDict
from typing import Any

import msgpack
import numpy as np
import structlog

from omnistage.actors.payloads import AudioClip, Features

log = structlog.get_logger(__name__)

# Features are float arrays; anything else in the store is not ours and is treated as a miss.
_DTYPES = {"float32", "float16", "float64"}


def encode_array(array: np.ndarray) -> bytes:
    return msgpack.packb({"dtype": str(array.dtype), "shape": list(array.shape), "data": array.tobytes()}, use_bin_type=True)


def decode_array(blob: bytes) -> np.ndarray | None:
    """The array in ``blob``, or None if it is not a well-formed entry."""
    try:
        entry = msgpack.unpackb(blob, raw=False)
        dtype, shape, data = np.dtype(entry["dtype"]), tuple(int(n) for n in entry["shape"]), entry["data"]
    except Exception:
        return None
    if dtype.name not in _DTYPES or int(np.prod(shape)) * dtype.itemsize != len(data):
        return None
    return np.frombuffer(data, dtype=dtype).reshape(shape)


class LocalCache:
    """An in-process LRU bounded by the bytes it holds."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self.failures = 0  # an in-process store does not fail; kept for a uniform stats view
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            blob = self._entries.get(key)
            if blob is not None:
                self._entries.move_to_end(key)
            return blob

    def put(self, key: str, blob: bytes) -> None:
        if len(blob) > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            self._size += len(blob) - (len(old) if old else 0)
            self._entries[key] = blob
            while self._size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._size -= len(evicted)


class RedisCache:
    """Redis shared by every replica on every node.

    After a failed command Redis is left alone for ``retry_s`` (requests take the miss path at
    once instead of each waiting on a timeout); the outage is logged once and its end once.
    """

    def __init__(self, url: str, ttl_s: int, retry_s: float = 2.0):
        import redis

        self._errors = (redis.RedisError, OSError)
        # Short timeouts: a slow cache must never cost more than recomputing the features.
        self.client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self.ttl_s = ttl_s
        self.retry_s = retry_s
        self._down_until = 0.0
        self._in_outage = False
        self.failures = 0

    def _call(self, command: str, *args: Any) -> Any:
        if time.monotonic() < self._down_until:
            return None
        try:
            result = getattr(self.client, command)(*args)
        except self._errors as exc:
            self.failures += 1
            self._down_until = time.monotonic() + self.retry_s
            if not self._in_outage:
                self._in_outage = True
                log.warning("feature_cache_unavailable", error=type(exc).__name__, retry_s=self.retry_s)
            return None
        if self._in_outage:
            self._in_outage = False
            log.info("feature_cache_recovered")
        return result

    def get(self, key: str) -> bytes | None:
        return self._call("get", key)

    def put(self, key: str, blob: bytes) -> None:
        self._call("set", key, blob, self.ttl_s)


class CachedEncoder:
    """Wraps an encoder stage: inputs seen before (by content) skip the model.

    Behaves as the stage it wraps (``check``, ``__call__``, ``config``, ``device``...). Only the
    misses of a batch go through the model, as one batch.
    """

    def __init__(self, stage: Any, store: LocalCache | RedisCache, max_value_bytes: int):
        self.stage = stage
        self.store = store
        self.max_value_bytes = max_value_bytes
        self._counts = {"hits": 0, "misses": 0, "bytes_read": 0, "bytes_written": 0}
        self._namespace = _namespace(stage)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stage, name)

    def key(self, item: Any) -> str:
        digest = hashlib.sha256(self._namespace)
        if isinstance(item, AudioClip):
            digest.update(f"rate={item.sampling_rate}".encode())
            item = item.samples
        array = np.ascontiguousarray(item)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(memoryview(array).cast("B"))
        return "omnistage:features:" + digest.hexdigest()

    def __call__(self, items: list[Any]) -> list[Features]:
        # Keys hash the decoded content: the same picture sent as PNG or as an array is one entry.
        items = [self.stage.prepare(item) for item in items]
        keys = [self.key(item) for item in items]
        results: list[Features | None] = []
        for item, key in zip(items, keys):
            blob = self.store.get(key)
            array = decode_array(blob) if blob is not None else None
            if array is None:
                results.append(None)
            else:
                self._counts["bytes_read"] += len(blob)
                # A tiling image encoder's features go with the image's size, which the decoded
                # image (the key's content) gives again.
                size = tuple(int(n) for n in item.shape[:2]) if getattr(self.stage, "tiles", False) else None
                results.append(Features(modality=self.stage.modality, features=array, image_size=size))
        misses = [i for i, result in enumerate(results) if result is None]
        self._counts["hits"] += len(items) - len(misses)
        self._counts["misses"] += len(misses)
        if misses:
            for i, features in zip(misses, self.stage([items[i] for i in misses])):
                results[i] = features
                blob = encode_array(features.features)
                if len(blob) <= self.max_value_bytes:
                    self.store.put(keys[i], blob)
                    self._counts["bytes_written"] += len(blob)
        return results

    def cache_stats(self) -> dict[str, int]:
        """Cumulative hits, misses, store errors and bytes moved, for metrics."""
        return {**self._counts, "errors": self.store.failures}


def _namespace(stage: Any) -> bytes:
    """What makes one encoder's features differ from another's for the same input: its checkpoint
    (path and config), class and settings."""
    config_file = stage.checkpoint / "config.json"
    model_config = config_file.read_bytes() if config_file.is_file() else b""
    settings = stage.config.model_dump(include={"model", "dtype", "feature_layer", "drop_cls", "num_frames"})
    identity = json.dumps({"class": type(stage).__name__, "checkpoint": str(stage.checkpoint), "settings": settings}, sort_keys=True)
    return identity.encode() + hashlib.sha256(model_config).digest()


def make_store(redis_url: str | None, ttl_s: int, local_max_bytes: int) -> LocalCache | RedisCache:
    """Redis when a URL is given (or ``OMNISTAGE_REDIS_URL`` is set), else an in-process LRU."""
    url = redis_url or os.environ.get("OMNISTAGE_REDIS_URL")
    return RedisCache(url, ttl_s) if url else LocalCache(local_max_bytes)
