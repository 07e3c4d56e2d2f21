"""The served ranker merges candidate rows of concurrent requests into one execution (dynamic
batching on the candidate axis) and still answers every request with exactly its own scores."""
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


def _ranker_stats(client) -> tuple[int, int, int]:
    """(requests, executions, rows) answered by ctr_ranker so far."""
    stats = client.get_inference_statistics(spec.CTR_RANKER).model_stats[0]
    return stats.inference_stats.success.count, stats.execution_count, stats.inference_count


def _distinct_requests(catalog_dir, dim: int, n: int, seed: int = 5) -> list[dict[str, np.ndarray]]:
    """Real feature rows of the catalog artifact (cold-start rows included) with a different
    random query embedding per request, so no two requests share scores."""
    tables = CatalogTables.load(catalog_dir, mmap=False)
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        size = SIZES[k % len(SIZES)]
        query = rng.normal(size=dim).astype(np.float32)
        query /= np.linalg.norm(query)
        rows = rng.integers(0, len(tables.item_ids) + 1, size)
        user = rng.integers(0, len(tables.user_ids) + 1)
        out.append({
            spec.query_embedding(0).name: np.repeat(query[None, :], size, axis=0),
            spec.item_embedding(0).name: np.ascontiguousarray(tables.item_embeddings[rows]),
            spec.ITEM_FEATURES.name: np.ascontiguousarray(tables.item_features[rows]),
            spec.USER_FEATURES.name: np.repeat(tables.user_features[user][None, :], size, axis=0),
        })
    return out


def _infer_inputs(feeds: dict[str, np.ndarray]) -> list:
    inputs = []
    for name, array in feeds.items():
        t = grpcclient.InferInput(name, list(array.shape), "FP32" if array.dtype == np.float32 else "INT64")
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
    dim = ci_pipeline.model(spec.CTR_RANKER).tensor(spec.query_embedding(0).name).dims[0]
    requests = _distinct_requests(ci_models["catalog_artifact"], dim, 84)
    # Reference: the served ONNX file, one request per ORT call (what an unmerged server returns).
    session = ort_session(Path(ci_repository) / spec.CTR_RANKER / "1" / runtime.RANKER_FILE, threads=2)
    expected = [session.run(None, feeds)[0] for feeds in requests]

    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        before = _ranker_stats(client)
        results: queue.Queue = queue.Queue()
        # Fire everything before waiting for anything: the ranker is busy with the first
        # executions while the rest queue up, so the dynamic batcher has rows to merge.
        gate = threading.Barrier(4)

        def fire(indices):
            gate.wait()
            for k in indices:
                client.async_infer(spec.CTR_RANKER, _infer_inputs(requests[k]),
                                   callback=lambda result, error, k=k: results.put((k, result, error)),
                                   outputs=[grpcclient.InferRequestedOutput(spec.CLICK_PROB.name)],
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
            got[k] = result.as_numpy(spec.CLICK_PROB.name)
        after = _ranker_stats(client)

    n_requests, n_executions, n_rows = (a - b for a, b in zip(after, before))
    print(f"\nctr_ranker: {n_requests} requests, {n_rows} candidate rows in {n_executions} executions")
    assert n_requests == len(requests)
    assert n_rows == sum(len(r[spec.ITEM_FEATURES.name]) for r in requests)
    assert n_executions < n_requests, "no execution merged requests"
    for k, feeds in enumerate(requests):
        assert got[k].shape == (len(feeds[spec.ITEM_FEATURES.name]), 1), f"request {k}: shape {got[k].shape}"
        # Merged or not, a row's score depends on that row only; only GEMM blocking may move the last bits.
        np.testing.assert_allclose(got[k], expected[k], rtol=0, atol=1e-6, err_msg=f"request {k}")
    # distinct inputs: a response that carried another request's rows could not pass the check above
    assert len({float(got[k][0, 0]) for k in got}) > len(got) // 2
