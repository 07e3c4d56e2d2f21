"""TensorRT engine builder: profiles, names, cache keys, reuse and the CLI on any machine;
building and running a real plan where TensorRT and a GPU exist (`gpu`, skipped elsewhere)."""
from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conversion import build_trt_engine as bte
from conversion.stages import settings_hash
from model_repository import spec

REPO_ROOT = Path(__file__).resolve().parents[2]
ENCODER_NAMES = [spec.INPUT_IDS.name, spec.ATTENTION_MASK.name]
unit = pytest.mark.unit
gpu = pytest.mark.gpu


def _tiny_onnx(path: Path, kind: str = "fp32") -> Path:
    """A two-input encoder-shaped graph whose only purpose is its precision signature."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    dyn = ["batch", "sequence"]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, dyn) for n in ENCODER_NAMES]
    out = helper.make_tensor_value_info("EMBEDDING", TensorProto.FLOAT, ["batch", 4])
    ftype = np.float16 if kind == "fp16" else np.float32
    nodes = [helper.make_node("Cast", [spec.INPUT_IDS.name], ["x"], to=TensorProto.FLOAT16 if kind == "fp16" else TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["x"], ["m"], axes=[1], keepdims=1)]
    inits = [numpy_helper.from_array(np.ones((1, 4), ftype), "w")]
    last = "m"
    if kind == "int8-qdq":
        inits += [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")]
        nodes += [helper.make_node("QuantizeLinear", ["m", "s", "z"], ["q"]),
                  helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"])]
        last = "dq"
    nodes.append(helper.make_node("Mul", [last, "w"], ["y"]))
    nodes.append(helper.make_node("Cast", ["y"], ["EMBEDDING"], to=TensorProto.FLOAT))
    graph = helper.make_graph(nodes, "tiny", inputs, [out], initializer=inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


# ---- profiles ------------------------------------------------------------------------------


@unit
def test_encoder_inputs_are_the_spec_tensors():
    assert list(bte.ENCODER_INPUTS) == ENCODER_NAMES
    assert all(dims == (-1,) for dims in bte.ENCODER_INPUTS.values())  # [batch, sequence]


@unit
def test_default_profile_spans_batch_1_to_64_and_every_bucket():
    s = bte.TrtBuildSettings()
    profiles = bte.optimization_profiles(s, bte.ENCODER_INPUTS, bte.ENCODER_INPUTS)
    assert len(profiles) == 1
    (p,) = profiles
    assert list(p) == ENCODER_NAMES
    for r in p.values():
        assert r.min == (1, min(spec.SEQ_BUCKETS)) and r.max == (64, max(spec.SEQ_BUCKETS))
        assert all(lo <= o <= hi for lo, o, hi in zip(r.min, r.opt, r.max))
        assert r.opt == (16, min(spec.SEQ_BUCKETS))
    for batch in (1, 7, 64):
        for bucket in spec.SEQ_BUCKETS:
            assert all(_fits(r, (batch, bucket)) for r in p.values())
    assert not _fits(p[spec.INPUT_IDS.name], (65, 16)) and not _fits(p[spec.INPUT_IDS.name], (1, 129))


def _fits(r: bte.ShapeRange, shape) -> bool:
    return all(lo <= d <= hi for lo, d, hi in zip(r.min, shape, r.max))


@unit
def test_per_bucket_profiles_partition_the_single_range():
    s = bte.TrtBuildSettings(profile_strategy="per-bucket")
    profiles = bte.optimization_profiles(s, ENCODER_NAMES)
    assert len(profiles) == len(spec.SEQ_BUCKETS)
    for p, bucket in zip(profiles, spec.SEQ_BUCKETS):
        assert set(p) == set(ENCODER_NAMES)
        r = p[spec.ATTENTION_MASK.name]
        assert r.max == (64, bucket) and r.opt == (16, bucket) and r.min[0] == 1
    # every length 16..128 is served by exactly one profile
    for length in range(min(spec.SEQ_BUCKETS), max(spec.SEQ_BUCKETS) + 1):
        assert sum(_fits(p[spec.INPUT_IDS.name], (1, length)) for p in profiles) == 1, length
    assert not any(_fits(p[spec.INPUT_IDS.name], (1, min(spec.SEQ_BUCKETS) - 1)) for p in profiles)


@unit
def test_custom_opt_shape_is_used():
    s = bte.TrtBuildSettings(min_batch=2, opt_batch=64, max_batch=64, opt_sequence=128)
    (p,) = bte.optimization_profiles(s, ENCODER_NAMES)
    assert p[spec.INPUT_IDS.name] == bte.ShapeRange((2, min(spec.SEQ_BUCKETS)), (64, 128), (64, 128))


@unit
def test_inputs_without_sequence_axis_get_fixed_dims_and_one_profile():
    # The ranker's inputs: every non-batch dim is fixed, so per-bucket has nothing to split.
    dims = {spec.query_embedding(384).name: (384,), spec.ITEM_FEATURES.name: spec.ITEM_FEATURES.dims}
    s = bte.TrtBuildSettings(max_batch=4 * spec.MAX_CANDIDATES, profile_strategy="per-bucket")
    (p,) = bte.optimization_profiles(s, dims, dims)
    n = len(spec.ITEM_FEATURE_COLUMNS)
    assert p[spec.ITEM_FEATURES.name] == bte.ShapeRange((1, n), (16, n), (4000, n))
    assert p[spec.query_embedding(384).name].max == (4000, 384)


@unit
def test_profiles_need_inputs():
    with pytest.raises(ValueError, match="no inputs"):
        bte.optimization_profiles(bte.TrtBuildSettings(), [])


@unit
@pytest.mark.parametrize("kwargs, field", [
    ({"min_batch": 8, "max_batch": 4}, "max_batch"),
    ({"min_batch": 0}, "min_batch"),
    ({"opt_batch": 65}, "opt_batch"),
    ({"precision": "int4"}, "precision"),
    ({"profile_strategy": "auto"}, "profile_strategy"),
    ({"seq_buckets": (32, 16)}, "seq_buckets"),
    ({"seq_buckets": ()}, "seq_buckets"),
    ({"opt_sequence": 256}, "opt_sequence"),
    ({"workspace_gib": 0}, "workspace_gib"),
    ({"builder_optimization_level": 6}, "builder_optimization_level"),
])
def test_settings_reject_bad_values(kwargs, field):
    with pytest.raises(bte.SettingsError) as e:
        bte.TrtBuildSettings(**kwargs)
    assert e.value.field == field and field in str(e.value)


# ---- names and keys ------------------------------------------------------------------------

SHA = "a" * 64


@unit
def test_engine_name_carries_precision_shapes_and_sparsity():
    name = bte.engine_name(bte.TrtBuildSettings(precision="int8-qdq", sparse_weights=True), SHA)
    assert name.startswith(f"encoder.int8-qdq.b1-64.s{min(spec.SEQ_BUCKETS)}-128.sparse.") and name.endswith(".plan")
    assert bte.engine_name(bte.TrtBuildSettings(), SHA).startswith(f"encoder.fp32.b1-64.s{min(spec.SEQ_BUCKETS)}-128.")
    assert f".p{len(spec.SEQ_BUCKETS)}." in bte.engine_name(bte.TrtBuildSettings(profile_strategy="per-bucket"), SHA)
    assert bte.engine_name(bte.TrtBuildSettings(), SHA, model="ranker").startswith("ranker.")
    assert bte.engine_name(bte.TrtBuildSettings(), SHA) == bte.engine_name(bte.TrtBuildSettings(), SHA)


@unit
@pytest.mark.parametrize("change", [
    {"precision": "fp16"}, {"max_batch": 32}, {"seq_buckets": (16, 32, 64)}, {"sparse_weights": True},
    {"opt_sequence": 32}, {"workspace_gib": 8.0}, {"profile_strategy": "per-bucket"},
])
def test_engine_name_differs_by_setting(change):
    base = bte.TrtBuildSettings()
    assert bte.engine_name(dataclasses.replace(base, **change), SHA) != bte.engine_name(base, SHA)


@unit
def test_engine_name_differs_by_onnx_hash():
    s = bte.TrtBuildSettings()
    assert bte.engine_name(s, "a" * 64) != bte.engine_name(s, "b" * 64)


TARGET = bte.BuildTarget(tensorrt_version="10.13.0.35", gpu_name="NVIDIA H100 80GB HBM3",
                         compute_capability="9.0", cuda_driver="12.8")


@unit
def test_cache_key_holds_exactly_the_reuse_fields():
    s = bte.TrtBuildSettings()
    key = bte.engine_cache_key(s, SHA, TARGET)
    assert set(key) == set(bte.KEY_FIELDS)
    assert key["settings_hash"] == settings_hash(s) and key["onnx_sha256"] == SHA
    assert key["gpu_name"] == TARGET.gpu_name and key["compute_capability"] == "9.0"
    assert bte.engine_cache_key(bte.TrtBuildSettings(sparse_weights=True), SHA, TARGET)["settings_hash"] != key["settings_hash"]


# ---- metadata and reuse --------------------------------------------------------------------


@pytest.fixture()
def published(tmp_path):
    s = bte.TrtBuildSettings()
    key = bte.engine_cache_key(s, SHA, TARGET)
    plan = tmp_path / bte.engine_name(s, SHA)
    bte._publish(plan, b"serialized-engine-bytes", {"key": key, "cuda_driver": TARGET.cuda_driver})
    return plan, key


@unit
def test_published_engine_is_reusable_for_its_key(published):
    plan, key = published
    assert bte.engine_is_reusable(plan, key)
    meta = bte.load_engine_metadata(plan)
    assert meta["key"] == key and meta["plan_bytes"] == len(b"serialized-engine-bytes")
    assert bte.metadata_path(plan) == plan.with_suffix(".json") and bte.metadata_path(plan).is_file()
    assert not [p for p in plan.parent.iterdir() if ".tmp-" in p.name]


@unit
@pytest.mark.parametrize("field, value", [
    ("gpu_name", "NVIDIA A10G"), ("compute_capability", "8.6"), ("tensorrt_version", "11.4.0.106"),
    ("onnx_sha256", "b" * 64), ("settings_hash", "0123456789"),
])
def test_engine_with_a_different_key_field_is_not_reusable(published, field, value):
    plan, key = published
    assert not bte.engine_is_reusable(plan, dict(key, **{field: value}))


@unit
def test_missing_or_corrupt_metadata_is_not_reusable(published):
    plan, key = published
    meta = bte.metadata_path(plan)
    meta.write_text("{not json")
    assert bte.load_engine_metadata(plan) is None and not bte.engine_is_reusable(plan, key)
    meta.write_text(json.dumps(["a", "list"]))
    assert not bte.engine_is_reusable(plan, key)
    meta.write_text(json.dumps({"plan_bytes": 1}))  # no key at all
    assert not bte.engine_is_reusable(plan, key)
    meta.unlink()
    assert bte.load_engine_metadata(plan) is None and not bte.engine_is_reusable(plan, key)


@unit
def test_changed_or_missing_plan_is_not_reusable(published):
    plan, key = published
    plan.write_bytes(b"serialized-engine-bytez")  # same size, other bytes
    assert not bte.engine_is_reusable(plan, key)
    plan.unlink()
    assert not bte.engine_is_reusable(plan, key)


@unit
def test_incomplete_expected_key_is_an_error(published):
    plan, key = published
    with pytest.raises(ValueError, match="gpu_name"):
        bte.engine_is_reusable(plan, {k: v for k, v in key.items() if k != "gpu_name"})


@unit
def test_failed_rewrite_leaves_nothing_reusable(published, monkeypatch):
    plan, key = published
    real_write = bte._atomic_write

    def crash_on_metadata(path, data):
        if path.suffix == ".json":
            raise OSError("disk full")
        real_write(path, data)

    monkeypatch.setattr(bte, "_atomic_write", crash_on_metadata)
    with pytest.raises(OSError):
        bte._publish(plan, b"a newer engine", {"key": key})
    assert plan.read_bytes() == b"a newer engine"
    assert not bte.metadata_path(plan).exists() and not bte.engine_is_reusable(plan, key)


# ---- precision and build_engine without TensorRT -------------------------------------------


@unit
@pytest.mark.parametrize("kind", bte.PRECISIONS)
def test_detect_precision(tmp_path, kind):
    assert bte.detect_precision(_tiny_onnx(tmp_path / "m.onnx", kind)) == kind


@unit
def test_build_engine_rejects_a_label_the_onnx_does_not_have(tmp_path):
    onnx_path = _tiny_onnx(tmp_path / "encoder.onnx", "fp32")
    with pytest.raises(bte.SettingsError, match="which is fp32"):
        bte.build_engine(onnx_path, tmp_path / "out", bte.TrtBuildSettings(precision="fp16"))


@unit
def test_build_engine_without_tensorrt_raises_typed_error_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail on any machine
    with pytest.raises(bte.TensorRTUnavailableError, match="tensorrt") as e:
        bte.build_engine(_tiny_onnx(tmp_path / "encoder.onnx"), tmp_path / "out", bte.TrtBuildSettings())
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


@unit
def test_build_engine_missing_onnx(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        bte.build_engine(tmp_path / "nope.onnx", tmp_path / "out", bte.TrtBuildSettings())


# ---- CLI -----------------------------------------------------------------------------------


def _cli(argv, capsys) -> tuple[int, str]:
    try:
        code = bte.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@unit
def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        bte.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--onnx" in out and "--sparse" in out and "--timing-cache" in out


@unit
@pytest.mark.parametrize("extra, flag", [
    (["--min-batch", 8, "--max-batch", 4], "--max-batch"),
    (["--max-batch", 0], "--max-batch"),
    (["--min-batch", -1], "--min-batch"),
    (["--opt-batch", 100], "--opt-batch"),
    (["--precision", "int4"], "--precision"),
    (["--precision", "int8-qdq"], "--precision"),  # the tiny ONNX is fp32
    (["--seq-buckets", "64,32"], "--seq-buckets"),
    (["--opt-seq", 512], "--opt-seq"),
    (["--opt-level", 9], "--opt-level"),
    (["--workspace-gib", "0"], "--workspace-gib"),
])
def test_cli_bad_argument_is_one_line_naming_it(tmp_path, capsys, extra, flag):
    onnx_path = _tiny_onnx(tmp_path / "encoder.onnx")
    code, err = _cli(["--onnx", onnx_path, "--out", tmp_path / "out", *extra], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and flag in err, err
    assert not (tmp_path / "out").exists()


@unit
def test_cli_missing_onnx_file(tmp_path, capsys):
    code, err = _cli(["--onnx", tmp_path / "missing.onnx", "--out", tmp_path / "out"], capsys)
    assert code == 2 and err.strip() == f"error: argument --onnx: file not found: {tmp_path / 'missing.onnx'}"


@unit
def test_cli_without_tensorrt_or_gpu_exits_2_with_one_line(tmp_path):
    # An empty CUDA_VISIBLE_DEVICES hides any GPU, so this holds on GPU machines as well.
    onnx_path = _tiny_onnx(tmp_path / "encoder.onnx")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-m", "conversion.build_trt_engine", "--onnx", str(onnx_path),
                        "--out", str(tmp_path / "out")], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: TensorRT not available: "), r.stderr
    assert r.stdout == "" and not (tmp_path / "out").exists()


# ---- on a GPU with TensorRT ----------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_target() -> bte.BuildTarget:
    pytest.importorskip("tensorrt", reason="the tensorrt package is not installed")
    try:
        return bte.probe_target()
    except bte.TensorRTUnavailableError as e:
        pytest.skip(f"no GPU for TensorRT: {e}")


@pytest.fixture(scope="module")
def encoder_dir(gpu_target) -> Path:
    from conversion import export_encoder as ee

    return ee.export_encoder()  # the cached stage-01 folder, exported on first use


@pytest.fixture(scope="module")
def fp32_engine(gpu_target, encoder_dir, tmp_path_factory):
    from conversion import export_encoder as ee

    out = tmp_path_factory.mktemp("engines")
    settings = bte.TrtBuildSettings(precision="fp32")
    plan = bte.build_engine(encoder_dir / ee.ENCODER_ONNX, out, settings, timing_cache=out / "timing.cache")
    return plan, settings, out / "timing.cache"


class _Cuda:
    """Just enough of the CUDA driver API (ctypes) to feed a plan, so the tests need no CUDA package."""

    def __init__(self):
        self.cu = ctypes.CDLL("libcuda.so.1")
        dev, ctx, self.stream = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_void_p()
        self._ok(self.cu.cuInit(0))
        self._ok(self.cu.cuDeviceGet(ctypes.byref(dev), 0))
        self._ok(self.cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev))  # the context TensorRT uses
        self._ok(self.cu.cuCtxSetCurrent(ctx))
        self._ok(self.cu.cuStreamCreate(ctypes.byref(self.stream), 0))
        self.buffers: list[ctypes.c_uint64] = []

    @staticmethod
    def _ok(rc: int) -> None:
        assert rc == 0, f"CUDA driver call failed with CUresult {rc}"

    def alloc(self, nbytes: int) -> int:
        ptr = ctypes.c_uint64()
        self._ok(self.cu.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(max(nbytes, 1))))
        self.buffers.append(ptr)
        return ptr.value

    def upload(self, arr: np.ndarray) -> int:
        ptr = self.alloc(arr.nbytes)
        self._ok(self.cu.cuMemcpyHtoD_v2(ctypes.c_uint64(ptr), arr.ctypes.data_as(ctypes.c_void_p), ctypes.c_size_t(arr.nbytes)))
        return ptr

    def download(self, ptr: int, arr: np.ndarray) -> None:
        self._ok(self.cu.cuStreamSynchronize(self.stream))
        self._ok(self.cu.cuMemcpyDtoH_v2(arr.ctypes.data_as(ctypes.c_void_p), ctypes.c_uint64(ptr), ctypes.c_size_t(arr.nbytes)))

    def free(self) -> None:
        for ptr in self.buffers:
            self.cu.cuMemFree_v2(ptr)
        self.buffers.clear()


def _trt_embed(engine, cuda: _Cuda, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    import tensorrt as trt

    ctx = engine.create_execution_context()
    for name, arr in ((spec.INPUT_IDS.name, ids), (spec.ATTENTION_MASK.name, mask)):
        arr = np.ascontiguousarray(arr, dtype=trt.nptype(engine.get_tensor_dtype(name)))
        assert ctx.set_input_shape(name, arr.shape), f"{name} {arr.shape} is outside the profile"
        ctx.set_tensor_address(name, cuda.upload(arr))
    name = spec.text_embedding(0).name
    out = np.empty(tuple(ctx.get_tensor_shape(name)), dtype=trt.nptype(engine.get_tensor_dtype(name)))
    ptr = cuda.alloc(out.nbytes)
    ctx.set_tensor_address(name, ptr)
    assert ctx.execute_async_v3(cuda.stream.value)
    cuda.download(ptr, out)
    cuda.free()
    return out


def _deserialize(plan: Path):
    import tensorrt as trt

    engine = trt.Runtime(bte._trt_logger(trt)).deserialize_cuda_engine(plan.read_bytes())
    assert engine is not None, f"TensorRT could not load {plan}"
    return engine


@gpu
def test_fp32_engine_metadata_timing_cache_and_reuse(gpu_target, encoder_dir, fp32_engine):
    from conversion import export_encoder as ee

    plan, settings, cache = fp32_engine
    onnx_path = encoder_dir / ee.ENCODER_ONNX
    key = bte.engine_cache_key(settings, bte.sha256_file(onnx_path), gpu_target)
    assert plan.name.startswith(f"encoder.fp32.b1-64.s{min(spec.SEQ_BUCKETS)}-128.") and plan.stat().st_size > 1_000_000
    assert bte.load_engine_metadata(plan)["key"] == key and bte.engine_is_reusable(plan, key)
    assert cache.is_file() and cache.stat().st_size > 0
    mtime = plan.stat().st_mtime_ns
    assert bte.build_engine(onnx_path, plan.parent, settings, timing_cache=cache) == plan
    assert plan.stat().st_mtime_ns == mtime, "a matching plan was rebuilt instead of reused"
    assert not bte.engine_is_reusable(plan, dict(key, gpu_name="some other GPU"))


@gpu
def test_fp32_engine_has_the_computed_profile(fp32_engine):
    plan, settings, _ = fp32_engine
    engine = _deserialize(plan)
    assert engine.num_optimization_profiles == 1
    (expected,) = bte.optimization_profiles(settings, ENCODER_NAMES)
    for name, r in expected.items():
        assert [tuple(s) for s in engine.get_tensor_profile_shape(name, 0)] == [r.min, r.opt, r.max]


@gpu
def test_fp32_engine_matches_onnxruntime(encoder_dir, fp32_engine):
    from conversion import export_encoder as ee
    from model_repository.runtime import BucketTokenizer, ort_session

    engine = _deserialize(fp32_engine[0])
    tok = BucketTokenizer(encoder_dir / ee.TOKENIZER_JSON)
    session = ort_session(encoder_dir / ee.ENCODER_ONNX, threads=4)
    words = "red running shoes for trail and road with breathable mesh upper and cushioned sole".split()
    cuda = _Cuda()
    seen_buckets = set()
    for n_words, batch in [(3, 1), (3, 7), (20, 5), (45, 3), (110, 2), (110, 64)]:
        texts = [" ".join((words[i % len(words):] + words * 10)[:n_words]) for i in range(batch)]
        ids, mask = tok.encode(texts)
        seen_buckets.add(ids.shape[1])
        ref = session.run(None, {spec.INPUT_IDS.name: ids, spec.ATTENTION_MASK.name: mask})[0]
        got = _trt_embed(engine, cuda, ids, mask)
        assert got.shape == ref.shape
        cosine = np.sum(got * ref, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
        # TF32 (TensorRT's default for fp32) gives ~1e-3 relative error, not ORT's 1e-7.
        assert cosine.min() >= 0.999, (ids.shape, cosine.min())
        assert np.abs(got - ref).max() <= 5e-3, (ids.shape, np.abs(got - ref).max())
    assert seen_buckets == set(spec.SEQ_BUCKETS), seen_buckets


@gpu
@pytest.mark.slow
def test_per_bucket_engine_has_one_profile_per_bucket(gpu_target, encoder_dir, tmp_path):
    from conversion import export_encoder as ee

    settings = bte.TrtBuildSettings(profile_strategy="per-bucket")
    engine = _deserialize(bte.build_engine(encoder_dir / ee.ENCODER_ONNX, tmp_path, settings))
    assert engine.num_optimization_profiles == len(spec.SEQ_BUCKETS)
    for k, bucket in enumerate(spec.SEQ_BUCKETS):
        assert tuple(engine.get_tensor_profile_shape(spec.INPUT_IDS.name, k)[2]) == (64, bucket)
