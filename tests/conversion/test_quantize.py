"""conversion/quantize.py on a tiny two-layer MLP built here (the real encoder is measured in docs/quantization.md)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conversion import quantize as q

pytestmark = pytest.mark.unit

D_IN, D_HIDDEN, D_OUT = 16, 32, 16


def _mlp(path: Path, d_out: int = D_OUT, seed: int = 0) -> Path:
    """X [batch, 16] -> MatMul+Add+Relu -> MatMul+Add -> Y [batch, d_out]; weights ~ N(0, 1/fan_in)."""
    rng = np.random.default_rng(seed)
    w = lambda *shape: numpy_helper.from_array(  # noqa: E731
        (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32))
    inits = [w(D_IN, D_HIDDEN), w(D_HIDDEN), w(D_HIDDEN, d_out), w(d_out)]
    for t, name in zip(inits, ("w1", "b1", "w2", "b2")):
        t.name = name
    nodes = [helper.make_node("MatMul", ["X", "w1"], ["h0"], name="fc1"),
             helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
             helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
             helper.make_node("MatMul", ["h2", "w2"], ["h3"], name="fc2"),
             helper.make_node("Add", ["h3", "b2"], ["Y"], name="fc2_bias")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", D_IN])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", d_out])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _feeds(n: int = 8, rows: int = 16, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"X": rng.standard_normal((rows, D_IN)).astype(np.float32)} for _ in range(n)]


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.fixture(scope="module")
def fp32(tmp_path_factory) -> Path:
    return _mlp(tmp_path_factory.mktemp("fp32") / "mlp.onnx")


@pytest.fixture(scope="module")
def static_pc(fp32, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("static") / "mlp.int8.onnx"
    # reduce_range: without it the u8 x s8 kernels of AVX2 machines without VNNI saturate (docs/quantization.md).
    q.quantize_ort_int8(fp32, out, q.OrtInt8Settings(mode="static", reduce_range=True), _feeds())
    return out


def _assert_close(fp32: Path, int8: Path) -> None:
    # Held-out inputs, not the calibration ones. Outputs are O(1); each layer rounds weights (per channel) and
    # activations to 8 bits, i.e. relative steps of ~1/127 and ~1/255 whose errors mostly cancel over the
    # 16/32-term sums: the expected error is ~1% of the output scale. 5% leaves room for an unlucky draw and
    # still catches a wrong scale or zero point, which is off by tens of percent or more.
    x = np.random.default_rng(99).standard_normal((64, D_IN)).astype(np.float32)
    ref, got = _run(fp32, x), _run(int8, x)
    assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max()
    cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    assert cos.mean() > 0.999


def test_dynamic_uses_integer_matmul_and_stays_close(fp32, tmp_path):
    out = tmp_path / "mlp.int8.onnx"
    report = q.quantize_ort_int8(fp32, out)
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= _ops(out) and "MatMul" not in _ops(out)
    _assert_close(fp32, out)
    saved = json.loads(q.report_path(out).read_text())
    assert saved == report and saved["settings"]["mode"] == "dynamic" and saved["settings"]["per_channel"]
    assert saved["op_counts"]["MatMulInteger"] == 2 and saved["output_bytes"] == out.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.int8.onnx", "mlp.int8.quantization.json"]


def test_static_writes_qdq_and_stays_close(fp32, static_pc):
    assert {"QuantizeLinear", "DequantizeLinear", "MatMul"} <= _ops(static_pc)
    _assert_close(fp32, static_pc)
    report = json.loads(q.report_path(static_pc).read_text())
    assert report["settings"]["mode"] == "static" and report["calibration"] == {"feeds": 8, "rows": 128}


def test_structure_check_passes_on_per_channel_qdq(static_pc):
    assert q.check_qdq_structure(static_pc)["weighted_nodes_per_channel"] == 2


def test_structure_check_fails_on_per_tensor_scales(fp32, tmp_path):
    out = tmp_path / "per_tensor.onnx"
    q.quantize_ort_int8(fp32, out, q.OrtInt8Settings(mode="static", per_channel=False), _feeds())
    with pytest.raises(q.QdqStructureError, match="per-tensor scale"):
        q.check_qdq_structure(out)


def test_structure_check_fails_when_a_weight_skips_dequantize(static_pc, tmp_path):
    model = onnx.load(str(static_pc))
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    fc2 = next(n for n in graph.node if n.name.startswith("fc2") and n.op_type == "MatMul")
    dq = producer[fc2.input[1]]
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    # The weight as plain float, wired straight into the MatMul: what a missed weight looks like.
    w = (consts[dq.input[0]].astype(np.float32) - consts[dq.input[2]].astype(np.float32)) * consts[dq.input[1]]
    graph.initializer.append(numpy_helper.from_array(w.astype(np.float32), "w2_float"))
    fc2.input[1] = "w2_float"
    graph.node.remove(dq)
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    with pytest.raises(q.QdqStructureError, match="fc2.*input 1 .* not produced by DequantizeLinear"):
        q.check_qdq_structure(broken)
    assert q.check_qdq_structure(broken, exempt=["fc2.*"])["exempt"] == 1  # kept in float on purpose


def test_wrong_feed_names_and_dtypes_raise(fp32, tmp_path):
    with pytest.raises(q.CalibrationFeedError, match=r"missing \['X'\], unexpected \['x'\]"):
        q.quantize_ort_int8(fp32, tmp_path / "a.onnx", q.OrtInt8Settings(mode="static"),
                            [{"x": np.zeros((2, D_IN), np.float32)}])
    with pytest.raises(q.CalibrationFeedError, match="X is float64"):
        q.quantize_ort_int8(fp32, tmp_path / "a.onnx", q.OrtInt8Settings(mode="static"),
                            [{"X": np.zeros((2, D_IN))}])
    with pytest.raises(q.CalibrationFeedError, match="no calibration feeds"):
        q.quantize_ort_int8(fp32, tmp_path / "a.onnx", q.OrtInt8Settings(mode="static"))
    assert not any(tmp_path.iterdir())


def test_missing_model_raises(tmp_path):
    with pytest.raises(q.ModelFileError, match="not found"):
        q.quantize_ort_int8(tmp_path / "nope.onnx", tmp_path / "out.onnx")
    with pytest.raises(q.ModelFileError):
        q.quantize_qdq_modelopt(tmp_path / "nope.onnx", tmp_path / "out.onnx", _feeds())


def test_settings_are_validated():
    with pytest.raises(ValueError, match="mode"):
        q.OrtInt8Settings(mode="qoperator")
    with pytest.raises(ValueError, match="per channel only"):
        q.QdqSettings(per_channel=False)


def test_modelopt_qdq_is_per_channel_and_keeps_its_calibration_set(fp32, tmp_path):
    feeds = _feeds(n=6, rows=16)
    out = tmp_path / "mlp.qdq.onnx"
    report = q.quantize_qdq_modelopt(fp32, out, feeds, q.QdqSettings(n_calibration_samples=64))
    assert report["structure"]["weighted_nodes_per_channel"] == 2 and report["structure"]["exempt"] == 0
    assert q.check_qdq_structure(out) == report["structure"]
    _assert_close(fp32, out)
    saved = q.load_calibration(out.with_suffix(q.CALIBRATION_SUFFIX))
    assert [f["X"].shape[0] for f in saved] == [16, 16, 16, 16]  # 64 rows, in feed order
    np.testing.assert_array_equal(saved[0]["X"], feeds[0]["X"])
    assert json.loads(q.report_path(out).read_text())["calibration"]["rows"] == 64


def test_encoder_feeds_are_bucketed_like_serving(tmp_path):
    from model_repository import spec
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(40)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    texts = ["w1 w2"] * 5 + [" ".join(f"w{i}" for i in range(20))] * 3
    feeds = q.encoder_calibration_feeds(tmp_path / "tokenizer.json", texts, batch_size=4)
    shapes = [f[spec.INPUT_IDS.name].shape for f in feeds]
    assert shapes == [(4, 16), (1, 16), (3, 32)]
    assert all(f[spec.ATTENTION_MASK.name].dtype == np.int64 for f in feeds)
    assert feeds[0][spec.ATTENTION_MASK.name][0].sum() == 2


def test_modelopt_leaves_small_gemms_in_float_and_the_check_accepts_that(tmp_path):
    # modelopt skips GEMMs with K or N < 16 (slower in INT8 on TensorRT), like a ranker's 1-wide output layer.
    fp32 = _mlp(tmp_path / "narrow.onnx", d_out=8)
    report = q.quantize_qdq_modelopt(fp32, tmp_path / "narrow.qdq.onnx", _feeds(n=2), q.QdqSettings())
    assert report["structure"]["weighted_nodes_per_channel"] == 1 and report["structure"]["exempt"] == 1


def test_pre_process_runs_and_leaves_nothing_in_the_cwd(fp32, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = q.quantize_ort_int8(fp32, tmp_path / "pp.onnx", q.OrtInt8Settings(pre_process=True))
    assert report["pre_process"].startswith("symbolic shape inference")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pp.onnx", "pp.quantization.json"]


# ---- FP16 high precision (issue 18): what overflows stays FP32, the census says so --------------------

def _mlp_with_overflow(path: Path) -> Path:
    """The MLP, then Y = (h * 2e4) / 2e4: the scaled tensor (and the constant) exceed fp16's range / margin,
    so exactly that Mul and that Div must stay FP32 while the rest becomes FP16."""
    _mlp(path)
    model = onnx.load(str(path))
    g = model.graph
    g.node[-1].output[0] = "h4"
    g.initializer.append(numpy_helper.from_array(np.array(2e4, np.float32), "big"))
    g.node.extend([helper.make_node("Mul", ["h4", "big"], ["scaled"], name="big_mul"),
                   helper.make_node("Div", ["scaled", "big"], ["Y"], name="big_div")])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def fp16_qdq(tmp_path_factory) -> tuple[Path, Path, dict]:
    work = tmp_path_factory.mktemp("fp16")
    fp32 = _mlp_with_overflow(work / "mlp.onnx")
    out = work / "mlp.qdq.onnx"
    return fp32, out, q.quantize_qdq_modelopt(fp32, out, _feeds(n=4), q.QdqSettings(n_calibration_samples=64))


def test_fp16_is_the_default_high_precision():
    # TensorRT builds Q/DQ graphs strongly typed: an fp32 graph would run every non-INT8 op in FP32.
    assert q.QdqSettings().high_precision_dtype == "fp16"


def test_fp16_qdq_keeps_only_the_overflowing_ops_fp32(fp16_qdq):
    fp32, out, report = fp16_qdq
    precision = report["precision"]
    census = q.float_census(out)
    assert census == precision["census"]
    assert set(precision["kept_fp32_for_overflow"]) == {"big_mul", "big_div"}
    assert census["fp32_ops"] == ["big_div", "big_mul"]
    assert census["io"] == {"X": "FLOAT", "Y": "FLOAT"}, "graph I/O keeps its types"
    assert census["ops_by_type"]["MatMul"] == {"fp16": 2} and census["ops_by_type"]["Relu"] == {"fp16": 1}
    assert census["ops"] == {"fp16": 5, "fp32": 2}  # fc1, fc1_bias, relu, fc2, fc2_bias | big_mul, big_div
    assert census["ops_by_type"]["DequantizeLinear"] == {"fp16": 4}, "fp16 scales (opset >= 19)"
    assert precision["census_fp32_graph"]["ops"] == {"fp32": 7}
    assert report["structure"]["weighted_nodes_per_channel"] == 2
    _assert_close(fp32, out)


def test_fp16_without_the_overflow_rule_would_break_the_output(fp16_qdq, tmp_path):
    # The same graph lowered with nothing kept FP32: 2e4 * h leaves fp16's range and the output is inf/garbage.
    # This is what the rule prevents, and what a census of "everything FP16" would have hidden.
    fp32, out, _ = fp16_qdq
    all_fp16 = tmp_path / "all-fp16.qdq.onnx"
    q.quantize_qdq_modelopt(fp32, all_fp16, _feeds(n=4), q.QdqSettings(n_calibration_samples=64,
                                                                        high_precision_dtype="fp32"))
    onnx.save(q._to_fp16(onnx.load(str(all_fp16)), []), str(all_fp16))
    assert q.float_census(all_fp16)["ops"] == {"fp16": 7}
    x = np.random.default_rng(5).standard_normal((256, D_IN)).astype(np.float32) * 4
    # ORT CPU computes Mul and Div in FP32 and skips the fp16 rounding between them: no overflow there.
    assert np.isfinite(_run(all_fp16, x)).all()
    # Rounded to fp16 after every op, as a GPU stores it: the all-FP16 graph overflows, ours does not.
    assert not np.isfinite(_run(q.emulate_fp16_storage(all_fp16, tmp_path / "all-fp16.emu.onnx"), x)).all()
    emulated = _run(q.emulate_fp16_storage(out, tmp_path / "ours.emu.onnx"), x)
    assert np.isfinite(emulated).all() and np.abs(emulated - _run(out, x)).max() < 0.05 * np.abs(emulated).max()


def test_census_check_names_what_is_wrong(fp16_qdq):
    _, out, report = fp16_qdq
    census = report["precision"]["census"]
    op_types = {n.name: n.op_type for n in onnx.load(str(out)).graph.node}
    keep = report["precision"]["kept_fp32_for_overflow"]
    q.check_float_census(census, {"X": "FLOAT", "Y": "FLOAT"}, keep, op_types)
    with pytest.raises(q.FloatCensusError, match=r"left FP32 that nothing overflows in: \['big_div'\]"):
        q.check_float_census(census, census["io"], {"big_mul": "x"}, op_types)
    with pytest.raises(q.FloatCensusError, match="lowered to FP16 anyway: \\['fc1'\\]"):
        q.check_float_census(census, census["io"], {**keep, "fc1": "x"}, op_types)
    with pytest.raises(q.FloatCensusError, match="I/O types changed"):
        q.check_float_census(census, {"X": "INT64", "Y": "FLOAT"}, keep, op_types)


def test_fp32_high_precision_is_still_available(fp32, tmp_path):
    out = tmp_path / "mlp.fp32.qdq.onnx"
    report = q.quantize_qdq_modelopt(fp32, out, _feeds(n=2), q.QdqSettings(high_precision_dtype="fp32"))
    assert report["precision"]["census"]["ops"] == {"fp32": 5}
    assert "fp16" not in report["precision"]["census"]["tensors"]


def test_ort_cpu_precision_accounts_for_every_op(fp16_qdq):
    _, out, _ = fp16_qdq
    seen = q.ort_cpu_precision(out)
    assert {"MatMul", "Relu", "Mul", "Div", "QuantizeLinear", "DequantizeLinear"} <= set(seen)
    assert sum(seen["MatMul"].values()) == 2


def test_built_encoder_qdq_is_fp16_with_the_mask_and_softmax_fp32(ci_models):
    """The CI build's Q/DQ encoder (what a GPU node builds its plan from): its census, as the build checked it."""
    from conversion.compress_encoder import QDQ_ONNX

    path = ci_models["encoder"] / QDQ_ONNX
    precision = json.loads(q.report_path(path).read_text())["precision"]
    census = q.float_census(path)
    assert precision["high_precision_dtype"] == "fp16" and census == precision["census"]
    assert census["io"] == {"INPUT_IDS": "INT64", "ATTENTION_MASK": "INT64", "EMBEDDING": "FLOAT"}
    assert set(census["ops_by_type"]["MatMul"]) == {"fp16"} and set(census["ops_by_type"]["Erf"]) == {"fp16"}
    assert set(census["ops_by_type"]["LayerNormalization"]) == {"fp16"}
    assert census["ops_by_type"]["Softmax"] == {"fp32": census["ops_by_type"]["Softmax"]["fp32"]}
    kept = precision["kept_fp32_for_overflow"]
    assert all("Softmax" in n or "Add" in n or "Where" in n or "Constant" in n for n in kept), kept
    assert census["ops"]["fp16"] > 10 * census["ops"]["fp32"]


