"""What the blocking and the asyncio client share: typed errors, the retry policy and budget,
call statistics, and how a call's tensors are built and its failures judged.
"""
from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from search_rank_client import contract
from search_rank_client.channel import ChannelSettings, ClientTls, channel_args, grpc_target

DEFAULT_URL = "127.0.0.1:8001"


@dataclass(frozen=True)
class RankedItem:
    item_id: int
    score: float


class SearchError(RuntimeError):
    """A failed call; `code` is the gRPC status name (e.g. 'INVALID_ARGUMENT')."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class InvalidRequest(SearchError):
    """The server refused the request as malformed (INVALID_ARGUMENT); retrying cannot help."""


# A request the server refused as malformed, too large, unauthenticated or past its own deadline
# fails the same way on every replica: retrying only adds load.
NEVER_RETRIED = ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED", "PERMISSION_DENIED",
                 "DEADLINE_EXCEEDED", "UNIMPLEMENTED")


@dataclass(frozen=True)
class RetryPolicy:
    """Retry what another replica can answer; ranking is read-only, so a repeat is harmless.

    UNAVAILABLE: the replica is gone, its connection dropped, or its queue refused the call. NOT_FOUND: a
    stopping Triton keeps its gRPC port open while it unloads models during --exit-timeout-secs and
    answers "search_rank has no available versions"; measured here, a graceful stop of one of two
    replicas under load failed about 230 calls in 3.7 s without this. Attempts share the call's
    deadline; round_robin sends each attempt to the next replica, so the first retry does not
    wait; later ones back off exponentially with jitter, so clients that failed together do not
    retry together. A `RetryBudget` shared by the client's calls stops retries altogether while
    most calls fail (an overloaded or dead service is not helped by twice the traffic).
    """

    max_attempts: int = 3
    backoff_s: float = 0.05  # before the 2nd retry; doubled after each further one
    max_backoff_s: float = 1.0
    jitter: float = 0.5  # a pause is drawn uniformly from [(1 - jitter) * p, p]
    # CANCELLED: SearchClient never cancels its own calls, so it comes from a server whose gRPC
    # endpoint shut down with the call in flight (the end of a replica's drain in a rolling update;
    # seen once in 2614 calls of tests/deploy/test_rolling_swap_server.py).
    retry_on: tuple[str, ...] = ("UNAVAILABLE", "NOT_FOUND", "CANCELLED")
    budget_tokens: float = 10.0  # RetryBudget: see there; 0 disables the budget
    # gRPC suggests 0.1 for services where failures are rare. Here one draining replica of two fails
    # a third of all attempts for the whole exit timeout, and those retries must go through; 1.0
    # keeps retrying while at least about half of the attempts succeed, and stops in an outage.
    budget_token_ratio: float = 1.0

    def __post_init__(self):
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")
        refused = sorted(set(self.retry_on) & set(NEVER_RETRIED))
        if refused:
            raise ValueError(f"{refused} can never succeed on a retry; remove them from retry_on")

    def pause_s(self, attempt: int, rng: random.Random | None = None) -> float:
        """Pause after failed attempt number `attempt` (1-based)."""
        if attempt <= 1:
            return 0.0
        p = min(self.backoff_s * 2 ** (attempt - 2), self.max_backoff_s)
        return p * (1.0 - self.jitter * (rng or random).random())


class RetryBudget:
    """gRPC's retry throttling: a token bucket of `max_tokens`, minus 1 per retryable failure,
    plus `token_ratio` per success; retries are allowed only while more than half is left. Retries
    stop after ~5 failures in a row and come back once successes refill the bucket, so a dead or
    overloaded service gets its callers' traffic once, not `max_attempts` times."""

    def __init__(self, max_tokens: float = 10.0, token_ratio: float = 1.0):
        self.max_tokens, self.token_ratio = max_tokens, token_ratio
        self.tokens = max_tokens
        self._lock = threading.Lock()

    def record(self, success: bool) -> None:
        with self._lock:
            if success:
                self.tokens = min(self.max_tokens, self.tokens + self.token_ratio)
            else:
                self.tokens = max(0.0, self.tokens - 1.0)

    def allows_retry(self) -> bool:
        with self._lock:
            return self.max_tokens <= 0 or self.tokens > self.max_tokens / 2


@dataclass
class CallStats:
    calls: int = 0
    retries: int = 0  # extra attempts after a retryable failure
    throttled: int = 0  # retryable failures not retried because the retry budget was spent
    failures: int = 0  # calls that raised after all attempts
    by_code: dict[str, int] = field(default_factory=dict)  # failures by gRPC status
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, retries: int, failed_code: str | None, throttled: bool = False) -> None:
        with self._lock:
            self.calls += 1
            self.retries += retries
            self.throttled += int(throttled)
            if failed_code is not None:
                self.failures += 1
                self.by_code[failed_code] = self.by_code.get(failed_code, 0) + 1


