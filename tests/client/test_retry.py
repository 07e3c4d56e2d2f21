"""The client's retry policy: backoff with jitter, the retry budget, codes that are never retried,
and the behaviour of real calls against a port where nothing listens (no server, no mocks)."""
from __future__ import annotations

import random
import time

import pytest

from search_rank_client import NEVER_RETRIED, RetryBudget, RetryPolicy, SearchClient, SearchError
from model_repository.triton_server import free_port

pytestmark = pytest.mark.unit


def test_backoff_doubles_is_capped_and_jittered_within_bounds():
    policy = RetryPolicy(backoff_s=0.1, max_backoff_s=0.35, jitter=0.5)
    rng = random.Random(0)
    assert policy.pause_s(1, rng) == 0.0  # the first retry goes straight to the next replica
    for attempt, full in ((2, 0.1), (3, 0.2), (4, 0.35), (9, 0.35)):
        pauses = [policy.pause_s(attempt, rng) for _ in range(200)]
        assert all(0.5 * full <= p <= full for p in pauses)
        assert max(pauses) - min(pauses) > 0.3 * full  # jittered, not one value
    assert RetryPolicy(backoff_s=0.1, jitter=0.0).pause_s(3) == pytest.approx(0.2)


@pytest.mark.parametrize("code", NEVER_RETRIED)
def test_codes_that_cannot_succeed_on_retry_are_refused_in_the_policy(code):
    with pytest.raises(ValueError, match=code):
        RetryPolicy(retry_on=("UNAVAILABLE", code))


def test_budget_stops_retries_in_an_outage_and_recovers_on_success():
    budget = RetryBudget(max_tokens=10, token_ratio=1.0)
    fails = 0
    while budget.allows_retry():
        budget.record(success=False)
        fails += 1
    assert fails == 5  # more than half of 10 tokens must remain
    budget.record(success=True)
    assert budget.allows_retry()
    # a third of the attempts failing (one draining replica of two) never exhausts it
    budget = RetryBudget(max_tokens=10, token_ratio=1.0)
    for _ in range(300):
        budget.record(success=False)
        budget.record(success=True)
        budget.record(success=True)
        assert budget.allows_retry()


def test_unavailable_is_retried_up_to_max_attempts_within_the_deadline():
    policy = RetryPolicy(max_attempts=3, backoff_s=0.01)
    with SearchClient(f"127.0.0.1:{free_port()}", timeout_s=5.0, retry=policy) as client:
        start = time.monotonic()
        with pytest.raises(SearchError) as err:
            client.rank("shoes", 1, [1, 2])
        assert time.monotonic() - start < 5.0
    assert err.value.code == "UNAVAILABLE"
    assert (client.stats.calls, client.stats.retries, client.stats.failures) == (1, 2, 1)
    assert client.stats.by_code == {"UNAVAILABLE": 1}


def test_a_spent_budget_fails_calls_at_once_without_retrying():
    policy = RetryPolicy(max_attempts=5, backoff_s=0.01, budget_tokens=4)
    with SearchClient(f"127.0.0.1:{free_port()}", timeout_s=5.0, retry=policy) as client:
        for _ in range(4):
            with pytest.raises(SearchError):
                client.rank("shoes", 1, [1, 2])
    stats = client.stats
    assert stats.failures == 4
    # 4 tokens: the first failure leaves 3 (more than half), so one retry; from the second failure
    # on no successes refill the bucket, and every call fails at its first attempt, counted as throttled
    assert stats.retries == 1 and stats.throttled == 4
