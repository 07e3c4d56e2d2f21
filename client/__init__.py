"""Thin typed gRPC client for the `search_rank` and `text_embed` ensembles.

One channel per client, reused for every call; every call carries a deadline. Server errors
come back as `SearchError` subclasses carrying the gRPC status code and Triton's message.
The target may name several replicas (`client.channel`): calls are balanced round_robin, and a
call that finds a replica gone (UNAVAILABLE) is retried within its deadline, counted in `stats`.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from client.channel import ChannelSettings, ClientTls, channel_args, grpc_target
from model_repository import spec

log = logging.getLogger(__name__)

DEFAULT_URL = "127.0.0.1:8001"


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


@dataclass(frozen=True)
class RankedItem:
    item_id: int
    score: float


def _status_name(exc: InferenceServerException) -> str:
    status = str(exc.status() or "UNKNOWN")
    return status.removeprefix("StatusCode.")


def _wrap(exc: InferenceServerException) -> SearchError:
    code = _status_name(exc)
    cls = InvalidRequest if code == "INVALID_ARGUMENT" else SearchError
    return cls(code, exc.message() or str(exc))


def _input(tensor: spec.Tensor, array: np.ndarray) -> grpcclient.InferInput:
    inp = grpcclient.InferInput(tensor.name, list(array.shape), tensor.dtype)
    inp.set_data_from_numpy(array)
    return inp


def _text_array(text: str | bytes) -> np.ndarray:
    # BYTES tensors must be object arrays: np.bytes_ would strip trailing NUL bytes.
    raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.array([raw], dtype=np.object_)


class SearchClient:
    """`url`: "host:port", "dns:///name:port", "a:port,b:port" or a list of addresses."""

    def __init__(self, url: str | Sequence[str] = DEFAULT_URL, timeout_s: float = 2.0,
                 retry: RetryPolicy = RetryPolicy(), channel: ChannelSettings = ChannelSettings(),
                 tls: ClientTls | None = None):
        self.url = grpc_target(url)
        self.timeout_s = timeout_s
        self.retry = retry
        self.stats = CallStats()
        self.budget = RetryBudget(retry.budget_tokens, retry.budget_token_ratio)
        self._grpc = grpcclient.InferenceServerClient(self.url, channel_args=channel_args(channel),
                                                      **(tls.client_kwargs() if tls else {}))

    def __enter__(self) -> "SearchClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._grpc.close()

    def _infer(self, model: str, inputs, outputs: Sequence[spec.Tensor], timeout_s: float | None):
        requested = [grpcclient.InferRequestedOutput(t.name) for t in outputs]
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        attempt = 0
        while True:
            attempt += 1
            try:
                result = self._grpc.infer(model, inputs, outputs=requested,
                                          client_timeout=max(deadline - time.monotonic(), 0.001))
            except InferenceServerException as exc:
                error = _wrap(exc)
                retryable = error.code in self.retry.retry_on
                if retryable:
                    self.budget.record(success=False)
                pause = self.retry.pause_s(attempt)
                throttled = retryable and not self.budget.allows_retry()
                if (not retryable or throttled or attempt >= self.retry.max_attempts
                        or time.monotonic() + pause >= deadline):
                    self.stats.add(attempt - 1, error.code, throttled)
                    raise error from None
                log.debug("%s on attempt %d, retrying in %.2f s: %s", model, attempt, pause, error.message)
                time.sleep(pause)
                continue
            self.budget.record(success=True)
            self.stats.add(attempt - 1, None)
            return [result.as_numpy(t.name) for t in outputs]

    def rank(self, query: str | bytes, user_id: int, candidate_ids: Sequence[int] | np.ndarray,
             top_k: int | None = None, timeout_s: float | None = None) -> list[RankedItem]:
        """Candidates ordered by predicted click probability, best first (at most `top_k`)."""
        ids = np.asarray(candidate_ids)
        if ids.dtype.kind not in "iu" and ids.size:
            raise TypeError(f"candidate_ids must be integers, got dtype {ids.dtype}")
        inputs = [
            _input(spec.QUERY, _text_array(query)),
            _input(spec.USER_ID, np.array([user_id], dtype=np.int64)),
            _input(spec.CANDIDATE_IDS, ids.astype(np.int64).reshape(-1)),
        ]
        if top_k is not None:
            inputs.append(_input(spec.TOP_K, np.array([top_k], dtype=np.int32)))
        item_ids, scores = self._infer(spec.SEARCH_RANK, inputs, (spec.ITEM_IDS, spec.SCORES), timeout_s)
        return [RankedItem(int(i), float(s)) for i, s in zip(item_ids, scores)]

    def embed(self, text: str | bytes, timeout_s: float | None = None) -> np.ndarray:
        """L2-normalised text embedding [d] from the served encoder."""
        emb_tensor = spec.text_embedding(-1)
        (emb,) = self._infer(spec.TEXT_EMBED, [_input(spec.TEXT, _text_array(text))], (emb_tensor,), timeout_s)
        return emb.reshape(-1)

    def is_live(self) -> bool:
        try:
            return bool(self._grpc.is_server_live(client_timeout=self.timeout_s))
        except InferenceServerException:
            return False

    def is_ready(self) -> bool:
        """Server ready and both public ensembles ready."""
        try:
            return bool(self._grpc.is_server_ready(client_timeout=self.timeout_s)) and all(
                self._grpc.is_model_ready(m, client_timeout=self.timeout_s) for m in (spec.SEARCH_RANK, spec.TEXT_EMBED))
        except InferenceServerException:
            return False

    def wait_ready(self, timeout_s: float = 60.0, interval_s: float = 0.25) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.is_ready():
            if time.monotonic() > deadline:
                raise SearchError("UNAVAILABLE", f"{self.url} not ready after {timeout_s:.0f} s")
            time.sleep(interval_s)
