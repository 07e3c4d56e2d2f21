"""The served ranker merges concurrent requests, whatever their candidate counts, into one
execution (dynamic batching over requests, candidates ragged) and still answers every request
with exactly its own scores, in its own order."""
from __future__ import annotations

import queue
import threading
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from model_repository import runtime, spec
from model_repository.runtime import CatalogTables, ort_session

pytestmark = pytest.mark.server

SIZES = (1, 2, 7, 33, 100, 250, 1000)


def _ranker_stats(client) -> tuple[int, int]:
    """(requests, executions) answered by the ranker so far."""
    stats = client.get_inference_statistics(spec.RANKER).model_stats[0]
    return stats.inference_stats.success.count, stats.execution_count


def _distinct_requests(tables: CatalogTables, dim: int, n: int, seed: int = 5) -> list[dict[str, np.ndarray]]:
    """A different random query embedding per request (so no two requests share scores), real
    catalog ids plus a few unknown ones (cold-start rows), and a real or unknown user."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        size = SIZES[k % len(SIZES)]
        query = rng.normal(size=dim).astype(np.float32)
        query /= np.linalg.norm(query)
        pool = np.concatenate([tables.item_ids, np.arange(10**12, 10**12 + 50)])
        out.append({
            spec.query_embedding(0).name: query[None, :],
            spec.USER_ID.name: np.array([[int(rng.choice(tables.user_ids)) if k % 5 else 10**12 + k]], np.int64),
            spec.CANDIDATE_IDS.name: rng.choice(pool, size, replace=False).astype(np.int64)[None, :],
            spec.TOP_K.name: np.array([[size]], np.int32),
        })
    return out


def _reference(session, tables: CatalogTables, request: dict[str, np.ndarray]) -> dict[int, float]:
    """Score of each candidate, one request per ORT call, rows built here from the artifact."""
    candidates = request[spec.CANDIDATE_IDS.name][0]
    n = len(candidates)
    rows = tables.item_rows(candidates)
    user_row = tables.user_rows(request[spec.USER_ID.name][0])
    feeds = {spec.query_embedding(0).name: np.repeat(request[spec.query_embedding(0).name], n, axis=0),
             spec.item_embedding(0).name: tables.embedding_rows(rows),
             spec.ITEM_FEATURES.name: np.ascontiguousarray(tables.item_features[rows]),
             spec.USER_FEATURES.name: np.repeat(tables.user_features[user_row], n, axis=0)}
    probs = session.run(None, feeds)[0].reshape(-1)
    return dict(zip(candidates.tolist(), probs.tolist()))


def _infer_inputs(feeds: dict[str, np.ndarray]) -> list:
    inputs = []
    for name, array in feeds.items():
        dtype = {np.float32: "FP32", np.int64: "INT64", np.int32: "INT32"}[array.dtype.type]
        t = grpcclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        inputs.append(t)
    return inputs


@pytest.fixture(scope="module")
def unqueued_triton(ci_repository, tmp_path_factory):
    """The CI repository without the admission policy: this test fires 84 requests (about 40k
    candidate rows) at once on purpose, which the served queue timeout would (rightly) partly refuse."""
    from loadtests.overload import without_queue_policy
    from model_repository.triton_server import run_triton_server

    repository = without_queue_policy(ci_repository, tmp_path_factory.mktemp("unqueued") / "model_repository")
    with run_triton_server(repository) as server:
        yield server


def test_concurrent_requests_are_merged_and_each_gets_its_own_scores(unqueued_triton, ci_repository, ci_models,
                                                                       ci_pipeline):
    triton = unqueued_triton
    dim = ci_pipeline.model(spec.RANKER).tensor(spec.query_embedding(0).name).dims[0]
    tables = CatalogTables.load(ci_models["catalog_artifact"], mmap=False)
    requests = _distinct_requests(tables, dim, 84)
    # Reference: the ranker graph one request per ORT call (what an unmerged server returns).
    session = ort_session(Path(ci_repository) / spec.RANKER / "1" / runtime.RANKER_FILE, threads=2)
    expected = [_reference(session, tables, r) for r in requests]

    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        before = _ranker_stats(client)
        results: queue.Queue = queue.Queue()
        # Fire everything before waiting for anything: the ranker is busy with the first
        # executions while the rest queue up, so the dynamic batcher has requests to merge.
        gate = threading.Barrier(4)

        def fire(indices):
            gate.wait()
            for k in indices:
                client.async_infer(spec.RANKER, _infer_inputs(requests[k]),
                                   callback=lambda result, error, k=k: results.put((k, result, error)),
                                   client_timeout=120)

        threads = [threading.Thread(target=fire, args=(range(j, len(requests), 4),)) for j in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        got = {}
        for _ in requests:
            k, result, error = results.get(timeout=180)
            assert error is None, f"request {k}: {error}"
            got[k] = (result.as_numpy(spec.ITEM_IDS.name), result.as_numpy(spec.SCORES.name))
        after = _ranker_stats(client)

    n_requests, n_executions = (a - b for a, b in zip(after, before))
    print(f"\nranker: {n_requests} requests of mixed sizes in {n_executions} executions")
    assert n_requests == len(requests)
    assert n_executions < n_requests, "no execution merged requests"
    for k, request in enumerate(requests):
        ids, scores = (a.reshape(-1) for a in got[k])
        want = expected[k]
        assert sorted(ids.tolist()) == sorted(want), f"request {k}: another request's candidates"
        # Merged or not, a row's score depends on that row only; only GEMM blocking may move the last bits.
        np.testing.assert_allclose(scores, [want[i] for i in ids.tolist()], rtol=0, atol=1e-6, err_msg=f"request {k}")
        assert (np.diff(scores) <= 0).all(), f"request {k}: not in score order"
    # distinct inputs: a response that carried another request's rows could not pass the check above
    assert len({float(got[k][1].reshape(-1)[0]) for k in got}) > len(got) // 2
