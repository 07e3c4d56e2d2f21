"""The container entrypoint: CLI, target choice, engine cache policy, production flags, and its CPU
path starting the real tritonserver (exec'd in place of the Python process)."""
from __future__ import annotations

import os
import shutil
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

sys.path.insert(0, str(Path(__file__).parent))
from standin_builder import A10G, L4, FakeBuilder  # noqa: E402  (tests/deploy is no package)


def _no_gpu_env() -> dict[str, str]:
    """This environment with every GPU hidden from CUDA: the CPU-path tests then mean the same on a GPU
    runner as here (cuInit finds no device, probe_target raises), instead of being skipped there."""
    return dict(os.environ, CUDA_VISIBLE_DEVICES="")


def _entrypoint(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy.entrypoint", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout, env=_no_gpu_env())


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
def test_target_gpu_without_tensorrt_fails_instead_of_serving_cpu():
    r = _entrypoint("--target", "gpu")
    assert r.returncode == 2
    assert r.stderr.startswith("error: --target gpu but TensorRT/GPU not usable")
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.unit
def test_auto_falls_back_to_cpu_without_gpu():
    code = ("from deploy.entrypoint import choose_target; "
            "assert choose_target('auto') == ('cpu', None); assert choose_target('cpu') == ('cpu', None)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                       env=_no_gpu_env())
    assert r.returncode == 0, r.stderr[-2000:]


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


# ---- the server's TensorRT version (issue 18, defect 2): a real dlopen of a stand-in libnvinfer --------

FAKE_LIBNVINFER = r"""
int getInferLibVersion(void) { return %d; }
int getInferLibBuildVersion(void) { return %d; }
"""


@pytest.fixture(scope="module")
def fake_trt(tmp_path_factory):
    """(make_lib(version) -> .so path, pythonpath with a `tensorrt` package of a given version)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the stand-in libnvinfer")
    work = tmp_path_factory.mktemp("fake-trt")

    def lib(version: str) -> Path:
        major, minor, patch, build = (int(x) for x in version.split("."))
        src, so = work / f"nvinfer-{version}.c", work / f"libnvinfer-{version}.so"
        src.write_text(FAKE_LIBNVINFER % (major * 10000 + minor * 100 + patch, build))
        subprocess.run([cc, "-shared", "-fPIC", "-o", str(so), str(src)], check=True)
        return so

    def wheel(version: str) -> str:
        pkg = work / f"wheel-{version}" / "tensorrt"
        pkg.mkdir(parents=True, exist_ok=True)
        (pkg / "__init__.py").write_text(f"__version__ = {version!r}\n")
        return str(pkg.parent)

    return lib, wheel


def _check_versions(library: Path, wheel_path: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([wheel_path, str(REPO_ROOT)]))
    return subprocess.run([sys.executable, "-m", "deploy.engines", "check-versions", "--library", str(library)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.unit
def test_image_build_check_passes_when_wheel_and_server_agree(fake_trt):
    lib, wheel = fake_trt
    r = _check_versions(lib("10.8.0.43"), wheel("10.8.0.43"))
    assert r.returncode == 0, r.stderr
    assert "10.8.0.43" in r.stdout


@pytest.mark.unit
def test_image_build_check_fails_when_the_wheel_is_another_release(fake_trt):
    lib, wheel = fake_trt
    r = _check_versions(lib("10.8.0.43"), wheel("10.9.0.34"))
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1
    assert "10.9.0.34" in r.stderr and "10.8.0.43" in r.stderr and "would not load" in r.stderr


@pytest.mark.unit
def test_cache_is_keyed_on_the_servers_tensorrt(fake_trt, monkeypatch, tmp_path):
    lib, wheel = fake_trt
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([wheel("10.8.0.43"), str(REPO_ROOT)]))
    # The node as the wheel saw it claims 10.8.0; the key must carry the server's full version.
    target = engines.server_target(BuildTarget("10.8.0", "NVIDIA A10G", "8.6", "12.8"), str(lib("10.8.0.43")))
    assert target.tensorrt_version == "10.8.0.43"
    build = FakeBuilder()
    plan = engines.ensure_engine(tmp_path / "e.onnx", tmp_path, TrtBuildSettings(), target, build=build,
                                 deserializes=lambda p: True)
    assert build.targets == [target] and plan.parent.name.endswith("trt10.8.0.43")


@pytest.mark.unit
def test_builder_refuses_a_plan_for_another_tensorrt():
    from conversion.build_trt_engine import same_tensorrt_release

    assert same_tensorrt_release("10.8.0.43", "10.8.0") and same_tensorrt_release("10.8.0.43", "10.8.0.43")
    assert not same_tensorrt_release("10.8.0.43", "10.9.0.34") and not same_tensorrt_release("10.8.0.43", "10.8.1.5")
    assert not same_tensorrt_release("10", "10")


# ---- SIGTERM during an engine build (issue 18, defect 5) -----------------------------------------------

def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _start_slow_build(ci_bundle, tmp_path, as_pid_1: bool) -> tuple[subprocess.Popen, int]:
    """The real entrypoint on a pretend GPU node whose build hangs; returns (process, pid to signal)."""
    args = [sys.executable, str(Path(__file__).parent / "standin_builder.py"), "--bundle", str(ci_bundle.root),
            "--target", "gpu", "--repository", str(tmp_path / "repo"), "--engine-cache", str(tmp_path / "engines")]
    if as_pid_1:  # its own PID namespace, where it is init: exactly the container's PID 1
        args = ["unshare", "--pid", "--fork", "--mount-proc", *args]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen(args, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "BUILDING", proc.stderr.read()[-2000:]
        if not as_pid_1:
            return proc, proc.pid
        (inner,) = _children(proc.pid)
        (nspid,) = [line.split() for line in Path(f"/proc/{inner}/status").read_text().splitlines()
                    if line.startswith("NSpid:")]
        assert nspid[-1] == "1", f"not PID 1 inside its namespace: {nspid}"
        return proc, inner
    except BaseException:
        _kill(proc)
        raise


def _kill(proc: subprocess.Popen) -> None:
    """The process and, for unshare, the namespace's init below it (which outlives a killed unshare)."""
    for pid in [*_children(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _assert_stopped_clean(proc: subprocess.Popen, tmp_path: Path) -> None:
    started = time.monotonic()
    proc.wait(timeout=10)  # a handler-less PID 1 would still be here, waiting for SIGKILL
    assert time.monotonic() - started < 5
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr.read()[-2000:]
    assert "SIGTERM during start-up" in proc.stderr.read()
    left = [p for p in (tmp_path / "engines").rglob("*") if p.is_file() and p.name != engines.LOCK_FILE]
    assert left == [], f"an interrupted build left {left}"
    assert not (tmp_path / "repo").exists(), "nothing rendered for a plan that was never built"


@pytest.mark.unit
@pytest.mark.parametrize("as_pid_1", [False, True], ids=["child", "pid-1"])
def test_sigterm_during_engine_build_stops_at_once_and_leaves_no_plan(ci_bundle, tmp_path, as_pid_1):
    # As PID 1: the kernel drops a signal sent into a PID namespace to its init when init has no
    # handler for it, the container's case (the kubelet sends from outside). Needs root for the namespace.
    if as_pid_1 and (os.geteuid() != 0 or not shutil.which("unshare")):
        pytest.skip("needs root and unshare(1) for a PID namespace")
    proc, pid = _start_slow_build(ci_bundle, tmp_path, as_pid_1=as_pid_1)
    try:
        os.kill(pid, signal.SIGTERM)
        _assert_stopped_clean(proc, tmp_path)
    finally:
        if proc.poll() is None:
            _kill(proc)


# ---- the CPU path with the real server ---------------------------------------------------------

def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.server
def test_entrypoint_cpu_path_serves_search_rank(ci_bundle, tmp_path):
    ports = free_ports()
    proc = subprocess.Popen(
        [sys.executable, "-m", "deploy.entrypoint", "--bundle", str(ci_bundle.root), "--target", "auto",
         "--repository", str(tmp_path / "repo"), "--engine-cache", str(tmp_path / "engines"), "--host", "127.0.0.1",
         "--http-port", str(ports.http), "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics),
         "--exit-timeout-secs", "5"],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "entrypoint.log", "w"), env=_no_gpu_env())
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
def test_entrypoint_gpu_path_matches_the_fp32_reference(gpu_target, ci_bundle, tmp_path):
    """The served GPU pipeline against the FP32 reference, within DESIGN.md's gates (deploy.gpu_check's own
    measures, on the CI profile's held-out texts), not just "5 results came back"."""
    from deploy import gpu_check
    from deploy.entrypoint import NGC_TRITONSERVER

    if not NGC_TRITONSERVER.is_file():
        pytest.skip(f"needs the Triton container's server with the tensorrt backend ({NGC_TRITONSERVER})")
    settings = gpu_check.GpuCheckSettings(work=tmp_path, queries=100)
    server = gpu_check.start_server(settings, ci_bundle)
    try:
        queries, titles = gpu_check.heldout_texts(settings)
        from conversion.build_models import fp32_artifacts

        fp32, _ = fp32_artifacts(settings.profile)
        embed = gpu_check.text_embed_fidelity(server.grpc, fp32.encoder_dir, queries, titles)
        ranking = gpu_check.search_rank_agreement(server.grpc, settings.profile, queries[:50])
        assert '"target": "gpu"' in (tmp_path / "repository" / "MANIFEST.json").read_text()
        assert list((tmp_path / "engines").rglob("*.plan"))
    finally:
        gpu_check.stop_server(server)
    print(embed, ranking)
    assert embed["mean_cosine"] >= gpu_check.GATES["text_embed_mean_cosine"], embed
    assert embed["top10_overlap"] >= gpu_check.GATES["text_embed_top10_overlap"], embed
    assert ranking["top10_agreement"] >= gpu_check.GATES["search_rank_top10_agreement"], ranking
    assert server.process.returncode == 0