def _status_name(exc: InferenceServerException) -> str:
    status = str(exc.status() or "UNKNOWN")
    return status[len("StatusCode."):] if status.startswith("StatusCode.") else status


def wrap_error(exc: InferenceServerException) -> SearchError:
    code = _status_name(exc)
    cls = InvalidRequest if code == "INVALID_ARGUMENT" else SearchError
    return cls(code, exc.message() or str(exc))


def _input(tensor: contract.Tensor, array: np.ndarray) -> grpcclient.InferInput:
    # tritonclient.grpc.aio builds its requests from the same InferInput class.
    inp = grpcclient.InferInput(tensor.name, list(array.shape), tensor.dtype)
    inp.set_data_from_numpy(array)
    return inp


def _text_array(text: str | bytes) -> np.ndarray:
    # BYTES tensors must be object arrays: np.bytes_ would strip trailing NUL bytes.
    raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.array([raw], dtype=np.object_)


def rank_inputs(query: str | bytes, user_id: int, candidate_ids: Sequence[int] | np.ndarray,
                top_k: int | None = None) -> list:
    """search_rank's input tensors; integer ids are checked here, everything else by the server."""
    ids = np.asarray(candidate_ids)
    if ids.dtype.kind not in "iu" and ids.size:
        raise TypeError(f"candidate_ids must be integers, got dtype {ids.dtype}")
    inputs = [
        _input(contract.QUERY, _text_array(query)),
        _input(contract.USER_ID, np.array([user_id], dtype=np.int64)),
        _input(contract.CANDIDATE_IDS, ids.astype(np.int64).reshape(-1)),
    ]
    if top_k is not None:
        inputs.append(_input(contract.TOP_K, np.array([top_k], dtype=np.int32)))
    return inputs


def embed_inputs(text: str | bytes) -> list:
    return [_input(contract.TEXT, _text_array(text))]


RANK_OUTPUTS = (contract.ITEM_IDS, contract.SCORES)
EMBED_OUTPUTS = (contract.text_embedding(-1),)


def requested_outputs(outputs: Sequence[contract.Tensor]) -> list:
    return [grpcclient.InferRequestedOutput(t.name) for t in outputs]


def ranked(item_ids: np.ndarray, scores: np.ndarray) -> list[RankedItem]:
    return [RankedItem(int(i), float(s)) for i, s in zip(item_ids, scores)]


class Attempts:
    """One call's attempts under one deadline: how long the next may take, and after a failure
    whether to retry (and after what pause) or raise. Shared by both clients, so the blocking and
    the asyncio client retry exactly alike."""

    def __init__(self, policy: RetryPolicy, budget: RetryBudget, stats: CallStats, timeout_s: float):
        self.policy, self.budget, self.stats = policy, budget, stats
        self.deadline = time.monotonic() + timeout_s
        self.attempt = 0

    def next_timeout_s(self) -> float:
        self.attempt += 1
        return max(self.deadline - time.monotonic(), 0.001)

    def failed(self, exc: InferenceServerException) -> float:
        """The pause before the next attempt; raises the typed error when there is none."""
        error = wrap_error(exc)
        retryable = error.code in self.policy.retry_on
        if retryable:
            self.budget.record(success=False)
        pause = self.policy.pause_s(self.attempt)
        throttled = retryable and not self.budget.allows_retry()
        if (not retryable or throttled or self.attempt >= self.policy.max_attempts
                or time.monotonic() + pause >= self.deadline):
            self.stats.add(self.attempt - 1, error.code, throttled)
            raise error from None
        return pause

    def succeeded(self) -> None:
        self.budget.record(success=True)
        self.stats.add(self.attempt - 1, None)


class ClientBase:
    """Settings and channel of either client; `_grpc_module` is tritonclient.grpc or its aio twin,
    whose InferenceServerClient takes the same arguments."""

    _grpc_module = grpcclient

    def __init__(self, url: str | Sequence[str] = DEFAULT_URL, timeout_s: float = 2.0,
                 retry: RetryPolicy = RetryPolicy(), channel: ChannelSettings = ChannelSettings(),
                 tls: ClientTls | None = None):
        self.url = grpc_target(url)
        self.timeout_s = timeout_s
        self.retry = retry
        self.stats = CallStats()
        self.budget = RetryBudget(retry.budget_tokens, retry.budget_token_ratio)
        self._grpc = self._grpc_module.InferenceServerClient(self.url, channel_args=channel_args(channel),
                                                             **(tls.client_kwargs() if tls else {}))

    def _attempts(self, timeout_s: float | None) -> Attempts:
        return Attempts(self.retry, self.budget, self.stats, timeout_s or self.timeout_s)
