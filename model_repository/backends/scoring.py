"""The ranker's ORT feeds for a merged batch of requests, built in reused arrays and run in groups
of at most `max_rows` padded candidate rows.

The session is the request form of the ranker graph (backends/ranker_graph.py): a run takes R
requests' query embeddings [R, d] once each and their candidates' item rows as one block
[R, M, d] in the catalog's storage precision, every request padded to the run's longest with the
catalog's cold-start row, whose scores are dropped. Requests are grouped in order of size, so a
run pads little: a group closes when its block would pass `max_rows` or hold more padding than
real rows.

Why groups: one 8000-row call (8 merged requests of 1000 candidates) pushes tens of MB of item and
intermediate rows through the cache, and measured 0.96 ms per request against 0.59 ms in runs of
at most 1024 rows (one core, the default ranker; docs/architecture.md). Small requests still share
one call: eight of 100 candidates cost 0.049 ms each together, 0.075 ms one by one.
Why reused arrays: fresh multi-megabyte arrays per batch come from mmap'd memory that the kernel
zero-fills page by page on every execution.

The graph scores each row from that row and its request's query alone, so neither grouping,
merging nor padding changes a score.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from model_repository import spec
from model_repository.backends.ranker_graph import ITEM, QUERY, SCALE


def request_groups(counts: Sequence[int], max_rows: int) -> list[list[int]]:
    """Indices of the requests scored together, in order of size (ties in request order): a group
    grows while its padded block (requests x its longest) stays within `max_rows` and at most twice
    its real rows; a request longer than `max_rows` is a group of its own."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    groups: list[list[int]] = []
    current: list[int] = []
    rows = 0
    for i in sorted(range(len(counts)), key=lambda i: counts[i]):
        n = counts[i]
        padded = (len(current) + 1) * n  # n is the group's longest: sizes ascend
        if current and (padded > max_rows or padded > 2 * (rows + n)):
            groups.append(current)
            current, rows = [], 0
        current.append(i)
        rows += n
    if current:
        groups.append(current)
    return groups


class FeedBuffers:
    """Arrays kept between executions, one per ORT input, grown when a batch needs more rows
    (or when a catalog swap changes a column's dtype); a run's feeds are leading-row views."""

    def __init__(self):
        self._arrays: dict[str, np.ndarray] = {}

    def rows(self, name: str, n: int, cols: int, dtype) -> np.ndarray:
        array = self._arrays.get(name)
        if array is None or array.shape[0] < n or array.shape[1] != cols or array.dtype != dtype:
            array = np.empty((max(n, 1), cols), dtype=dtype)
            self._arrays[name] = array
        return array[:n]


class RankerScorer:
    """Click probabilities for a batch of (query [d], user id [1], candidates [N]) requests, from ORT
    sessions of the request form of the ranker graph: `sessions(storage)` gives the one for item rows
    stored as `storage` (backends/ranker_graph.RequestSessions)."""

    def __init__(self, sessions, max_rows: int):
        self.sessions = sessions
        self.max_rows = max_rows
        self.buffers = FeedBuffers()

    def score(self, tables, batch: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> np.ndarray:
        """Probabilities of every request's candidates, rows in batch order."""
        counts = [len(c) for _, _, c in batch]
        starts = np.cumsum([0] + counts[:-1])
        out = np.empty(sum(counts), dtype=np.float32)
        for group in request_groups(counts, self.max_rows):
            longest = max(counts[i] for i in group)
            probs = self._run(tables, [batch[i] for i in group], longest)
            for k, i in enumerate(group):
                out[starts[i]:starts[i] + counts[i]] = probs[k * longest:k * longest + counts[i]]
        return out

    def _run(self, tables, group, longest: int) -> np.ndarray:
        b = self.buffers
        r, n = len(group), len(group) * longest
        if r == 1:
            rows = tables.item_rows(group[0][2])
        else:
            found = tables.item_rows(np.concatenate([c for _, _, c in group]))
            rows = np.zeros(n, dtype=found.dtype)  # padding: the cold-start row 0, dropped after the run
            at = 0
            for k, (_, _, candidates) in enumerate(group):
                rows[k * longest:k * longest + len(candidates)] = found[at:at + len(candidates)]
                at += len(candidates)
        dim, stored = tables.embedding_dim, tables.item_embeddings
        # Gathered as stored (a float16 row is half the bytes, an int8 one a quarter) and widened in ORT.
        embeddings = b.rows(ITEM, n, dim, stored.dtype)
        np.take(stored, rows, axis=0, out=embeddings, mode="clip")  # rows are in range
        feeds = {ITEM: embeddings.reshape(r, longest, dim)}
        if tables.item_embedding_scales is not None:
            scales = b.rows(SCALE, n, 1, np.float32)
            np.take(tables.item_embedding_scales, rows, out=scales[:, 0], mode="clip")
            feeds[SCALE] = scales.reshape(r, longest, 1)
        features = b.rows(spec.ITEM_FEATURES.name, n, tables.item_features.shape[1], tables.item_features.dtype)
        np.take(tables.item_features, rows, axis=0, out=features, mode="clip")  # rows are in range
        queries = b.rows(QUERY, r, dim, np.float32)
        users = b.rows(spec.USER_FEATURES.name, n, tables.user_features.shape[1], tables.user_features.dtype)
        user_rows = tables.user_rows(np.concatenate([u for _, u, _ in group]))  # one id each (validated)
        for k, ((query, _, _), user_row) in enumerate(zip(group, user_rows)):
            queries[k] = query
            users[k * longest:(k + 1) * longest] = tables.user_features[user_row]
        feeds.update({QUERY: queries, spec.ITEM_FEATURES.name: features, spec.USER_FEATURES.name: users})
        session = self.sessions(stored.dtype.name)
        return session.run([spec.CLICK_PROB.name], feeds)[0].reshape(-1)