# ---- SmoothQuant and exclusions -----------------------------------------------------------------------------


def _outlier_feeds(n: int = 6, rows: int = 16, seed: int = 3) -> list[dict[str, np.ndarray]]:
    """Inputs whose channels 0 and 5 are 30x larger than the rest: the outliers SmoothQuant is for."""
    rng = np.random.default_rng(seed)
    feeds = [{"X": rng.standard_normal((rows, D_IN)).astype(np.float32)} for _ in range(n)]
    for f in feeds:
        f["X"][:, [0, 5]] *= 30.0
    return feeds


@pytest.mark.parametrize("pattern", ["fc1", "fc2", "fc.*"])
def test_smoothed_fp32_graph_computes_the_same_function(fp32, tmp_path, pattern):
    out = tmp_path / "smoothed.onnx"
    summary = q.smooth_quant(fp32, out, _outlier_feeds(), alpha=0.5, node_pattern=pattern)
    assert set(summary["nodes"]) == {n for n in ("fc1", "fc2") if __import__("re").fullmatch(pattern, n)}
    graph = onnx.load(str(out)).graph
    muls = [n for n in graph.node if n.op_type == "Mul"]
    assert len(muls) == len(summary["nodes"])
    for name in summary["nodes"]:  # the MatMul now reads the Mul's output, and its weight changed
        node = next(n for n in graph.node if n.name == name)
        assert any(m.output[0] == node.input[0] for m in muls)
    # Held-out feeds, including the outlier channels: the same outputs within float rounding.
    for feed in _outlier_feeds(n=2, seed=11) + _feeds(n=2, seed=12):
        ref, got = _run(fp32, feed["X"]), _run(out, feed["X"])
        assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max()), np.abs(got - ref).max()


