"""Overload (loadtests.overload): the helpers as units, and a CI-sized run against the real server:
3x its measured capacity, open loop, no client retries."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conversion.stages import REPO_ROOT
from loadtests import grpc_load, overload
from model_repository import spec
from model_repository.render import read_config
from model_repository.runtime import served_catalog_dir
from model_repository.triton_server import run_triton_server


@pytest.mark.unit
def test_summary_judges_admitted_and_refused_calls_separately():
    s = overload.OverloadSettings(target_p99_ms=250, rejection_p99_ms=100)
    calls = [grpc_load.Call(0.01 * i, 40.0, "OK") for i in range(99)] + [grpc_load.Call(1.0, 60.0, "UNAVAILABLE")]
    r = overload.summarize("x", calls, offered=100, seconds=1.0, s=s)
    assert (r.ok, r.rejected, r.goodput_rps) == (99, 1, 99)
    assert r.passed
    slow = overload.summarize("x", calls + [grpc_load.Call(1.0, 900.0, "OK")] * 5, 100, 1.0, s)
    assert not slow.checks["admitted p99 <= 500 ms"]
    hung = overload.summarize("x", calls + [grpc_load.Call(1.0, 2000.0, "DEADLINE_EXCEEDED")], 100, 1.0, s)
    assert not hung.checks["rejections retryable (UNAVAILABLE)"]
    assert not hung.checks["rejections p99 <= 100 ms"]


@pytest.mark.unit
def test_cpus_are_split_between_server_and_load():
    server, load = grpc_load.split_cpus()
    cpus = set(os.sched_getaffinity(0))
    if len(cpus) < 2:
        assert (server, load) == (None, None)
    else:
        assert server and load and not set(server) & set(load) and set(server) | set(load) == cpus


@pytest.mark.unit
def test_unbounded_copy_drops_only_the_queue_policy(ci_repository, tmp_path):
    copy = overload.without_queue_policy(ci_repository, tmp_path / "repo")
    for name in ("query_encoder", "ranker"):
        original = read_config(ci_repository / name / "config.pbtxt")
        stripped = read_config(copy / name / "config.pbtxt")
        assert original.dynamic_batching.HasField("default_queue_policy")
        assert not stripped.dynamic_batching.HasField("default_queue_policy")
        original.dynamic_batching.ClearField("default_queue_policy")
        assert stripped == original


@pytest.mark.unit
def test_cli_refuses_bad_settings():
    r = subprocess.run([sys.executable, "-m", "loadtests.overload", "--candidates", "1001"], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--candidates must be in 1..1000" in r.stderr


def _no_embedding_cache(cfg) -> None:
    if cfg.name == spec.QUERY_ENCODER:
        cfg.parameters["cache_entries"].string_value = "0"


@pytest.mark.server
@pytest.mark.reliability
def test_three_times_capacity_is_refused_fast_and_admitted_calls_stay_fast(ci_repository, tmp_path):
    s = overload.OverloadSettings(capacity_s=4.0, duration_s=6.0)
    server_cpus, load_cpus = grpc_load.split_cpus()
    streams = grpc_load.FreshStreams(served_catalog_dir(ci_repository), s.seed)
    before = os.sched_getaffinity(0)
    try:
        if load_cpus:
            os.sched_setaffinity(0, load_cpus)
        # Without the embedding cache: with it the CI models serve about 450/s at 100 candidates, and
        # the one-core Python open loop could not send 3x that on time (an admitted p99 of 640 ms that
        # was the generator's own lag, in CI). Admission does not depend on the cache; `make
        # bench-overload` measures the served configuration, cache included.
        repository = overload.linked_copy(ci_repository, tmp_path / "model_repository", _no_embedding_cache)
        with run_triton_server(repository, cpus=server_cpus) as server:
            capacity, report = overload.run_phase("ci", server.grpc_url, streams, s)
            from search_rank_client import SearchClient

            with SearchClient(server.grpc_url, timeout_s=30) as c:  # healthy afterwards
                assert len(c.rank("desk lamp", 1, list(range(1, 51)), top_k=5)) == 5
    finally:
        os.sched_setaffinity(0, before)
    print("\n" + overload.format_table([(capacity, report)], s))
    assert report.rejected > 0, "3x capacity was all admitted: the overload never happened"
    # refused with the retryable code, never left to run into the deadline
    assert set(report.by_code) <= {"OK", "UNAVAILABLE"}, report.by_code
    # admission keeps the server doing useful work (without it, goodput collapses or calls time out)
    assert report.goodput_rps >= 0.5 * capacity, (report.goodput_rps, capacity)
    # Triton's queue timeout bounds admitted latency; refusals come well before the caller's deadline
    # (`make bench-overload` holds them to the p99 target on a quiet machine; CI's cores are shared)
    assert report.admitted_p99_ms <= 2 * s.target_p99_ms
    assert report.rejected_p99_ms <= 0.5 * s.deadline_s * 1000
