"""The container's liveness probe (deploy.probe) against the real server: live while every
python-backend stub runs, not live once one is killed, which Triton's own /v2/health/live misses."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conversion.stages import REPO_ROOT
from deploy import probe
from model_repository import spec
from model_repository.triton_server import backend_stubs, run_triton_server


def _probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy.probe", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.unit
def test_expected_stubs_is_one_per_python_model_instance(ci_repository, ci_pipeline):
    assert probe.expected_stubs(ci_repository) == sum(m.instance_count for m in ci_pipeline.models)


@pytest.mark.unit
def test_probe_refuses_bad_input(tmp_path):
    r = _probe("--server-pid", str(2 ** 22 + 1))
    assert r.returncode == 1 and r.stderr.strip() == f"not live: no process {2 ** 22 + 1}"
    r = _probe("--server-pid", str(os.getpid()), "--repository", str(tmp_path))
    assert r.returncode == 2 and "is not a rendered model repository" in r.stderr


@pytest.mark.server
@pytest.mark.reliability
def test_probe_fails_when_a_stub_dies_though_triton_says_live(ci_repository):
    with run_triton_server(ci_repository, exit_timeout_s=5) as server:
        args = (f"--server-pid={server.process.pid}", f"--http-url={server.http_url}", f"--repository={ci_repository}")
        r = _probe(*args)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == (f"live: tritonserver {server.process.pid}, "
                                    f"{probe.expected_stubs(ci_repository)} backend stubs running")
        ranker = [pid for pid in backend_stubs(server.process.pid)
                  if f"/{spec.RANKER}/" in Path(f"/proc/{pid}/cmdline").read_text()]
        assert len(ranker) == spec.CPU_RANKER_INSTANCES  # one of them is killed
        os.kill(ranker[0], signal.SIGKILL)
        time.sleep(1.0)
        with urllib.request.urlopen(f"{server.http_url}/v2/health/live", timeout=5) as live:
            assert live.status == 200, "Triton noticed by itself; the deep probe would not be needed"
        r = _probe(*args)
        assert r.returncode == 1
        assert r.stderr.strip() == (f"not live: python-backend stub(s) [{ranker[0]}] of tritonserver "
                                    f"{server.process.pid} died; Triton does not restart them")
        server.kill()  # a server with a dead stub may not stop on SIGINT (docs/deploy.md)
