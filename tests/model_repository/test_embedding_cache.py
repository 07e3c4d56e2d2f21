"""The query encoder's embedding cache (model_repository/backends/embedding_cache.py) and its
metrics counters, outside Triton."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest

sys.modules.setdefault("triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))

from model_repository.backends import text_encoder  # noqa: E402
from model_repository.backends.embedding_cache import EmbeddingCache  # noqa: E402

pytestmark = pytest.mark.unit


class CountingEncoder:
    """A stand-in encoder (text -> a row derived from its length) that records what it was asked."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return np.array([[len(t), 1.0, -1.0] for t in texts], dtype=np.float32)


def test_only_texts_not_seen_before_are_encoded_once_each_in_request_order():
    cache, enc = EmbeddingCache(10), CountingEncoder()
    first = cache.encode(["shoes", "red shoes", "shoes"], enc)
    assert enc.calls == [["shoes", "red shoes"]]
    np.testing.assert_array_equal(first[:, 0], [5, 9, 5])
    second = cache.encode(["red shoes", "tent", "shoes"], enc)
    assert enc.calls[1:] == [["tent"]]
    np.testing.assert_array_equal(second[:, 0], [9, 4, 5])
    assert (cache.hits, cache.misses) == (2, 3)


def test_least_recently_used_goes_first():
    cache, enc = EmbeddingCache(2), CountingEncoder()
    cache.encode(["a"], enc)
    cache.encode(["bb"], enc)
    cache.encode(["a"], enc)  # a is now the most recent
    cache.encode(["ccc"], enc)  # evicts bb
    assert len(cache) == 2
    cache.encode(["a", "bb"], enc)
    assert enc.calls[-1] == ["bb"]


def test_zero_capacity_stores_nothing_and_negative_is_refused():
    cache, enc = EmbeddingCache(0), CountingEncoder()
    cache.encode(["a"], enc)
    cache.encode(["a"], enc)
    assert enc.calls == [["a"], ["a"]] and len(cache) == 0
    with pytest.raises(ValueError, match="capacity"):
        EmbeddingCache(-1)


def test_stored_rows_are_copies_the_caller_cannot_change():
    cache = EmbeddingCache(4)
    batch = np.ones((1, 3), dtype=np.float32)
    cache.encode(["a"], lambda texts: batch)
    batch[:] = 7.0  # e.g. the encoder reusing its output buffer
    np.testing.assert_array_equal(cache.encode(["a"], CountingEncoder()), np.ones((1, 3), dtype=np.float32))


class FakeMetric:
    def __init__(self):
        self.value = 0

    def increment(self, n):
        self.value += n


class FakeFamily:
    COUNTER = "counter"

    def __init__(self, name, description, kind):
        self.metrics: dict = {}

    def Metric(self, labels):  # noqa: N802 (Triton's name)
        return self.metrics.setdefault(tuple(sorted(labels.items())), FakeMetric())


def test_counters_reach_the_server_in_batches_and_lag_at_most_a_flush(monkeypatch):
    monkeypatch.setattr(text_encoder.pb_utils, "MetricFamily", FakeFamily, raising=False)
    clock = [100.0]
    monkeypatch.setattr(text_encoder.time, "monotonic", lambda: clock[0])
    counters = text_encoder.CacheCounters("query_encoder", "query_encoder_0", flush_every=4, flush_s=1.0)
    hit, miss = counters.metrics
    counters.update(1, 1)
    assert (hit.value, miss.value) == (0, 0)  # 2 pending, under both bounds
    counters.update(3, 1)
    assert (hit.value, miss.value) == (3, 1)  # 4 pending: sent
    counters.update(4, 1)
    clock[0] += 1.5
    counters.update(4, 2)  # a second passed: sent whatever is pending
    assert (hit.value, miss.value) == (4, 2)


def test_counters_are_silent_without_custom_metrics(monkeypatch):
    monkeypatch.delattr(text_encoder.pb_utils, "MetricFamily", raising=False)
    counters = text_encoder.CacheCounters("query_encoder", "query_encoder_0")
    counters.update(10, 10)  # nothing to send to, nothing raised
    assert counters.metrics is None
