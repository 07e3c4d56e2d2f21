"""A bounded LRU of text -> embedding inside the query encoder's stub.

Search traffic repeats its head queries, and a text's embedding depends on the text alone (the
served static INT8 graph gives a text the same embedding whatever it is batched or padded with,
tested), so a repeat can skip ONNX Runtime. The cache lives in the stub rather than in Triton's
response cache because Triton 2.51 inserts every response of a cached model, refusals included,
without their error: the second identical bad request came back as an empty success. Here only
embeddings of texts that passed validation are stored.

No pb_utils import: the class is plain Python, tested outside Triton.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np


class EmbeddingCache:
    """At most `capacity` texts; the least recently used goes first. capacity 0 stores nothing."""

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._rows: OrderedDict[str, np.ndarray] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, text: str) -> np.ndarray | None:
        row = self._rows.get(text)
        if row is None:
            self.misses += 1
            return None
        self._rows.move_to_end(text)
        self.hits += 1
        return row

    def put(self, text: str, row: np.ndarray) -> None:
        if self.capacity == 0:
            return
        # a copy: the caller's batch array must not stay alive for one row, nor be written later
        self._rows[text] = np.array(row, dtype=np.float32, copy=True)
        self._rows.move_to_end(text)
        while len(self._rows) > self.capacity:
            self._rows.popitem(last=False)

    def encode(self, texts: list[str], encode_missing) -> np.ndarray:
        """Embeddings [len(texts), d] of `texts`: stored rows where the cache has them, the rest from
        `encode_missing(list of distinct texts) -> [n, d]`, which are then stored."""
        found: dict[str, np.ndarray] = {}
        missing: dict[str, None] = {}  # ordered, each text once
        for text in texts:
            if text in found or text in missing:
                continue
            row = self.get(text)
            if row is None:
                missing[text] = None
            else:
                found[text] = row
        if missing:
            fresh = encode_missing(list(missing))
            for text, row in zip(missing, fresh):
                self.put(text, row)
                found[text] = row
        return np.stack([found[text] for text in texts]).astype(np.float32, copy=False)