def test_smoothing_moves_the_outliers_into_the_weight(fp32, tmp_path):
    feeds = _outlier_feeds()
    summary = q.smooth_quant(fp32, tmp_path / "s.onnx", feeds, alpha=0.5, node_pattern="fc1")["nodes"]["fc1"]
    assert summary["act_amax_max"] > 50  # the 30x channels
    assert summary["act_amax_max_smoothed"] < summary["act_amax_max"] / 3
    # the formula: s_j = max(amax_j^0.5 / max_k |W_jk|^0.5, 1e-3)
    w = numpy_helper.to_array(next(t for t in onnx.load(str(fp32)).graph.initializer if t.name == "w1"))
    amax = np.max([np.abs(f["X"]).max(0) for f in feeds], axis=0)
    s = np.maximum(amax ** 0.5 / np.abs(w).max(1) ** 0.5, 1e-3)
    smoothed = onnx.load(str(tmp_path / "s.onnx")).graph
    w_new = numpy_helper.to_array(next(t for t in smoothed.initializer if t.name == "w1"))
    np.testing.assert_allclose(w_new, w * s[:, None], rtol=1e-5)


def test_smooth_quant_refuses_a_pattern_that_matches_nothing(fp32, tmp_path):
    with pytest.raises(q.QuantizationError, match="no MatMul"):
        q.smooth_quant(fp32, tmp_path / "s.onnx", _feeds(), node_pattern="attention.*")


