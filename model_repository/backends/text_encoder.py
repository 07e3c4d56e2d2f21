"""Query encoder model (CPU): UTF-8 texts tokenized and encoded by ONNX Runtime in one step.

Tokenizing in its own model cost a python-backend crossing per request (about a millisecond of
CPU) to do 0.05 ms of work; here every text of a dynamic batch is tokenized at once and each
sequence bucket present in the batch is one ORT run, padded only to that group's longest text.
Texts of different lengths share a batch, since the model's input is the text, not padded ids.
A text seen before is answered from the instance's embedding cache (backends/embedding_cache.py).
"""
from __future__ import annotations

import time

import numpy as np
import triton_python_backend_utils as pb_utils

from model_repository import runtime, spec
from model_repository.backends.common import BadRequest, ModelContext, name_list
from model_repository.backends.embedding_cache import EmbeddingCache
from model_repository.backends.tokenizer import TextInput
from model_repository.runtime import ort_session


class CacheCounters:
    """The cache's hits and misses as Prometheus counters on Triton's metrics endpoint, labelled by
    model, instance (each instance's stub has its own cache) and result. Every increment is a
    message from the stub to the server, so they are sent at most once a second, or sooner once
    `flush_every` lookups are pending. Silent where this python backend has no custom metrics."""

    def __init__(self, model: str, instance: str, flush_every: int = 64, flush_s: float = 1.0):
        family_cls = getattr(pb_utils, "MetricFamily", None)
        self.family = self.metrics = None
        if family_cls is not None:
            # kept: the stub deletes a family with its last reference, and its metrics then fail
            self.family = family_cls(name=spec.CACHE_LOOKUPS_METRIC, kind=family_cls.COUNTER,
                                     description="query encoder embedding cache lookups, by result")
            labels = {"model": model, "instance": instance}
            self.metrics = (self.family.Metric(labels={**labels, "result": "hit"}),
                            self.family.Metric(labels={**labels, "result": "miss"}))
        self.flush_every, self.flush_s = flush_every, flush_s
        self.sent = (0, 0)
        self.sent_at = time.monotonic()

    def update(self, hits: int, misses: int) -> None:
        if self.metrics is None:
            return
        pending = (hits - self.sent[0], misses - self.sent[1])
        now = time.monotonic()
        if sum(pending) < self.flush_every and now - self.sent_at < self.flush_s:
            return
        for metric, n in zip(self.metrics, pending):
            if n:
                metric.increment(n)
        self.sent, self.sent_at = (hits, misses), now

    def close(self) -> None:
        # metrics before their family: the stub refuses the other order
        self.metrics = None
        self.family = None


class TritonPythonModel:
    def initialize(self, args):
        self.ctx = ModelContext(args)
        self.text = TextInput(self.ctx)
        self.session = ort_session(self.ctx.version_dir / runtime.ENCODER_FILE,
                                   int(self.ctx.param("intra_op_num_threads", "1")),
                                   disabled_optimizers=name_list(self.ctx.param("ort_disabled_optimizers", "")))
        self.output = self.session.get_outputs()[0].name
        self.cache = EmbeddingCache(int(self.ctx.param("cache_entries", "0")))
        self.cache_counters = CacheCounters(self.ctx.name, args.get("model_instance_name", self.ctx.name),
                                            flush_every=int(self.ctx.param("cache_metrics_every", "64")))
        # Warm every bucket so the first real request of each length is not the slow one, and the
        # largest batch at the longest bucket so ORT's arena already holds the peak it will need.
        max_batch = max(1, int(self.ctx.config.get("max_batch_size", 1)))
        for shape in [(1, length) for length in self.text.buckets] + [(max_batch, self.text.buckets[-1])]:
            ones = np.ones(shape, dtype=np.int64)
            self._run(ones, ones)

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.session.run([self.output], {spec.INPUT_IDS.name: ids, spec.ATTENTION_MASK.name: mask})[0]

    def encode(self, texts: list[str]) -> np.ndarray:
        out = None
        # ORT on CPU runs any length: each group is padded to its longest text, not to its bucket.
        for rows, ids, mask in self.text.tokenizer.encode_grouped(texts, pad_to_bucket=False):
            emb = self._run(ids, mask)
            if out is None:
                out = np.empty((len(texts), emb.shape[1]), dtype=np.float32)
            out[rows] = emb
        return out

    def execute(self, requests):
        responses: list = [None] * len(requests)
        texts: list[str] = []
        owners: list[tuple[int, int]] = []  # (request index, how many texts it brought)
        for i, request in enumerate(requests):
            try:
                decoded = self.text.texts(request)
            except BadRequest as err:
                responses[i] = self.ctx.invalid(err)
                continue
            texts.extend(decoded)
            owners.append((i, len(decoded)))
        if texts:
            emb = self.cache.encode(texts, self.encode)
            self.cache_counters.update(self.cache.hits, self.cache.misses)
            start = 0
            for i, count in owners:
                responses[i] = pb_utils.InferenceResponse([pb_utils.Tensor(self.output, emb[start:start + count])])
                start += count
        return responses

    def finalize(self):
        self.cache_counters.close()
