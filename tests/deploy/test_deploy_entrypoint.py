"""The container entrypoint: CLI, target choice, engine cache policy, production flags, and its CPU
path starting the real tritonserver (exec'd in place of the Python process)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from search_rank_client import SearchClient
from conversion.build_trt_engine import BuildTarget, TensorRTUnavailableError, TrtBuildSettings
from conversion.stages import REPO_ROOT
from deploy import engines
from deploy.entrypoint import EntrypointSettings, choose_target, engine_settings, server_invocation
from model_repository import spec
from model_repository.triton_server import TritonPorts, free_ports


def _tensorrt_here() -> bool:
    try:
        from conversion.build_trt_engine import probe_target
        probe_target()
        return True
    except TensorRTUnavailableError:
        return False


def _entrypoint(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy.entrypoint", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


# ---- CLI --------------------------------------------------------------------------------------

@pytest.mark.unit
def test_help_lists_the_options():
    r = _entrypoint("--help")
    assert r.returncode == 0
    for flag in ("--bundle", "--target", "--engine-cache", "--exit-timeout-secs", "--print-command"):
        assert flag in r.stdout


@pytest.mark.unit
@pytest.mark.parametrize("args, expected", [
    (["--grpc-port", "70000"], "--grpc-port: port must be 1..65535"),
    (["--http-port", "x"], "not a port number"),
    (["--http-port", "9000", "--grpc-port", "9000"], "must differ"),
    (["--exit-timeout-secs", "-1"], "must be >= 0"),
    (["--target", "tpu"], "invalid choice"),
    (["--target", "cpu", "--bundle", "/nonexistent/bundle"], "is not a model bundle"),
])
def test_bad_input_is_one_line_and_nonzero(args, expected):
    r = _entrypoint(*args)
    assert r.returncode == 2
    assert expected in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.unit
@pytest.mark.skipif(_tensorrt_here(), reason="this machine has TensorRT and a GPU")
def test_target_gpu_without_tensorrt_fails_instead_of_serving_cpu():
    r = _entrypoint("--target", "gpu")
    assert r.returncode == 2
    assert r.stderr.startswith("error: --target gpu but TensorRT/GPU not usable")
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.unit
@pytest.mark.skipif(_tensorrt_here(), reason="this machine has TensorRT and a GPU")
def test_auto_falls_back_to_cpu_without_gpu():
    assert choose_target("auto") == ("cpu", None)
    assert choose_target("cpu") == ("cpu", None)


# ---- production flags ---------------------------------------------------------------------------

@pytest.mark.unit
def test_server_flags_are_production_flags(tmp_path):
    s = EntrypointSettings(ports=TritonPorts(http=18000, grpc=18001, metrics=18002), exit_timeout_s=17)
    argv, env = server_invocation(s, tmp_path, gpu=True)
    flags = dict(a.split("=", 1) for a in argv[1:])
    assert flags["--model-control-mode"] == "none"
    assert flags["--exit-timeout-secs"] == "17"
    assert flags["--strict-readiness"] == "true" and flags["--exit-on-error"] == "true"
    assert flags["--allow-metrics"] == "true" and flags["--allow-gpu-metrics"] == "true"
    assert (flags["--http-port"], flags["--grpc-port"], flags["--metrics-port"]) == ("18000", "18001", "18002")
    assert flags["--http-address"] == flags["--grpc-address"] == flags["--metrics-address"] == "0.0.0.0"
    assert flags["--model-repository"] == str(tmp_path.resolve())
    assert Path(argv[0]).name == "tritonserver" and os.access(argv[0], os.X_OK)
    assert str(REPO_ROOT) in env["PYTHONPATH"].split(os.pathsep)


@pytest.mark.unit
def test_cpu_server_has_no_gpu_metrics(tmp_path):
    argv, _ = server_invocation(EntrypointSettings(), tmp_path, gpu=False)
    assert "--allow-gpu-metrics=false" in argv


@pytest.mark.unit
def test_engine_batch_range_covers_the_encoder_config(ci_bundle):
    pipeline = spec.build_spec(ci_bundle.embedding_dim)
    s = engine_settings(ci_bundle, pipeline)
    assert s.max_batch == pipeline.model(spec.QUERY_ENCODER).max_batch_size
    assert s.seq_buckets == spec.SEQ_BUCKETS
    assert s.precision == ci_bundle.gpu_precision


# ---- engine cache policy (the builder is injected: no GPU here) ----------------------------------

A10G = BuildTarget("10.8.0.43", "NVIDIA A10G", "8.6", "12.8")
L4 = BuildTarget("10.8.0.43", "NVIDIA L4", "8.9", "12.8")


class FakeBuilder:
    """Stands in for build_engine: writes a plan file, records whether a rebuild was forced."""

    def __init__(self):
        self.calls: list[tuple[Path, bool]] = []

    def __call__(self, onnx, out, settings, timing_cache=None, *, force=False):
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        plan = out / "encoder.plan"
        if force or not plan.exists():
            plan.write_bytes(b"plan-%d" % len(self.calls))
        self.calls.append((out, force))
        return plan


@pytest.mark.unit
def test_cache_folder_per_gpu_kind():
    assert engines.target_folder_name(A10G) == "nvidia-a10g.cc8.6.trt10.8.0.43"
    names = {engines.target_folder_name(t) for t in
             (A10G, L4, BuildTarget("10.9.0.34", "NVIDIA A10G", "8.6", "12.8"))}
    assert len(names) == 3


@pytest.mark.unit
def test_reusable_plan_that_loads_is_served(tmp_path):
    build = FakeBuilder()
    plan = engines.ensure_engine(tmp_path / "e.onnx", tmp_path, TrtBuildSettings(), A10G, build=build,
                                 deserializes=lambda p: True)
    assert plan.parent == tmp_path / engines.target_folder_name(A10G)
    assert build.calls == [(plan.parent, False)]


@pytest.mark.unit
def test_plan_that_does_not_deserialize_is_rebuilt(tmp_path):
    build, seen = FakeBuilder(), []

    def deserializes(plan):
        seen.append(plan.read_bytes())
        return len(seen) > 1  # the cached plan is corrupt, the rebuilt one loads

    plan = engines.ensure_engine(tmp_path / "e.onnx", tmp_path, TrtBuildSettings(), L4, build=build,
                                 deserializes=deserializes)
    assert [force for _, force in build.calls] == [False, True]
    assert seen[0] != seen[1] == plan.read_bytes()


@pytest.mark.unit
def test_plan_that_never_deserializes_is_not_served(tmp_path):
    with pytest.raises(engines.EngineUnusableError, match="not serving it"):
        engines.ensure_engine(tmp_path / "e.onnx", tmp_path, TrtBuildSettings(), L4, build=FakeBuilder(),
                              deserializes=lambda p: False)


@pytest.mark.unit
def test_unwritable_cache_falls_back_to_a_temporary_folder(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    root = engines.writable_cache_root(blocker / "engines")
    assert root != blocker / "engines" and root.is_dir()


# ---- the CPU path with the real server ---------------------------------------------------------

def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.server
@pytest.mark.skipif(_tensorrt_here(), reason="auto would pick the GPU path on this machine")
def test_entrypoint_cpu_path_serves_search_rank(ci_bundle, tmp_path):
    ports = free_ports()
    proc = subprocess.Popen(
        [sys.executable, "-m", "deploy.entrypoint", "--bundle", str(ci_bundle.root), "--target", "auto",
         "--repository", str(tmp_path / "repo"), "--engine-cache", str(tmp_path / "engines"), "--host", "127.0.0.1",
         "--http-port", str(ports.http), "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics),
         "--exit-timeout-secs", "5"],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "entrypoint.log", "w"))
    try:
        with SearchClient(f"127.0.0.1:{ports.grpc}", timeout_s=30) as c:
            c.wait_ready(timeout_s=240)
            ranked = c.rank("wireless headphones", 1, list(range(1, 51)), top_k=5)
            assert len(ranked) == 5 and all(a.score >= b.score for a, b in zip(ranked, ranked[1:]))
        # exec, not a child: the process we started is now tritonserver itself.
        assert Path(f"/proc/{proc.pid}/exe").resolve().name == "tritonserver"
        assert _get(f"http://127.0.0.1:{ports.http}/v2/models/{spec.SEARCH_RANK}/ready") == 200
        assert _get(f"http://127.0.0.1:{ports.http}/v2/health/live") == 200
        assert not any((tmp_path / "engines").rglob("*.plan")), "the CPU path built an engine"
        manifest = (tmp_path / "repo" / "MANIFEST.json").read_text()
        assert '"target": "cpu"' in manifest
        proc.send_signal(signal.SIGTERM)  # what the kubelet sends after preStop
        started = time.monotonic()
        assert proc.wait(timeout=60) == 0
        assert time.monotonic() - started < 5 + 30, "drain took longer than the exit timeout allows"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print((tmp_path / "entrypoint.log").read_text()[-2000:])


# ---- GPU nodes only (skipped without TensorRT and a GPU; never run on the machine that wrote them) --

@pytest.fixture(scope="module")
def gpu_target() -> BuildTarget:
    pytest.importorskip("tensorrt", reason="the tensorrt package is not installed")
    from conversion.build_trt_engine import probe_target

    try:
        return probe_target()
    except TensorRTUnavailableError as e:
        pytest.skip(f"no GPU for TensorRT: {e}")


@pytest.mark.gpu
def test_engine_cache_on_a_real_gpu(gpu_target, ci_bundle, tmp_path):
    settings = engine_settings(ci_bundle, spec.build_spec(ci_bundle.embedding_dim))
    plan = engines.ensure_engine(ci_bundle.gpu_onnx, tmp_path, settings, gpu_target)
    assert plan.parent.name == engines.target_folder_name(gpu_target) and engines.plan_deserializes(plan)
    built = plan.stat().st_mtime_ns
    assert engines.ensure_engine(ci_bundle.gpu_onnx, tmp_path, settings, gpu_target) == plan
    assert plan.stat().st_mtime_ns == built, "a matching plan was rebuilt instead of reused"
    full = plan.read_bytes()
    plan.write_bytes(full[: len(full) // 2])  # a truncated copy in the cache, metadata intact
    again = engines.ensure_engine(ci_bundle.gpu_onnx, tmp_path, settings, gpu_target)
    assert engines.plan_deserializes(again) and again.stat().st_size > len(full) // 2


@pytest.mark.gpu
def test_entrypoint_gpu_path_serves_search_rank(gpu_target, ci_bundle, tmp_path):
    from deploy.entrypoint import NGC_TRITONSERVER

    if not NGC_TRITONSERVER.is_file():
        pytest.skip(f"needs the Triton container's server with the tensorrt backend ({NGC_TRITONSERVER})")
    ports = free_ports()
    proc = subprocess.Popen(
        [sys.executable, "-m", "deploy.entrypoint", "--bundle", str(ci_bundle.root), "--target", "gpu",
         "--repository", str(tmp_path / "repo"), "--engine-cache", str(tmp_path / "engines"), "--host", "127.0.0.1",
         "--http-port", str(ports.http), "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics)],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with SearchClient(f"127.0.0.1:{ports.grpc}", timeout_s=30) as c:
            c.wait_ready(timeout_s=1200)  # includes the engine build
            assert len(c.rank("wireless headphones", 1, list(range(1, 51)), top_k=5)) == 5
        assert '"target": "gpu"' in (tmp_path / "repo" / "MANIFEST.json").read_text()
        assert list((tmp_path / "engines").rglob("*.plan"))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
