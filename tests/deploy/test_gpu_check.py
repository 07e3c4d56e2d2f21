"""`make gpu-check` on a machine without a GPU: one line naming what is missing, within a second, non-zero."""
from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from conversion.stages import REPO_ROOT
from deploy import gpu_check

pytestmark = pytest.mark.unit


def _no_gpu() -> bool:
    return gpu_check._gpu_problem() is not None


@pytest.mark.skipif(not _no_gpu(), reason="this machine has a usable GPU: make gpu-check would run for real")
def test_make_gpu_check_stops_at_once_with_one_line():
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    started = time.monotonic()
    r = subprocess.run(["make", "-s", "--no-print-directory", "gpu-check"], cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=30)
    elapsed = time.monotonic() - started
    assert r.returncode != 0
    assert elapsed < 1.0, f"took {elapsed:.2f} s"
    lines = (r.stdout + r.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert "gpu-check: this machine lacks" in lines[0] and gpu_check._gpu_problem() in lines[0]


def test_preflight_names_a_missing_tensorrt_backend(tmp_path):
    server = tmp_path / "bin" / "tritonserver"
    server.parent.mkdir()
    server.write_text("")
    problems = gpu_check.missing(gpu_check.GpuCheckSettings(tritonserver=server))
    assert any("tensorrt backend" in p for p in problems)
    (tmp_path / "backends" / "tensorrt").mkdir(parents=True)
    assert not any("triton" in p.lower() for p in gpu_check.missing(gpu_check.GpuCheckSettings(tritonserver=server)))


def test_preflight_imports_only_the_standard_library():
    # It runs with the system Python before `make` has installed anything.
    code = ("import sys; import deploy.gpu_check; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('numpy', 'onnx', 'tritonclient', 'client', "
            "'conversion', 'model_repository')]; assert not bad, bad")
    r = subprocess.run(["python3", "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def test_report_markdown_has_the_issue_fields():
    report = {"gpu": "NVIDIA L4", "date": "2026-01-01", "profile": "ci", "seconds": 300.0, "server_ready_s": 95.0,
              "engines": [{"engine": "encoder.int8-qdq.plan", "build_seconds": 61.0, "plan_mb": 12.5}],
              "gates": {k: {"value": 0.99, "gate": v, "pass": True} for k, v in gpu_check.GATES.items()},
              "perf": [{"candidates": 100, "concurrency": 1, "p50_ms": 2.0, "p99_ms": 3.0, "throughput_per_s": 450.0,
                        "gpu_utilisation": 0.12},
                       {"candidates": 1000, "concurrency": 32, "error": "perf_analyzer failed"}]}
    md = gpu_check.markdown(report)
    for needle in ("| encoder.int8-qdq.plan | 61.0 | 12.5 |", "| 100 | 1 | 2.00 | 3.00 | 450 | 12 % |",
                   "search_rank_top10_agreement", "error: perf_analyzer failed", "budget 480 s"):
        assert needle in md
