"""The load engine's request streams (loadtests.grpc_load): measurements never replay a request,
since the served encoder answers repeats from Triton's response cache."""
from __future__ import annotations

import pytest

from loadtests import grpc_load
from loadtests.grpc_load import FreshStreams, StreamExhausted, closed_loop
from model_repository.runtime import served_catalog_dir
from tritonclient.grpc import service_pb2


def _queries(stream: list[bytes]) -> list[bytes]:
    out = []
    for raw in stream:
        req = service_pb2.ModelInferRequest.FromString(raw)
        (i,) = [k for k, t in enumerate(req.inputs) if t.name == "QUERY"]
        out.append(req.raw_input_contents[i])
    return out


@pytest.mark.unit
def test_a_label_names_one_stream_and_every_server_gets_the_same(ci_repository):
    streams = FreshStreams(served_catalog_dir(ci_repository), seed=7)
    a, again, other = streams.take(100, 300, "c4"), streams.take(100, 300, "c4"), streams.take(100, 300, "c8")
    assert a == again
    assert a != other
    # Streams differ in their query pools, not only in order: another level starts the cache cold.
    assert len(set(_queries(a)) & set(_queries(other))) < 0.2 * len(set(_queries(a)))
    # Only the traffic model's own repeats: popular queries recur within a stream, most do not.
    queries = _queries(a)
    assert 0.2 < 1 - len(set(queries)) / len(queries) < 0.8


@pytest.mark.unit
def test_closed_loop_streams_cover_the_fastest_loop_this_machine_drives(ci_repository):
    streams = FreshStreams(served_catalog_dir(ci_repository), seed=7)
    assert len(streams.for_closed_loop(100, 1.0, "x")) == int(grpc_load.MAX_CALLS_PER_S * 3.0) + 64
    assert len(streams.for_closed_loop(1000, 1.0, "x")) == int(grpc_load.MAX_ROWS_PER_S / 1000 * 3.0) + 64


@pytest.mark.server
def test_a_loop_that_may_not_repeat_stops_and_says_so(triton, ci_repository):
    short = FreshStreams(served_catalog_dir(ci_repository), seed=7).take(10, 5, "short")
    with pytest.raises(StreamExhausted, match="all 5 requests"):
        closed_loop(triton.grpc_url, short, 2, 1.0, warmup_s=0.2, cycle=False)
    # the same list, cycled, keeps the loop busy for the whole window
    calls = closed_loop(triton.grpc_url, short, 2, 1.0, warmup_s=0.2)
    assert len(calls) > 5 and all(c.code == grpc_load.OK for c in calls)


def test_request_query_reads_back_the_serialized_query():
    import numpy as np
    from loadtests.traffic import RankRequest

    text = "stainless steel water bottle, 750 ml – sans BPA"
    raw = grpc_load.serialize(RankRequest("x", text, 7, np.array([3, 1, 2]), 2))
    assert grpc_load.request_query(raw) == text


def test_a_closed_loop_records_which_request_each_call_sent(triton, ci_repository):
    stream = FreshStreams(served_catalog_dir(ci_repository), seed=7).for_closed_loop(10, 0.5, "indexed")
    calls = closed_loop(triton.grpc_url, stream, 1, 0.5, warmup_s=0.2, cycle=False)
    # concurrency 1 sends in order: the recorded calls are consecutive requests after the warm-up's
    indices = [c.index for c in sorted(calls, key=lambda c: c.sent_s)]
    assert indices and indices == list(range(indices[0], indices[0] + len(indices)))
