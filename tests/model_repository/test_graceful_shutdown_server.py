"""SIGTERM under load: requests admitted before the signal all complete, the server exits on its
own within its exit timeout, and calls sent after the signal fail fast instead of hanging."""
from __future__ import annotations

import queue
import signal
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from loadtests.overload import linked_copy
from model_repository import spec
from model_repository.triton_server import TritonServer, TritonSettings, free_ports

pytestmark = [pytest.mark.server, pytest.mark.reliability]

HOLD_S = 3.0


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


EXIT_TIMEOUT_S = 20
# One full encoder batch goes at once; the rest wait up to HOLD_S for company, so they are queued in
# the server, admitted, when SIGTERM comes.
HELD = 4
N_CALLS = spec.ENCODER_MAX_BATCH + HELD


@pytest.fixture(scope="module")
def sigterm_with_queued_work(ci_repository, tmp_path_factory):
    """Sends N_CALLS, SIGTERMs the server 0.2 s later; (answers by call, seconds from the signal to
    the exit, seconds a call sent after the signal took to fail). One run serves both tests below."""
    tmp_path = tmp_path_factory.mktemp("shutdown")
    # Queued work is what is drained, so the test holds some in the server whatever its speed: on a
    # copy without the admission policy (which would rightly refuse work queued this long), the
    # encoder waits up to HOLD_S for a full batch. A fixed count of calls could not do it: each
    # speed-up of the request path let them all finish before the signal.
    def hold_partial_batches(cfg) -> None:
        if cfg.HasField("dynamic_batching"):
            cfg.dynamic_batching.ClearField("default_queue_policy")
            if cfg.name == spec.QUERY_ENCODER:
                cfg.dynamic_batching.max_queue_delay_microseconds = int(HOLD_S * 1e6)

    repository = linked_copy(ci_repository, tmp_path / "model_repository", hold_partial_batches)
    server = TritonServer(TritonSettings(repository=repository, ports=free_ports(), exit_timeout_s=EXIT_TIMEOUT_S))
    server.start()
    try:
        server.wait_ready()
        client = grpcclient.InferenceServerClient(server.grpc_url)
        results: queue.Queue = queue.Queue()
        for k in range(N_CALLS):
            client.async_infer(spec.SEARCH_RANK, _request(k), callback=lambda result, error, k=k: results.put((k, result, error)),
                               client_timeout=60)
        time.sleep(0.2)  # let the requests reach the server before it is told to stop
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert results.qsize() <= spec.ENCODER_MAX_BATCH, "held calls were answered before the signal"
        answers = dict((k, (r, e)) for k, r, e in (results.get(timeout=60) for _ in range(N_CALLS)))
        # a call after the signal is refused quickly (unloaded model or closed port), never hangs
        started = time.monotonic()
        with pytest.raises(Exception):
            client.infer(spec.SEARCH_RANK, _request(99), client_timeout=EXIT_TIMEOUT_S + 10)
        refused_after_s = time.monotonic() - started
        client.close()
        assert server.process.wait(timeout=EXIT_TIMEOUT_S + 30) == 0
        return answers, time.monotonic() - signalled, refused_after_s
    finally:
        server.stop()


def test_sigterm_exits_in_time_and_fails_admitted_calls_only_retryably(sigterm_with_queued_work):
    answers, exit_s, refused_after_s = sigterm_with_queued_work
    assert exit_s < EXIT_TIMEOUT_S + 15 and refused_after_s < 10
    # the full batch that was executing when the signal came (whichever 8 arrived first) completes
    done = [result for result, error in answers.values() if error is None]
    assert len(done) >= spec.ENCODER_MAX_BATCH, {k: str(e) for k, (_, e) in answers.items()}
    assert all(len(r.as_numpy(spec.ITEM_IDS.name)) == spec.MAX_CANDIDATES for r in done)
    # whatever fails is a retryable refusal, never a hang, a crash or a wrong answer
    for k, (result, error) in answers.items():
        if error is not None:
            assert error.status() == "StatusCode.UNAVAILABLE", (k, error)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "Triton 2.51 stops every model's scheduler at once on SIGTERM: a request queued in query_encoder "
    "is drained there, then refused entering the ranker ('Server is stopping, scheduler for model has "
    "stopped accepting new inference requests'). Deployments drain first: readiness fails and the "
    "preStop pause outlasts in-flight work before SIGTERM (docs/reliability.md). strict: passing "
    "means a Triton upgrade fixed it, so this marker must go."))
def test_sigterm_completes_requests_queued_between_ensemble_steps(sigterm_with_queued_work):
    answers, _, _ = sigterm_with_queued_work
    failed = {k: str(e) for k, (_, e) in answers.items() if e is not None}
    assert not failed, f"requests admitted before SIGTERM failed: {failed}"
