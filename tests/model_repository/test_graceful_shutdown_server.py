"""SIGTERM under load: requests admitted before the signal all complete, the server exits on its
own within its exit timeout, and calls sent after the signal fail fast instead of hanging."""
from __future__ import annotations

import os
import queue
import signal
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from loadtests.overload import without_queue_policy
from model_repository import spec
from model_repository.triton_server import TritonServer, TritonSettings, free_ports

pytestmark = [pytest.mark.server, pytest.mark.reliability]


def _request(k: int) -> list:
    arrays = [(spec.QUERY.name, "BYTES", np.array([f"waterproof boots {k}".encode()], dtype=np.object_)),
              (spec.USER_ID.name, "INT64", np.array([k], dtype=np.int64)),
              (spec.CANDIDATE_IDS.name, "INT64", np.arange(1, spec.MAX_CANDIDATES + 1, dtype=np.int64))]
    inputs = []
    for name, dtype, array in arrays:
        t = grpcclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        inputs.append(t)
    return inputs


def test_sigterm_drains_admitted_requests_and_exits_in_time(ci_repository, tmp_path):
    exit_timeout_s = 20
    # A second of queued work is far past the served queue timeout, which would (rightly) refuse
    # most of it: the drain is what is tested here, on a copy without the admission policy.
    repository = without_queue_policy(ci_repository, tmp_path / "model_repository")
    one_core = (min(os.sched_getaffinity(0)),)
    server = TritonServer(TritonSettings(repository=repository, ports=free_ports(), exit_timeout_s=exit_timeout_s,
                                         cpus=one_core))
    server.start()
    try:
        server.wait_ready()
        client = grpcclient.InferenceServerClient(server.grpc_url)
        results: queue.Queue = queue.Queue()
        # 1000 candidates each, all 1000 returned, on one core (below): about half a second of queued
        # work. The count follows the server's speed: twelve were enough with five hops; 60 on two
        # cores all finished before the signal once the ranker gathered merged rows at once. More
        # calls instead would not do: the client then still sends some after the 0.2 s, and those
        # are (rightly) refused as not admitted.
        n = 100
        for k in range(n):
            client.async_infer(spec.SEARCH_RANK, _request(k), callback=lambda result, error, k=k: results.put((k, result, error)),
                               client_timeout=60)
        time.sleep(0.2)  # let the requests reach the server before it is told to stop
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert results.qsize() < n, "everything was answered before the signal: nothing was drained"
        answers = [results.get(timeout=60) for _ in range(n)]
        failed = [(k, str(e)) for k, _, e in answers if e is not None]
        assert not failed, f"requests admitted before SIGTERM failed: {failed}"
        assert all(len(r.as_numpy(spec.ITEM_IDS.name)) == spec.MAX_CANDIDATES for _, r, _ in answers)
        # a call after the signal is refused quickly (unloaded model or closed port), never hangs
        started = time.monotonic()
        with pytest.raises(Exception):
            client.infer(spec.SEARCH_RANK, _request(99), client_timeout=exit_timeout_s + 10)
        assert time.monotonic() - started < 10
        client.close()
        assert server.process.wait(timeout=exit_timeout_s + 30) == 0
        assert time.monotonic() - signalled < exit_timeout_s + 15
    finally:
        server.stop()
