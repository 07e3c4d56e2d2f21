"""A lean gRPC load engine for benchmarks: serialized KServe v2 requests sent as bytes.

Building requests with tritonclient and parsing its responses cost a Python load generator about
a core at a few hundred calls/s on this machine, which then limited the measurement instead of the
server. Here each request is serialized once, responses are not parsed (only the status counts),
and calls are gRPC futures, so one Python process drives several hundred calls/s on one core.

- `search_rank_requests`: seeded search_rank requests (loadtests.traffic), one candidate count.
- `closed_loop`: a fixed number of calls always in flight; throughput and latencies.
- `open_loop`: Poisson arrivals at a fixed rate, whatever the server does; every call's outcome.
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
from tqdm import tqdm
from tritonclient.grpc import service_pb2
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from search_rank_client.channel import channel_args, grpc_target
from loadtests import traffic
from model_repository import spec
from model_repository.runtime import served_catalog_dir

OK = "OK"
INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"


@dataclass(frozen=True)
class Call:
    sent_s: float  # since the start of the run
    latency_ms: float
    code: str  # OK or the gRPC status name
    index: int = -1  # the request's position in the list a closed loop sent (-1: not recorded)


def rank_requests(catalog_dir: Path, n: int, candidates: int, seed: int, top_k: int = 10) -> list[traffic.RankRequest]:
    """`n` seeded search_rank requests with exactly `candidates` candidates each."""
    mix = traffic.TrafficSettings(embed_share=0.0, size_mix=((candidates, candidates, 1.0),),
                                  top_k_choices=(top_k,), top_k_weights=(1.0,))
    return traffic.RequestStream(traffic.CatalogData.load(catalog_dir), mix, seed=seed).take(n)


def search_rank_requests(catalog_dir: Path, n: int, candidates: int, seed: int, top_k: int = 10) -> list[bytes]:
    """The same requests (`rank_requests`), serialized as ModelInferRequests."""
    return [serialize(r) for r in rank_requests(catalog_dir, n, candidates, seed, top_k)]


# Bounds on what one loop on this machine class can send, for sizing streams that must not wrap:
# calls per second, and candidate rows per second (which bounds the 1000-candidate streams' memory).
MAX_CALLS_PER_S = 1500.0
MAX_ROWS_PER_S = 600_000.0


@dataclass(frozen=True)
class FreshStreams:
    """Seeded search_rank request streams that no measurement replays.

    The served encoder answers a repeated query's embedding from its cache, so a load
    test that cycles a short list would measure a cache hit on every query after the first pass.
    Each measurement takes its own stream instead (`label` names it, and the same label gives every
    server the same requests), which repeats only what the traffic model repeats: popular queries,
    Zipf over a pool drawn per stream (loadtests/traffic.py). A new pool per stream means the cache
    starts each measurement cold."""

    catalog_dir: Path
    seed: int

    def take(self, candidates: int, n: int, label: str) -> list[bytes]:
        digest = hashlib.sha256(f"{self.seed}/{candidates}/{label}".encode()).digest()
        return search_rank_requests(self.catalog_dir, n, candidates, int.from_bytes(digest[:4], "little"))

    def for_closed_loop(self, candidates: int, seconds: float, label: str) -> list[bytes]:
        """Enough for a closed loop of `seconds` (plus its warm-up) at the most this machine sends."""
        rate = min(MAX_CALLS_PER_S, MAX_ROWS_PER_S / candidates)
        return self.take(candidates, int(rate * (seconds + 2.0)) + 64, label)


def repository_requests(repository: Path, n: int, candidates: int, seed: int) -> list[bytes]:
    """The same, from the catalog a rendered repository serves."""
    return search_rank_requests(served_catalog_dir(repository), n, candidates, seed)


def serialize(r: traffic.RankRequest) -> bytes:
    req = service_pb2.ModelInferRequest(model_name=spec.SEARCH_RANK)
    arrays = {spec.QUERY: serialize_byte_tensor(np.array([r.query.encode()], dtype=np.object_)).item(),
              spec.USER_ID: np.array([r.user_id], dtype=np.int64).tobytes(),
              spec.CANDIDATE_IDS: r.candidate_ids.astype(np.int64).tobytes()}
    if r.top_k is not None:
        arrays[spec.TOP_K] = np.array([r.top_k], dtype=np.int32).tobytes()
    for t, raw in arrays.items():
        req.inputs.add(name=t.name, datatype=t.dtype, shape=[len(r.candidate_ids) if t is spec.CANDIDATE_IDS else 1])
        req.raw_input_contents.append(raw)
    for t in (spec.ITEM_IDS, spec.SCORES):
        req.outputs.add(name=t.name)
    return req.SerializeToString()


@contextmanager
def infer_method(target: str) -> Iterator:
    """ModelInfer on one channel, bytes in and out."""
    channel = grpc.insecure_channel(grpc_target(target), options=channel_args())
    try:
        yield channel.unary_unary(INFER_METHOD, request_serializer=None, response_deserializer=None)
    finally:
        channel.close()


def _code(future) -> str:
    e = future.exception()
    return OK if e is None else e.code().name


class StreamExhausted(RuntimeError):
    """A closed loop that may not repeat a request ran out of them: give it a longer stream."""


def closed_loop(target: str, requests: list[bytes], concurrency: int, seconds: float, warmup_s: float = 1.0,
                deadline_s: float = 30.0, cycle: bool = True) -> list[Call]:
    """`concurrency` calls always in flight for `seconds` after `warmup_s`; the calls that started
    inside the measured window. `cycle=False` sends each request at most once (a server that caches
    responses must not be measured on repeats the traffic did not make) and raises StreamExhausted
    when the window outlasts the list."""
    done, lock = threading.Event(), threading.Lock()
    calls: list[Call] = []
    state = {"next": 0, "inflight": 0, "exhausted": False}
    idle = threading.Event()
    with infer_method(target) as infer:
        start = time.monotonic() + warmup_s

        def send():
            with lock:
                k = state["next"]
                if not cycle and k >= len(requests):
                    state["exhausted"] = True
                    done.set()
                    if state["inflight"] == 0:
                        idle.set()
                    return
                state["next"] += 1
                state["inflight"] += 1
            sent_at = time.monotonic()
            infer.future(requests[k % len(requests)], timeout=deadline_s).add_done_callback(
                lambda f: finished(f, sent_at, k % len(requests)))

        def finished(future, sent_at: float, index: int) -> None:
            now = time.monotonic()
            if sent_at >= start:
                calls.append(Call(sent_at - start, (now - sent_at) * 1000, _code(future), index))
            with lock:
                state["inflight"] -= 1
                if done.is_set() and state["inflight"] == 0:
                    idle.set()
            if not done.is_set():
                send()

        for _ in range(concurrency):
            send()
        time.sleep(warmup_s + seconds)
        done.set()
        with lock:
            if state["inflight"] == 0:
                idle.set()
        idle.wait(timeout=deadline_s + 5)
    if state["exhausted"]:
        raise StreamExhausted(f"the closed loop sent all {len(requests)} requests before its {warmup_s + seconds:.0f} s "
                              f"ended (concurrency {concurrency}); it needs a longer request stream")
    end = seconds
    return [c for c in calls if c.sent_s < end]


def open_loop(target: str, requests: list[bytes], rate: float, seconds: float, deadline_s: float,
              seed: int) -> list[Call]:
    """Poisson arrivals at `rate`/s, each call with `deadline_s`; waits for all to end."""
    rng = np.random.default_rng(seed)
    calls: list[Call] = []
    outstanding = threading.Semaphore(0)
    sent = 0
    with infer_method(target) as infer:
        start = due = time.monotonic()

        def finished(future, sent_at: float) -> None:
            calls.append(Call(sent_at - start, (time.monotonic() - sent_at) * 1000, _code(future)))
            outstanding.release()

        with tqdm(total=int(rate * seconds), desc=f"offering {rate:.0f}/s", mininterval=1.0) as bar:
            while True:
                due += rng.exponential(1.0 / rate)
                if due - start >= seconds:
                    break
                pause = due - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                sent_at = time.monotonic()
                infer.future(requests[sent % len(requests)], timeout=deadline_s).add_done_callback(
                    lambda f, t=sent_at: finished(f, t))
                sent += 1
                bar.update(1)
        for _ in range(sent):
            if not outstanding.acquire(timeout=deadline_s + 30):
                raise RuntimeError(f"{sent - len(calls)} calls never completed, past their {deadline_s} s deadline")
    return calls


def split_cpus(server_share: float = 0.5) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
    """(server CPUs, load generator CPUs): a local server and its load must not share cores, or
    the generator's own work (about a core at a few hundred gRPC calls/s in Python) is counted as
    the server's overload. None, None on a one-core machine."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    k = min(len(cpus) - 1, max(1, round(len(cpus) * server_share)))
    return tuple(cpus[:k]), tuple(cpus[k:])


def request_query(raw: bytes) -> str:
    """The QUERY text of a serialized search_rank request (as `serialize` writes it)."""
    req = service_pb2.ModelInferRequest.FromString(raw)
    k = next(i for i, t in enumerate(req.inputs) if t.name == spec.QUERY.name)
    return deserialize_bytes_tensor(req.raw_input_contents[k])[0].decode()


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None