def test_static_int8_with_smoothing_keeps_the_smoothed_graph_and_stays_close(fp32, tmp_path):
    settings = q.OrtInt8Settings(mode="static", reduce_range=True, smooth_alpha=0.5, smooth_nodes="fc1")
    out, smoothed = tmp_path / "int8.onnx", tmp_path / "smoothed.onnx"
    report = q.quantize_ort_int8(fp32, out, settings, _outlier_feeds(), smoothed_out=smoothed)
    assert set(report["smooth_quant"]["nodes"]) == {"fc1"}
    assert "Mul" in _ops(smoothed) and "DequantizeLinear" not in _ops(smoothed)
    assert "DequantizeLinear" in _ops(out)
    x = _outlier_feeds(n=1, rows=64, seed=21)[0]["X"]
    ref, got = _run(fp32, x), _run(out, x)
    cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    assert cos.mean() > 0.99


def test_smoothing_needs_static_mode():
    with pytest.raises(ValueError, match="static"):
        q.OrtInt8Settings(mode="dynamic", smooth_alpha=0.5)
    with pytest.raises(ValueError, match="smooth_alpha"):
        q.OrtInt8Settings(mode="static", smooth_alpha=1.5)


def _integer_inputs(path: Path) -> dict[str, bool]:
    """Per MatMul node: whether it reads an integer tensor (through DequantizeLinear or as MatMulInteger)."""
    graph = onnx.load(str(path)).graph
    producer = {o: n for n in graph.node for o in n.output}
    out = {}
    for n in graph.node:
        if n.op_type in ("MatMulInteger", "QLinearMatMul"):
            out[n.name.removesuffix("_quant")] = True
        elif n.op_type == "MatMul":
            out[n.name] = any(getattr(producer.get(x), "op_type", None) == "DequantizeLinear" for x in n.input[:2])
    return out


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_excluded_nodes_are_left_in_float(fp32, tmp_path, mode):
    out = tmp_path / f"{mode}.onnx"
    q.quantize_ort_int8(fp32, out, q.OrtInt8Settings(mode=mode, nodes_to_exclude=("fc2",)),
                        _feeds() if mode == "static" else None)
    integer = _integer_inputs(out)
    assert integer["fc1"] is True, integer
    assert integer.get("fc2") is False, integer  # still a plain MatMul on float inputs
    fc2 = next(n for n in onnx.load(str(out)).graph.node if n.name == "fc2")
    assert fc2.op_type == "MatMul"
    # and without the exclusion both are quantized
    q.quantize_ort_int8(fp32, tmp_path / "all.onnx", q.OrtInt8Settings(mode=mode),
                        _feeds() if mode == "static" else None)
    assert all(_integer_inputs(tmp_path / "all.onnx").values())
