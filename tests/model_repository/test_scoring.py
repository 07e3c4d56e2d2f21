"""The ranker's grouped, buffer-reusing scoring (model_repository/backends/scoring.py), on the request
form of the ranker graph, against a reference built here: the exported graph on one request per
ORT call, feeds made with np.repeat."""
from __future__ import annotations

import sys
import types

import numpy as np
import onnx
import pytest

sys.modules.setdefault("triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))

from model_repository import runtime, spec  # noqa: E402
from model_repository.backends.ranker_graph import RequestSessions  # noqa: E402
from model_repository.backends.scoring import FeedBuffers, RankerScorer, request_groups  # noqa: E402
from model_repository.runtime import CatalogTables, ort_session, stored_embeddings  # noqa: E402

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("counts, max_rows, want", [
    ([], 1024, []),
    ([1000, 1000, 1000], 1024, [[0], [1], [2]]),
    ([100] * 12, 1024, [list(range(10)), [10, 11]]),
    ([2000, 10, 1014, 1], 1024, [[3, 1], [2], [0]]),  # in order of size; 1 and 10: 20 rows padded
    ([5, 5], 1, [[0], [1]]),
    ([3, 4], 8, [[0, 1]]),
    ([250, 2, 100, 33], 1024, [[1, 3], [2, 0]]),  # 2, 33, 100 would pad 300 rows for 135
    ([90, 100, 80, 100], 1024, [[2, 0, 1, 3]]),
])
def test_request_groups(counts, max_rows, want):
    assert request_groups(counts, max_rows) == want


def test_request_groups_cover_every_request_once_within_the_budget():
    rng = np.random.default_rng(0)
    for _ in range(200):
        counts = rng.integers(1, 1500, int(rng.integers(0, 12))).tolist()
        max_rows = int(rng.integers(1, 3000))
        groups = request_groups(counts, max_rows)
        assert sorted(i for g in groups for i in g) == list(range(len(counts)))
        for g in groups:
            padded = len(g) * max(counts[i] for i in g)
            assert len(g) == 1 or (padded <= max_rows and padded <= 2 * sum(counts[i] for i in g))


def test_request_groups_refuses_an_empty_budget():
    with pytest.raises(ValueError, match="max_rows"):
        request_groups([1], 0)


def test_feed_buffers_are_reused_and_grown():
    b = FeedBuffers()
    first = b.rows("x", 10, 4, np.float32)
    assert first.shape == (10, 4)
    assert np.shares_memory(b.rows("x", 6, 4, np.float32), first)
    grown = b.rows("x", 20, 4, np.float32)
    assert grown.shape == (20, 4) and not np.shares_memory(grown, first)
    assert b.rows("x", 20, 4, np.int64).dtype == np.int64  # a catalog swap may change a column's type


def _reference(session, tables: CatalogTables, query, user, candidates) -> np.ndarray:
    n = len(candidates)
    rows = tables.item_rows(candidates)
    feeds = {spec.query_embedding(0).name: np.repeat(query[None, :], n, axis=0),
             spec.item_embedding(0).name: tables.embedding_rows(rows),
             spec.ITEM_FEATURES.name: np.ascontiguousarray(tables.item_features[rows]),
             spec.USER_FEATURES.name: np.repeat(tables.user_features[tables.user_rows(user)], n, axis=0)}
    return session.run(None, feeds)[0].reshape(-1)


@pytest.fixture(scope="module")
def ranker_session(ci_repository):
    return ort_session(ci_repository / spec.RANKER / "1" / runtime.RANKER_FILE, threads=1)


@pytest.fixture(scope="module")
def request_form(ci_repository, ranker_session):
    model = onnx.load(str(ci_repository / spec.RANKER / "1" / runtime.RANKER_FILE))
    return RequestSessions(model, ranker_session)


def _batch(tables: CatalogTables, sizes, seed: int):
    rng = np.random.default_rng(seed)
    dim = tables.embedding_dim
    pool = np.concatenate([tables.item_ids, np.arange(10**12, 10**12 + 50)])  # some unknown ids
    batch = []
    for k, size in enumerate(sizes):
        query = rng.normal(size=dim).astype(np.float32)
        user = np.array([int(rng.choice(tables.user_ids)) if k % 3 else 10**12 + k], np.int64)
        batch.append((query / np.linalg.norm(query), user, rng.choice(pool, size, replace=False).astype(np.int64)))
    return batch


@pytest.mark.parametrize("max_rows", [1, 64, 1024, 100_000])
def test_grouped_scores_equal_one_request_per_call(ranker_session, request_form, ci_models, max_rows):
    tables = CatalogTables.load(ci_models["catalog_artifact"])
    scorer = RankerScorer(request_form, max_rows)
    sizes = (1, 7, 1000, 33, 100, 250, 2, 1000)
    # Twice over, with different requests: reused buffers must not carry the first batch's rows.
    for seed in (1, 2):
        batch = _batch(tables, sizes, seed)
        got = scorer.score(tables, batch)
        want = np.concatenate([_reference(ranker_session, tables, *r) for r in batch])
        assert got.shape == (sum(sizes),)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_grouped_scores_from_a_compact_catalog(ranker_session, request_form, ci_models, tmp_path, dtype):
    full = CatalogTables.load(ci_models["catalog_artifact"], mmap=False)
    stored, scales = stored_embeddings(full.item_embeddings, dtype)
    CatalogTables(full.item_ids, stored, full.item_features, full.user_ids, full.user_features,
                  item_embedding_scales=scales).save(tmp_path)
    tables = CatalogTables.load(tmp_path)
    batch = _batch(tables, (300, 5, 1000), seed=3)
    got = RankerScorer(request_form, 512).score(tables, batch)
    want = np.concatenate([_reference(ranker_session, tables, *r) for r in batch])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
