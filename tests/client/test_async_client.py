"""AsyncSearchClient: the same deadlines, retries, budget and typed errors as the blocking client,
checked against a port where nothing listens and against the real server."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from search_rank_client import AsyncSearchClient, InvalidRequest, RetryPolicy, SearchClient, SearchError
from model_repository.triton_server import free_port


PATIENT = RetryPolicy(max_attempts=10, backoff_s=0.05, budget_tokens=0)


def _run(coro):
    return asyncio.run(coro)


@pytest.mark.unit
def test_unavailable_is_retried_up_to_max_attempts_within_the_deadline():
    async def call():
        async with AsyncSearchClient(f"127.0.0.1:{free_port()}", timeout_s=5.0,
                                     retry=RetryPolicy(max_attempts=3, backoff_s=0.01)) as client:
            start = time.monotonic()
            with pytest.raises(SearchError) as err:
                await client.rank("shoes", 1, [1, 2])
            return client, err.value, time.monotonic() - start

    client, error, elapsed = _run(call())
    assert error.code == "UNAVAILABLE" and not isinstance(error, InvalidRequest) and elapsed < 5.0
    assert (client.stats.calls, client.stats.retries, client.stats.failures) == (1, 2, 1)


@pytest.mark.unit
def test_a_spent_budget_fails_calls_at_once_without_retrying():
    async def calls():
        async with AsyncSearchClient(f"127.0.0.1:{free_port()}", timeout_s=5.0,
                                     retry=RetryPolicy(max_attempts=5, backoff_s=0.01, budget_tokens=4)) as client:
            for _ in range(4):
                with pytest.raises(SearchError):
                    await client.rank("shoes", 1, [1, 2])
            return client.stats

    stats = _run(calls())
    # as the blocking client (tests/client/test_retry.py): one retry, then every call throttled
    assert stats.failures == 4 and stats.retries == 1 and stats.throttled == 4


@pytest.mark.unit
def test_non_integer_candidates_rejected_before_sending():
    async def call():
        async with AsyncSearchClient(f"127.0.0.1:{free_port()}") as client:
            await client.rank("shoes", 1, [1.5, 2.0])

    with pytest.raises(TypeError, match="integers"):
        _run(call())


@pytest.mark.server
def test_async_answers_equal_blocking_ones_under_concurrency(triton, ci_models):
    ids = np.load(ci_models["catalog_artifact"] / "item_ids.npy")
    rng = np.random.default_rng(3)
    sets = [rng.choice(ids, size=100, replace=False) for _ in range(12)]
    queries = ["waterproof hiking boots", "red running shoes", "cast iron frying pan"]

    async def calls():
        # Twelve calls at once on a 2-core machine can meet the queue policy's admission refusal
        # (UNAVAILABLE, spec.ADMISSION_REFUSAL); the client retries those, given the attempts.
        async with AsyncSearchClient(triton.grpc_url, timeout_s=60.0, retry=PATIENT) as client:
            assert await client.is_live() and await client.is_ready()
            ranked = await asyncio.gather(*(client.rank(queries[i % 3], i, s, top_k=10) for i, s in enumerate(sets)))
            embs = await asyncio.gather(*(client.embed(q) for q in queries))
            with pytest.raises(InvalidRequest) as err:
                await client.rank("", 1, sets[0][:3])
            return ranked, embs, err.value, client.stats

    ranked, embs, invalid, stats = _run(calls())
    assert invalid.code == "INVALID_ARGUMENT" and "QUERY" in invalid.message
    assert stats.failures == 1 and stats.by_code == {"INVALID_ARGUMENT": 1}  # never retried
    with SearchClient(triton.grpc_url, timeout_s=60.0, retry=PATIENT) as client:
        for i, (s, got) in enumerate(zip(sets, ranked)):
            want = client.rank(queries[i % 3], i, s, top_k=10)
            assert [r.item_id for r in got] == [r.item_id for r in want]
            np.testing.assert_allclose([r.score for r in got], [r.score for r in want], rtol=1e-5)
        for q, emb in zip(queries, embs):
            np.testing.assert_allclose(emb, client.embed(q), atol=1e-5)
