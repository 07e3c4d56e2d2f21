"""`make serve`'s entry point: ready only when search_rank answers, Ctrl-C stops it cleanly."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from search_rank_client import SearchClient
from conversion.stages import REPO_ROOT
from model_repository.triton_server import free_ports

pytestmark = pytest.mark.server


def test_serve_reports_ready_then_stops_on_sigint(ci_repository, tmp_path):
    ports = free_ports()
    log_file = tmp_path / "triton.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "model_repository.triton_server", "--repository", str(ci_repository),
         "--grpc-port", str(ports.grpc), "--http-port", str(ports.http), "--metrics-port", str(ports.metrics),
         "--log-file", str(log_file)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        line = ""
        while "ready" not in line:
            assert proc.poll() is None, f"server CLI exited early: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "no ready line"
            line = proc.stdout.readline()
        assert f"127.0.0.1:{ports.grpc}" in line
        # "ready" is only printed after a real search_rank request went through.
        with SearchClient(f"127.0.0.1:{ports.grpc}", timeout_s=30) as c:
            assert c.is_ready()
            assert len(c.rank("desk lamp", 1, [1, 2, 3], top_k=2)) == 2
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=180) == 0
        with SearchClient(f"127.0.0.1:{ports.grpc}", timeout_s=1) as c:
            assert not c.is_live()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_fails_fast_on_missing_repository(tmp_path):
    result = subprocess.run([sys.executable, "-m", "model_repository.triton_server", "--repository",
                             str(tmp_path / "nope")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    assert "not a rendered model repository" in result.stderr
