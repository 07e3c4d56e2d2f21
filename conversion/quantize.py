"""INT8 for both served models: ONNX Runtime CPU INT8, and TensorRT-oriented QDQ via nvidia-modelopt.

The core functions take an ONNX path and calibration feeds (one dict of input arrays per call)
and know nothing about the encoder, so a pruned encoder and the CTR ranker go through the same
code. Each writes its model under a temporary name and renames it into place, with
`<stem>.quantization.json` (settings + measured facts) beside it. Method choices and numbers:
docs/quantization.md; `python -m conversion.quantize compare` reproduces them.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType

from model_repository import runtime, spec

log = logging.getLogger(__name__)

REPORT_SUFFIX = ".quantization.json"
CALIBRATION_SUFFIX = ".calibration.npz"


class QuantizationError(Exception):
    """Base class of the errors below."""


class ModelFileError(QuantizationError, FileNotFoundError):
    """The FP32 model to quantize does not exist."""


class CalibrationFeedError(QuantizationError, ValueError):
    """Calibration feeds missing, or not matching the model's inputs (names, dtypes, ranks)."""


class QdqStructureError(QuantizationError):
    """A QDQ model that TensorRT would not run fully in INT8 (weights without DQ, per-tensor scales)."""


class ModeloptUnavailableError(QuantizationError, ImportError):
    """nvidia-modelopt's ONNX quantization path cannot be imported."""


class FloatCensusError(QuantizationError):
    """The Q/DQ graph's float types are not the ones intended (I/O changed, an op left FP32 or made FP16)."""


_QTYPES = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
_ORT_CALIBRATION = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                    "percentile": CalibrationMethod.Percentile}


def _check_choice(field: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{field}={value!r}; expected one of {sorted(allowed)}")


@dataclass(frozen=True)
class OrtInt8Settings:
    """ONNX Runtime CPU INT8. Defaults are the measured choice (docs/quantization.md)."""

    mode: str = "dynamic"  # "dynamic": MatMulInteger, activation ranges per call; "static": calibrated QDQ
    per_channel: bool = True
    op_types: tuple[str, ...] = ("MatMul",)  # () = every op type ORT knows how to quantize
    # 7-bit weights. AVX2 without VNNI multiplies u8 x s8 pairs into a saturating int16 (vpmaddubsw), so
    # full-range weights give wrong outputs on such hosts; the build machine cannot know where it will serve.
    reduce_range: bool = True
    weight_type: str = "int8"
    activation_type: str = "uint8"  # static only; the dynamic path always quantizes activations to uint8
    calibration_method: str = "minmax"  # static only
    pre_process: bool = False  # onnxruntime's quant_pre_process (symbolic shapes + graph optimisation) first
    # static only: QDQ on weighted nodes' inputs only. ORT's QDQ MatMul otherwise also quantizes activation x
    # activation MatMuls (attention scores) and every MatMul output; dynamic mode does this by default.
    weighted_only: bool = True
    # (num_heads, hidden_size): fuse BERT attention with onnxruntime.transformers first, so "Attention"
    # in op_types becomes QAttention. One head count for the whole graph: not for non-uniformly pruned models.
    bert_fusion: tuple[int, int] | None = None
    # Node names (exact, as in the graph) left in float: ORT's quantizer never touches them.
    nodes_to_exclude: tuple[str, ...] = ()
    # SmoothQuant pre-pass (smooth_quant below): for the MatMuls whose name matches smooth_nodes (a regex),
    # move alpha of each input channel's activation range into the weight before quantizing. None: off.
    smooth_alpha: float | None = None
    smooth_nodes: str = r".*/intermediate/dense/MatMul"

    def __post_init__(self):
        _check_choice("mode", self.mode, {"dynamic", "static"})
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            raise ValueError(f"smooth_alpha must be in [0, 1], got {self.smooth_alpha}")
        if self.smooth_alpha is not None and self.mode != "static":
            raise ValueError("smooth_alpha needs calibration feeds: mode='static' only")
        _check_choice("weight_type", self.weight_type, _QTYPES)
        _check_choice("activation_type", self.activation_type, _QTYPES)
        _check_choice("calibration_method", self.calibration_method, _ORT_CALIBRATION)


@dataclass(frozen=True)
class QdqSettings:
    """nvidia-modelopt INT8 QDQ for TensorRT."""

    calibration_method: str = "max"  # modelopt 0.47 INT8 knows "max" and "entropy" (anything else runs as max)
    per_channel: bool = True  # modelopt INT8 always quantizes weights per output channel; False is refused
    op_types: tuple[str, ...] = ("MatMul", "Gemm")  # () = modelopt's own selection of op types
    n_calibration_samples: int = 512  # rows (texts, candidates) taken from the feeds, in order
    disable_mha_qdq: bool = False  # keep attention's activation x activation MatMuls (QK^T, PV) in float
    nodes_to_exclude: tuple[str, ...] = ()  # regexes on node names kept in float (check_qdq_structure exempts them)
    # The float type of everything that is not INT8. TensorRT builds these graphs STRONGLY_TYPED
    # (build_trt_engine.py), where the ONNX's own types are the precision and no builder flag can
    # lower them: an fp32 graph runs LayerNorm, softmax, GELU, residual adds and the unquantized
    # MatMuls in FP32/TF32. So fp16, with INT64 ids and the FP32 embedding kept at the graph's edge.
    high_precision_dtype: str = "fp16"
    # fp16 only: a node stays FP32 when a float tensor it reads or writes (a sum of squares, for
    # ReduceL2) reaches fp16's largest value / this margin on the calibration feeds. The margin is
    # for inputs calibration did not see (longer texts, rarer tokens); see fp32_overflow_nodes.
    fp16_overflow_margin: float = 8.0

    def __post_init__(self):
        _check_choice("calibration_method", self.calibration_method, {"max", "entropy"})
        _check_choice("high_precision_dtype", self.high_precision_dtype, {"fp32", "fp16", "bf16"})
        if self.fp16_overflow_margin < 1:
            raise ValueError(f"fp16_overflow_margin must be >= 1, got {self.fp16_overflow_margin}")
        if not self.per_channel:
            raise ValueError("modelopt INT8 quantizes weights per channel only; per_channel=False is not available")
        if self.n_calibration_samples < 1:
            raise ValueError("n_calibration_samples must be >= 1")


class FeedReader(CalibrationDataReader):
    """Replays a list of feeds; modelopt also calls get_first() and rewind()."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]):
        self.feeds = list(feeds)
        self.rewind()

    def get_next(self):
        return next(self._it, None)

    def get_first(self):
        return self.feeds[0]

    def rewind(self):
        self._it = iter(self.feeds)


# ---- checks and files -----------------------------------------------------------------------


def _require_model(path: Path | str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"FP32 ONNX model not found: {path}")
    return path


def model_inputs(onnx_path: Path) -> dict[str, tuple[np.dtype, int]]:
    """Graph inputs that a feed must supply: name -> (dtype, rank)."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    return {i.name: (np.dtype(helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)),
                     len(i.type.tensor_type.shape.dim)) for i in graph.input if i.name not in weights}


def validate_feeds(onnx_path: Path, feeds: Sequence[dict[str, np.ndarray]] | None) -> None:
    if not feeds:
        raise CalibrationFeedError(f"no calibration feeds given for {onnx_path.name}")
    expected = model_inputs(onnx_path)
    for k, feed in enumerate(feeds):
        if set(feed) != set(expected):
            raise CalibrationFeedError(
                f"calibration feed {k} has tensors {sorted(feed)} but {onnx_path.name} takes {sorted(expected)} "
                f"(missing {sorted(set(expected) - set(feed))}, unexpected {sorted(set(feed) - set(expected))})")
        for name, (dtype, rank) in expected.items():
            a = feed[name]
            if not isinstance(a, np.ndarray) or a.dtype != dtype or a.ndim != rank:
                got = f"{a.dtype} {list(a.shape)}" if isinstance(a, np.ndarray) else type(a).__name__
                raise CalibrationFeedError(f"calibration feed {k}: {name} is {got}; "
                                           f"{onnx_path.name} takes {dtype} of rank {rank}")


def _take_rows(feeds: Sequence[dict[str, np.ndarray]], n_rows: int) -> list[dict[str, np.ndarray]]:
    out, total = [], 0
    for feed in feeds:
        if total >= n_rows:
            break
        keep = n_rows - total
        out.append({k: v[:keep] for k, v in feed.items()})
        total += len(next(iter(out[-1].values())))
    return out


def report_path(onnx_path: Path | str) -> Path:
    return Path(onnx_path).with_suffix(REPORT_SUFFIX)


def _save_report(out_onnx: Path, report: dict) -> dict:
    """Write <stem>.quantization.json; returns it as read back, so callers see exactly what is on disk."""
    text = json.dumps(report, indent=2)
    _write_atomic(report_path(out_onnx), lambda p: p.write_text(text))
    return json.loads(text)


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def _scratch(out_onnx: Path) -> tempfile.TemporaryDirectory:
    # Beside the output, so the final os.replace is a rename on one filesystem.
    out_onnx.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=f".{out_onnx.stem}.tmp-", dir=out_onnx.parent)


def output_diff(reference: Path, candidate: Path, feeds: Sequence[dict[str, np.ndarray]]) -> dict:
    """Per output: max/mean absolute difference, and mean row cosine for [rows, d>1] outputs."""
    ref, cand = runtime.ort_session(reference), runtime.ort_session(candidate)
    names = [o.name for o in ref.get_outputs()]
    pairs = [(ref.run(names, f), cand.run(names, f)) for f in feeds]
    out = {}
    for j, name in enumerate(names):
        a = np.concatenate([p[0][j].reshape(len(p[0][j]), -1) for p in pairs]).astype(np.float64)
        b = np.concatenate([p[1][j].reshape(len(p[1][j]), -1) for p in pairs]).astype(np.float64)
        out[name] = {"max_abs_diff": float(np.abs(a - b).max()), "mean_abs_diff": float(np.abs(a - b).mean())}
        if a.shape[1] > 1:
            cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
            out[name].update(mean_cosine=float(cos.mean()), min_cosine=float(cos.min()))
    return out


def _facts(fp32: Path, out: Path, started: float, feeds) -> dict:
    ops = Counter(n.op_type for n in onnx.load(str(out)).graph.node)
    facts = {"source": str(fp32), "source_bytes": fp32.stat().st_size, "output_bytes": out.stat().st_size,
             "seconds": round(time.perf_counter() - started, 1), "op_counts": dict(sorted(ops.items())),
             "versions": {"onnxruntime": ort.__version__, "onnx": onnx.__version__}}
    if feeds:
        facts["calibration"] = {"feeds": len(feeds), "rows": sum(len(next(iter(f.values()))) for f in feeds)}
        # A quick sanity number on (at most 4) calibration feeds; held-out fidelity is the caller's job.
        facts["diff_on_calibration_feeds"] = output_diff(fp32, out, feeds[:4])
    return facts


# ---- ONNX Runtime INT8 ------------------------------------------------------------------------


def _weighted_nodes(onnx_path: Path, op_types: Sequence[str]) -> list[str]:
    """Names of op_types nodes (any type for ()) with a float initializer among their first two inputs."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    floats = {t.name for t in graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
    return [n.name for n in graph.node if (not op_types or n.op_type in op_types) and floats & set(n.input[:2])]


# ---- SmoothQuant -------------------------------------------------------------------------------


def input_channel_amax(onnx_path: Path, tensors: Sequence[str], feeds: Sequence[dict[str, np.ndarray]]
                       ) -> dict[str, np.ndarray]:
    """max |x| per last-axis channel of each named tensor over the feeds (ORT CPU, graph as written)."""
    model = onnx.load(str(onnx_path))
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                              for t in dict.fromkeys(tensors) if t not in known)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = list(dict.fromkeys(tensors))
    amax: dict[str, np.ndarray] = {}
    for feed in feeds:
        for name, value in zip(names, session.run(names, feed)):
            m = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
            amax[name] = np.maximum(amax[name], m) if name in amax else m
    return amax


def smooth_quant(fp32_onnx: Path, out_onnx: Path, feeds: Sequence[dict[str, np.ndarray]], alpha: float = 0.5,
                 node_pattern: str = r".*/intermediate/dense/MatMul", min_scale: float = 1e-3) -> dict:
    """SmoothQuant (Xiao et al. 2023) on the MatMuls named by node_pattern, written as a new FP32 graph.

    For a MatMul y = x W with W [K, N] a constant, per input channel j:
    s_j = max(amax_j ** alpha / max_k |W_jk| ** (1 - alpha), min_scale), amax_j = max |x_j| over the feeds.
    W becomes diag(s) W and an FP32 Mul(x, 1/s) goes in front of the MatMul, so the graph computes the
    same function (up to float rounding) while the activation's outlier channels shrink and the weight's
    rows grow: one per-tensor activation scale then covers x / s far better than x. Returns a summary."""
    fp32, out_onnx = _require_model(fp32_onnx), Path(out_onnx)
    validate_feeds(fp32, feeds)
    model = onnx.load(str(fp32))
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    users = Counter(x for n in g.node for x in n.input)
    targets = [n for n in g.node if n.op_type == "MatMul" and re.fullmatch(node_pattern, n.name)
               and n.input[1] in inits and len(inits[n.input[1]].dims) == 2]
    if not targets:
        raise QuantizationError(f"smooth_quant: no MatMul with a 2-D constant weight matches {node_pattern!r}")
    amax = input_channel_amax(fp32, [n.input[0] for n in targets], feeds)
    summary = {"alpha": alpha, "node_pattern": node_pattern, "min_scale": min_scale, "nodes": {}}
    for node in targets:
        w_init = inits[node.input[1]]
        w = numpy_helper.to_array(w_init).astype(np.float32)
        a = amax[node.input[0]].astype(np.float64)
        wmax = np.abs(w).max(axis=1).astype(np.float64)
        s = np.maximum(a ** alpha / np.maximum(wmax, 1e-12) ** (1 - alpha), min_scale)
        scaled = (w * s[:, None]).astype(np.float32)
        if users[w_init.name] > 1:  # shared weight: leave the original for its other readers
            new_w = numpy_helper.from_array(scaled, f"{w_init.name}_smoothed")
            g.initializer.append(new_w)
        else:
            w_init.CopyFrom(numpy_helper.from_array(scaled, w_init.name))
            new_w = w_init
        inv = numpy_helper.from_array((1.0 / s).astype(np.float32), f"{node.name}/smooth_inv_scale")
        g.initializer.append(inv)
        x_smoothed = f"{node.input[0]}/smoothed_for/{node.name}"
        mul = helper.make_node("Mul", [node.input[0], inv.name], [x_smoothed], name=f"{node.name}/SmoothQuantMul")
        g.node.insert(list(g.node).index(node), mul)
        node.input[0], node.input[1] = x_smoothed, new_w.name
        summary["nodes"][node.name] = {"channels": int(len(s)), "act_amax_max": float(a.max()),
                                       "act_amax_max_smoothed": float((a / s).max()),
                                       "scale_min": float(s.min()), "scale_max": float(s.max())}
    onnx.checker.check_model(model)
    _write_atomic(out_onnx, lambda p: onnx.save(model, str(p)))
    log.info("SmoothQuant (alpha %s) on %d MatMuls -> %s", alpha, len(targets), out_onnx)
    return summary


def _prepare_source(fp32: Path, tmp: Path, settings: OrtInt8Settings, notes: dict,
                    feeds: Sequence[dict[str, np.ndarray]] | None = None) -> Path:
    src = fp32
    if settings.smooth_alpha is not None:
        notes["smooth_quant"] = smooth_quant(src, tmp / "smoothed.onnx", feeds, settings.smooth_alpha,
                                             settings.smooth_nodes)
        src = tmp / "smoothed.onnx"
    if settings.bert_fusion:
        from onnxruntime.transformers.optimizer import optimize_model

        heads, hidden = settings.bert_fusion
        # opt_level=0: only the python fusions, no CPU-specific ops baked into the file.
        optimize_model(str(src), model_type="bert", num_heads=heads, hidden_size=hidden,
                       opt_level=0).save_model_to_file(str(tmp / "fused.onnx"))
        src = tmp / "fused.onnx"
    if settings.pre_process:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        src_abs, out = str(Path(src).resolve()), str((tmp / "preprocessed.onnx").resolve())
        # In tmp: when symbolic inference gives up it dumps the model (90 MB for the encoder) into the cwd.
        with contextlib.chdir(tmp):
            try:
                quant_pre_process(src_abs, out)
                notes["pre_process"] = "symbolic shape inference + ORT optimisation"
            except Exception as e:  # symbolic inference gives up on some exported graphs (HF BERT's mask ops)
                log.warning("quant_pre_process: %s; retrying without symbolic shape inference", e)
                quant_pre_process(src_abs, out, skip_symbolic_shape=True)
                notes["pre_process"] = f"ONNX shape inference + ORT optimisation (symbolic failed: {e})"
        src = Path(out)
    return src


def quantize_ort_int8(fp32_onnx: Path, out_onnx: Path, settings: OrtInt8Settings = OrtInt8Settings(),
                      calibration_feeds: list[dict[str, np.ndarray]] | None = None,
                      smoothed_out: Path | None = None) -> dict:
    """FP32 ONNX -> ONNX Runtime INT8 model at out_onnx (+ report JSON); returns the report.

    smoothed_out: with settings.smooth_alpha, also keep the smoothed FP32 graph there (what a
    TensorRT Q/DQ graph of the same model should be made from)."""
    from onnxruntime.quantization import quantize_dynamic, quantize_static

    fp32, out_onnx = _require_model(fp32_onnx), Path(out_onnx)
    if settings.mode == "static" or calibration_feeds:
        validate_feeds(fp32, calibration_feeds)
    started = time.perf_counter()
    with _scratch(out_onnx) as tmp:
        tmp_out = Path(tmp) / out_onnx.name
        notes: dict = {}
        src = _prepare_source(fp32, Path(tmp), settings, notes, calibration_feeds)
        if smoothed_out is not None and settings.smooth_alpha is not None:
            _write_atomic(Path(smoothed_out), lambda p: shutil.copyfile(src, p))
        common = dict(op_types_to_quantize=list(settings.op_types) or None, per_channel=settings.per_channel,
                      reduce_range=settings.reduce_range, weight_type=_QTYPES[settings.weight_type],
                      nodes_to_exclude=list(settings.nodes_to_exclude))
        if settings.mode == "dynamic":
            # The type hint matters after BERT fusion: shape inference gives no types past com.microsoft ops.
            quantize_dynamic(src, tmp_out, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT}, **common)
        else:
            excluded = set(settings.nodes_to_exclude)
            weighted = dict(nodes_to_quantize=[n for n in _weighted_nodes(src, settings.op_types) if n not in excluded],
                            extra_options={"OpTypesToExcludeOutputQuantization": list(settings.op_types)})
            quantize_static(src, tmp_out, FeedReader(calibration_feeds), quant_format=QuantFormat.QDQ,
                            activation_type=_QTYPES[settings.activation_type],
                            calibrate_method=_ORT_CALIBRATION[settings.calibration_method],
                            **(weighted if settings.weighted_only else {}), **common)
        report = {"tool": "onnxruntime.quantization", "settings": dataclasses.asdict(settings), **notes,
                  **_facts(fp32, tmp_out, started, calibration_feeds)}
        os.replace(tmp_out, out_onnx)
    report = _save_report(out_onnx, report)
    log.info("ORT INT8 (%s) -> %s in %.0f s", settings.mode, out_onnx, report["seconds"])
    return report


# ---- TensorRT-oriented QDQ (nvidia-modelopt) -------------------------------------------------------


def save_calibration(path: Path, feeds: Sequence[dict[str, np.ndarray]]) -> None:
    """Feeds as one .npz: key '<feed index>.<tensor name>' (feeds differ in shape, so no stacking)."""
    arrays = {f"{k:04d}.{name}": a for k, feed in enumerate(feeds) for name, a in feed.items()}
    _write_atomic(path, lambda p: np.savez(open(p, "wb"), **arrays))


def load_calibration(path: Path) -> list[dict[str, np.ndarray]]:
    feeds: dict[int, dict[str, np.ndarray]] = {}
    with np.load(path) as z:
        for key in z.files:
            k, name = key.split(".", 1)
            feeds.setdefault(int(k), {})[name] = z[key]
    return [feeds[k] for k in sorted(feeds)]


def quantize_qdq_modelopt(fp32_onnx: Path, out_onnx: Path, calibration_feeds: list[dict[str, np.ndarray]],
                          settings: QdqSettings = QdqSettings()) -> dict:
    """modelopt INT8 Q/DQ for TensorRT, run in a fresh interpreter.

    modelopt's calibration patches onnxruntime's quantization internals for the rest of the
    process; afterwards ORT's own static quantization fails ("quantization parameters are not
    specified"), so it never runs in the caller's process.
    """
    import subprocess
    import sys

    validate_feeds(_require_model(fp32_onnx), calibration_feeds)
    with tempfile.TemporaryDirectory(prefix="modelopt-") as work:
        feeds, args = Path(work) / "feeds.npz", Path(work) / "args.json"
        save_calibration(feeds, calibration_feeds)
        args.write_text(json.dumps({"fp32": str(fp32_onnx), "out": str(out_onnx), "feeds": str(feeds),
                                    "settings": dataclasses.asdict(settings)}))
        code = ("import json, sys; from pathlib import Path; from conversion import quantize as q; "
                "a = json.loads(Path(sys.argv[1]).read_text()); "
                "s = {k: tuple(v) if isinstance(v, list) else v for k, v in a['settings'].items()}; "
                "q._quantize_qdq_modelopt_here(Path(a['fp32']), Path(a['out']), "
                "q.load_calibration(Path(a['feeds'])), q.QdqSettings(**s))")
        run = subprocess.run([sys.executable, "-c", code, str(args)], capture_output=True, text=True)
        if run.returncode != 0:
            tail = (run.stderr.strip().splitlines() or ["no output"])[-1]
            raise QuantizationError(f"modelopt quantization of {fp32_onnx} failed: {tail}")
    return json.loads(report_path(out_onnx).read_text())


def _quantize_qdq_modelopt_here(fp32_onnx: Path, out_onnx: Path, calibration_feeds: list[dict[str, np.ndarray]],
                          settings: QdqSettings = QdqSettings()) -> dict:
    """FP32 ONNX -> INT8 QDQ ONNX for TensorRT, calibrated on the feeds (saved beside it); returns the report."""
    fp32, out_onnx = _require_model(fp32_onnx), Path(out_onnx)
    validate_feeds(fp32, calibration_feeds)
    feeds = _take_rows(calibration_feeds, settings.n_calibration_samples)
    try:
        import modelopt
        from modelopt.onnx.quantization import quantize as modelopt_quantize
    except ImportError as e:
        raise ModeloptUnavailableError(
            f"nvidia-modelopt's ONNX quantization cannot be imported ({e}); install the `models` extra "
            "(pyproject.toml lists the ONNX dependencies it needs)") from e
    started = time.perf_counter()
    with _scratch(out_onnx) as tmp:
        # A copy, never a link: modelopt rewrites its input file in place while preprocessing.
        src, tmp_out = Path(tmp) / "fp32.onnx", Path(tmp) / out_onnx.name
        shutil.copyfile(fp32, src)
        # Quantized in FP32 first, then lowered node by node: modelopt's own fp16 pass takes an op-type
        # block list only, and keeping every Add in FP32 because one mask Add overflows would keep the
        # residual adds there too.
        modelopt_quantize(onnx_path=str(src), quantize_mode="int8", calibration_data_reader=FeedReader(feeds),
                          calibration_method=settings.calibration_method, calibration_eps=["cpu"],
                          op_types_to_quantize=list(settings.op_types) or None, output_path=str(tmp_out),
                          high_precision_dtype="fp32",
                          disable_mha_qdq=settings.disable_mha_qdq, nodes_to_exclude=list(settings.nodes_to_exclude),
                          log_level="WARNING")
        precision = _lower_precision(tmp_out, feeds, settings)
        structure = check_qdq_structure(tmp_out, exempt=settings.nodes_to_exclude)
        report = {"tool": f"nvidia-modelopt {modelopt.__version__}", "settings": dataclasses.asdict(settings),
                  **_facts(fp32, tmp_out, started, feeds), "structure": structure, "precision": precision}
        os.replace(tmp_out, out_onnx)
    save_calibration(out_onnx.with_suffix(CALIBRATION_SUFFIX), feeds)
    report = _save_report(out_onnx, report)
    log.info("modelopt INT8 QDQ -> %s in %.0f s", out_onnx, report["seconds"])
    return report


# ---- FP16 high precision: what overflows stays FP32, the rest is counted -----------------------------

FP16_MAX = float(np.finfo(np.float16).max)  # 65504
_FLOAT_NAMES = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16",
                onnx.TensorProto.DOUBLE: "fp64"}
# Reductions whose internal accumulator is larger than their output: ReduceL2's sum of squares is
# output**2 (the encoder's final L2 norm). LayerNormalization is not here: its mean and variance are
# computed in `stash_type` (FP32 by default) by ONNX Runtime and by TensorRT's ONNX parser alike.
_SQUARED_OUTPUT = {"ReduceL2", "ReduceSumSquare"}


def _types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every named tensor (inputs, outputs, initializers, Constant outputs, inferred values)."""
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)}
    types.update({t.name: t.data_type for t in g.initializer})
    types.update({n.output[0]: n.attribute[0].t.data_type for n in g.node
                  if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    return types


def _inferred(onnx_path: Path) -> onnx.ModelProto:
    return onnx.shape_inference.infer_shapes(onnx.load(str(onnx_path)))


def tensor_magnitudes(onnx_path: Path, feeds: Sequence[dict[str, np.ndarray]]) -> dict[str, float]:
    """max |x| of every FP32 tensor of the graph over the feeds (ORT CPU, every intermediate exposed)."""
    model = _inferred(onnx_path)
    types, g = _types(model), model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in g.node
                   if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    out = {k: float(np.abs(v).max(initial=0.0)) for k, v in consts.items() if types.get(k) == onnx.TensorProto.FLOAT}
    names = list(dict.fromkeys(o for n in g.node if n.op_type != "Constant" for o in n.output
                               if o and types.get(o) == onnx.TensorProto.FLOAT))
    known = {o.name for o in g.output}
    g.output.extend(helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None) for x in names if x not in known)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for feed in feeds:
        for name, value in zip(names, session.run(names, feed)):
            out[name] = max(out.get(name, 0.0), float(np.abs(value).max(initial=0.0)))
    return out


def fp32_overflow_nodes(onnx_path: Path, feeds: Sequence[dict[str, np.ndarray]], margin: float) -> dict[str, str]:
    """Nodes that must stay FP32 in an fp16 graph: node name -> the reason (tensor and its max |x|).

    A node qualifies when a float tensor it reads or writes reaches FP16_MAX / margin on the feeds, or
    when its accumulator does (ReduceL2: output squared). In a BERT export that is the attention-mask
    constant (finfo(float32).min), the Where that selects it, every Add of it onto the attention scores
    and the Softmax reading those sums; calibration decides, not a list of names."""
    model, limit = onnx.load(str(onnx_path), load_external_data=False), FP16_MAX / margin
    mags = tensor_magnitudes(onnx_path, feeds)
    keep = {}
    for node in model.graph.node:
        seen = [(x, mags[x]) for x in (*node.input, *node.output) if x in mags]
        if node.op_type in _SQUARED_OUTPUT:
            seen += [(f"{o} squared", mags[o] ** 2) for o in node.output if o in mags]
        over = [(x, m) for x, m in seen if m >= limit]
        if over:
            x, m = max(over, key=lambda t: t[1])
            keep[node.name] = f"{x}: max |x| {m:.3g} >= {limit:.3g}"
    return keep


def _to_fp16(model: onnx.ModelProto, keep_fp32: Sequence[str]) -> onnx.ModelProto:
    """modelopt's convert_to_f16 (what its quantize(high_precision_dtype="fp16") runs), by node name
    instead of op type; keep_io_types, so INT64 ids stay INT64 and the FP32 embedding stays FP32."""
    from modelopt.onnx import utils as mo_utils
    from modelopt.onnx.autocast import convert as ac, utils as ac_utils
    from modelopt.onnx.autocast.graphsanitizer import GraphSanitizer
    from modelopt.onnx.autocast.precisionconverter import PrecisionConverter

    io = ac._capture_network_io_metadata(model, True)
    opset = max(19, mo_utils.get_min_opset_for_precisions(mo_utils.get_qdq_precisions(model)))  # 19: fp16 Q/DQ scales
    sanitizer = GraphSanitizer(model, min_opset=opset, max_ir_version=ac.LATEST_IR_VERSION_SUPPORTED_BY_ORT)
    sanitizer.find_custom_nodes()
    sanitizer.convert_opset()
    sanitizer.ensure_graph_name_exists()
    sanitizer.convert_fp64_to_fp32()
    model = mo_utils.infer_types(sanitizer.model, False, strict_mode=True)
    converter = PrecisionConverter(model, *ac_utils.setup_mappings(model), keep_io_types=True,
                                   low_precision_type="fp16", custom_ops=sanitizer.custom_ops,
                                   original_network_io_metadata=io)
    keep = set(keep_fp32)
    return converter.convert([n.name for n in model.graph.node if n.name in keep],
                             [n.name for n in model.graph.node if n.name not in keep])


def _fp16_capable(op_type: str, opset: int) -> bool:
    """Whether the ONNX schema lets this op compute in float16 at all (Range, for one, does not)."""
    try:
        schema = onnx.defs.get_schema(op_type, opset)
    except Exception:  # custom domains: not ours to judge
        return True
    allowed = {t for c in schema.type_constraints for t in c.allowed_type_strs}
    return "tensor(float16)" in allowed


def float_census(onnx_path: Path) -> dict:
    """How many float tensors and ops of the graph are FP16 and FP32, and which ops are FP32.

    An op's precision is the float type of its data tensors; Cast, QuantizeLinear and
    DequantizeLinear convert between types and are counted apart (casts by direction)."""
    model = _inferred(onnx_path)
    types, g = _types(model), model.graph
    name = lambda t: _FLOAT_NAMES.get(t)  # noqa: E731
    live = {*(v.name for v in g.input), *(t.name for t in g.initializer), *(o for n in g.node for o in n.output)}
    tensors = Counter(name(t) for x, t in types.items() if x in live and name(t))  # no stale value_info
    ops, by_type, casts, fp32_ops = Counter(), {}, Counter(), []
    for node in g.node:
        kinds = {name(types.get(x)) for x in (*node.input, *node.output) if x and name(types.get(x))}
        if node.op_type == "Cast":
            src, dst = name(types.get(node.input[0])), name(types.get(node.output[0]))
            casts[f"{src or 'other'}->{dst or 'other'}"] += 1
            continue
        if not kinds or node.op_type == "Constant":
            continue
        kind = "mixed" if len(kinds) > 1 and node.op_type not in ("QuantizeLinear", "DequantizeLinear") else \
            sorted(kinds)[0]
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            by_type.setdefault(node.op_type, Counter())[kind] += 1
            continue
        ops[kind] += 1
        by_type.setdefault(node.op_type, Counter())[kind] += 1
        if kind != "fp16":
            fp32_ops.append(node.name)
    io = {v.name: onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type) for v in (*g.input, *g.output)}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return {"tensors": dict(sorted(tensors.items())), "ops": dict(sorted(ops.items())),
            "ops_by_type": {k: dict(sorted(v.items())) for k, v in sorted(by_type.items())},
            "casts": dict(sorted(casts.items())), "fp32_ops": sorted(fp32_ops), "io": io, "opset": opset}


def check_float_census(census: dict, source_io: dict[str, str], keep_fp32: dict[str, str],
                       op_types: dict[str, str]) -> None:
    """Raise FloatCensusError unless the graph is what _lower_precision meant: the source's I/O types,
    every op FP16 except the overflow nodes and ops ONNX has no float16 form of, and those FP32.
    `op_types`: node name -> op type, for the schema check."""
    problems = []
    if census["io"] != source_io:
        problems.append(f"graph I/O types changed: {source_io} -> {census['io']}")
    fp32 = set(census["fp32_ops"])
    unintended = sorted(n for n in fp32 - set(keep_fp32)
                        if _fp16_capable(op_types.get(n, ""), census["opset"]))
    if unintended:
        problems.append(f"{len(unintended)} op(s) left FP32 that nothing overflows in: {unintended[:6]}")
    converted = sorted(n for n in set(keep_fp32) - fp32 if n in op_types and op_types[n] != "Constant")
    if converted:
        problems.append(f"{len(converted)} overflowing op(s) lowered to FP16 anyway: {converted[:6]}")
    if not census["ops"].get("fp16"):
        problems.append("no op runs in FP16")
    if problems:
        raise FloatCensusError("; ".join(problems))


def ort_cpu_precision(onnx_path: Path) -> dict[str, dict[str, int]]:
    """Per op type, how many nodes ONNX Runtime's CPU provider really runs in fp16 and how many in FP32.

    ORT CPU lacks fp16 kernels for most arithmetic; its InsertCastTransformer then wraps the node in
    Casts (named InsertedPrecisionFreeCast_*) and computes it in FP32, rounding the output back to fp16.
    So a fp16 graph scored on ORT CPU measures fp16 storage between ops, not fp16 arithmetic inside
    them. The session's own graph (saved with optimisation off) shows which is which."""
    with tempfile.TemporaryDirectory(prefix="ort-fp16-") as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.optimized_model_filepath = str(Path(tmp) / "as-run.onnx")
        ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        model = _inferred(Path(tmp) / "as-run.onnx")
    types, out = _types(model), {}
    for node in model.graph.node:
        kinds = {_FLOAT_NAMES.get(types.get(x)) for x in (*node.input, *node.output) if x} - {None}
        if node.op_type in ("Cast", "Constant") or not kinds:
            continue
        kind = sorted(kinds)[0] if len(kinds) == 1 else "mixed"
        out.setdefault(node.op_type, Counter())[kind] += 1
    return {k: dict(sorted(v.items())) for k, v in sorted(out.items())}


def emulate_fp16_storage(fp16_onnx: Path, out_onnx: Path) -> Path:
    """An FP32 copy of a mixed fp16 graph that rounds every fp16 tensor to fp16 with explicit Casts.

    What ORT CPU cannot show (ort_cpu_precision): it computes most fp16 ops in FP32 and drops the
    fp16 rounding between two such ops, so an overflow between them never happens. Here every value
    the graph stores in fp16 goes through Cast(fp16) -> Cast(fp32) right after it is produced, so
    rounding and overflow (to inf) happen where they would on a GPU; arithmetic inside an op stays
    FP32, as TensorRT's fp16 GEMMs and reductions accumulate. Run it with optimisation off."""
    model = onnx.load(str(fp16_onnx))
    g, f16, f32 = model.graph, onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    types = _types(onnx.shape_inference.infer_shapes(model))
    for t in g.initializer:
        if t.data_type == f16:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    nodes = []
    for node in g.node:
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.i == f16:
                a.i = f32
            if node.op_type == "Constant" and a.name == "value" and a.t.data_type == f16:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float32), a.t.name))
        nodes.append(node)
        for k, out in enumerate(node.output):
            if out and types.get(out) == f16:
                node.output[k] = f"{out}__pre_fp16"
                nodes += [helper.make_node("Cast", [node.output[k]], [f"{out}__fp16"], to=f16, name=f"{out}__round"),
                          helper.make_node("Cast", [f"{out}__fp16"], [out], to=f32, name=f"{out}__back")]
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    for v in (*g.input, *g.output):
        if v.type.tensor_type.elem_type == f16:
            v.type.tensor_type.elem_type = f32
    onnx.save(model, str(out_onnx))
    return Path(out_onnx)


def _lower_precision(qdq_onnx: Path, feeds: Sequence[dict[str, np.ndarray]], settings: QdqSettings) -> dict:
    """Lower the FP32 Q/DQ graph in place to settings.high_precision_dtype; returns what the report keeps.

    fp16: the overflow nodes stay FP32, the rest becomes FP16, and the float census is checked.
    bf16 has FP32's range, so nothing overflows and modelopt's own converter does all of it."""
    before = float_census(qdq_onnx)
    if settings.high_precision_dtype == "fp32":
        return {"high_precision_dtype": "fp32", "census": before}
    if settings.high_precision_dtype == "bf16":
        from modelopt.onnx.autocast.convert import convert_to_f16

        onnx.save(convert_to_f16(onnx.load(str(qdq_onnx)), low_precision_type="bf16", keep_io_types=True),
                  str(qdq_onnx))
        return {"high_precision_dtype": "bf16", "census": float_census(qdq_onnx)}
    keep = fp32_overflow_nodes(qdq_onnx, feeds, settings.fp16_overflow_margin)
    onnx.save(_to_fp16(onnx.load(str(qdq_onnx)), list(keep)), str(qdq_onnx))
    census = float_census(qdq_onnx)
    op_types = {n.name: n.op_type for n in onnx.load(str(qdq_onnx), load_external_data=False).graph.node}
    check_float_census(census, before["io"], keep, op_types)
    log.info("fp16 Q/DQ graph: %s ops FP16, %s FP32 (%d kept for overflow)", census["ops"].get("fp16", 0),
             census["ops"].get("fp32", 0), len(keep))
    return {"high_precision_dtype": "fp16", "census": census, "census_fp32_graph": before,
            "kept_fp32_for_overflow": keep, "fp16_max_over_margin": FP16_MAX / settings.fp16_overflow_margin}


def check_qdq_structure(onnx_path: Path, op_types: Sequence[str] = ("MatMul", "Gemm"), min_gemm_dim: int = 16,
                        exempt: Sequence[str] = ()) -> dict:
    """Every op_types node with a weight input reads both inputs through DequantizeLinear, and the weight's
    scale is per output channel (length == channels, axis on the channel dim). Raises QdqStructureError.

    Weights with a dimension below min_gemm_dim are exempt: modelopt leaves them unquantized on purpose
    (TensorRT's INT8 GEMMs need K, N >= 16; a ranker's 1-wide output layer is one), as are nodes whose
    name matches a regex in `exempt` (kept in float on purpose)."""
    graph = onnx.load(str(onnx_path)).graph
    consts = {t.name: t for t in graph.initializer}
    consts.update({n.output[0]: n.attribute[0].t for n in graph.node if n.op_type == "Constant" and n.attribute})
    producer = {o: n for n in graph.node for o in n.output}

    def weight_of(name: str):  # the constant behind (Q ->) DQ, or None for an activation
        while name not in consts:
            node = producer.get(name)
            if node is None or node.op_type not in ("DequantizeLinear", "QuantizeLinear", "Cast"):
                return None
            name = node.input[0]
        return consts[name]

    problems, n_weighted, n_activation, n_exempt = [], 0, 0, 0
    for node in (n for n in graph.node if n.op_type in op_types):
        weights = [(i, weight_of(x)) for i, x in enumerate(node.input[:2])]
        weights = [(i, w) for i, w in weights if w is not None]
        if not weights:
            n_activation += 1
            continue
        if any(min(w.dims[-2:], default=0) < min_gemm_dim for _, w in weights) or \
                any(re.fullmatch(x, node.name) for x in exempt):
            n_exempt += 1
            continue
        n_weighted += 1
        for i, x in enumerate(node.input[:2]):
            if getattr(producer.get(x), "op_type", None) != "DequantizeLinear":
                problems.append(f"{node.name}: input {i} ({x}) is not produced by DequantizeLinear")
        for i, w in weights:
            dq = producer.get(node.input[i])
            if getattr(dq, "op_type", None) != "DequantizeLinear":
                continue
            rank = len(w.dims)
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            # MatMul weight [.., K, N] (as B) or [.., M, K] (as A); Gemm B is [K, N], or [N, K] with transB.
            want = 0 if (node.op_type == "Gemm" and trans_b) else (rank - 1 if i == 1 else rank - 2)
            scale = numpy_helper.to_array(consts[dq.input[1]]) if dq.input[1] in consts else None
            axis = next((a.i for a in dq.attribute if a.name == "axis"), 1) % max(rank, 1)
            if scale is None:
                problems.append(f"{node.name}: weight scale {dq.input[1]} is not a constant")
            elif scale.size == 1:
                problems.append(f"{node.name}: weight {w.name} has a per-tensor scale")
            elif scale.size != w.dims[want] or axis != want:
                problems.append(f"{node.name}: weight {w.name} {list(w.dims)} has {scale.size} scales on axis "
                                f"{axis}; expected {w.dims[want]} on axis {want}")
    if n_weighted == 0:
        problems.append(f"no {'/'.join(op_types)} node with a weight input")
    if problems:
        raise QdqStructureError(f"{Path(onnx_path).name}: {len(problems)} QDQ problem(s): " + "; ".join(problems[:8]))
    ops = Counter(n.op_type for n in graph.node)
    return {"weighted_nodes_per_channel": n_weighted, "activation_only_nodes": n_activation, "exempt": n_exempt,
            "quantize_linear": ops["QuantizeLinear"], "dequantize_linear": ops["DequantizeLinear"]}


# ---- encoder helpers -----------------------------------------------------------------------------


# The buckets calibration pads with: fixed here rather than read from spec.SEQ_BUCKETS, because padded
# positions' activations enter the calibration ranges, so a new serving bucket (8 was added for short
# queries) must not silently change the scales of every INT8 encoder built afterwards.
CALIBRATION_BUCKETS = (16, 32, 64, 128)


def encoder_calibration_feeds(tokenizer_json: Path, texts: list[str], batch_size: int = 32) -> list[dict]:
    """Feeds like serving's: each text padded to its sequence bucket (CALIBRATION_BUCKETS), batches of one bucket."""
    if not texts:
        raise CalibrationFeedError("no calibration texts")
    tok = runtime.BucketTokenizer(tokenizer_json, CALIBRATION_BUCKETS)
    by_bucket: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for text in texts:
        ids, mask = tok.encode([text])
        by_bucket.setdefault(ids.shape[1], []).append((ids[0], mask[0]))
    feeds = []
    for width in sorted(by_bucket):
        rows = by_bucket[width]
        for s in range(0, len(rows), batch_size):
            chunk = rows[s:s + batch_size]
            feeds.append({spec.INPUT_IDS.name: np.stack([r[0] for r in chunk]),
                          spec.ATTENTION_MASK.name: np.stack([r[1] for r in chunk])})
    return feeds


# ---- measurement CLI (encoder) -----------------------------------------------------------------------

# HF BERT exports name the FFN up-projection like this; its input (the attention LayerNorm output) carries
# the outlier channels that a static per-tensor activation scale cannot cover (docs/quantization.md).
BERT_FFN_IN = r".*/intermediate/dense/MatMul"


def _ort(mode: str, op_types=("MatMul",), per_channel=True, reduce_range=False, **kw) -> OrtInt8Settings:
    # Every measured variant spells out the main knobs, so changing the defaults cannot relabel a row.
    return OrtInt8Settings(mode=mode, op_types=op_types, per_channel=per_channel, reduce_range=reduce_range,
                           weight_type=kw.pop("weight_type", "int8"), **kw)


ORT_VARIANTS: dict[str, OrtInt8Settings] = {
    "dynamic MatMul per-channel": _ort("dynamic"),
    "dynamic MatMul per-channel reduce-range": _ort("dynamic", reduce_range=True),
    "dynamic MatMul per-tensor": _ort("dynamic", per_channel=False),
    "dynamic MatMul per-tensor reduce-range": _ort("dynamic", per_channel=False, reduce_range=True),
    "dynamic MatMul per-channel u8 weights": _ort("dynamic", weight_type="uint8"),
    "dynamic MatMul per-channel pre-process": _ort("dynamic", pre_process=True),
    "dynamic MatMul+Gather per-channel": _ort("dynamic", ("MatMul", "Gather")),
    "dynamic MatMul+Gather per-channel reduce-range": _ort("dynamic", ("MatMul", "Gather"), reduce_range=True),
    "dynamic all ops per-channel": _ort("dynamic", ()),
    "static QDQ MatMul per-channel": _ort("static"),
    "static QDQ MatMul per-channel reduce-range": _ort("static", reduce_range=True),
    "static QDQ MatMul per-tensor reduce-range": _ort("static", per_channel=False, reduce_range=True),
    "static QDQ MatMul per-channel u8 weights": _ort("static", weight_type="uint8"),
    "static QDQ MatMul per-channel reduce-range percentile": _ort("static", reduce_range=True,
                                                                  calibration_method="percentile"),
    "static QDQ all MatMul inputs+outputs per-channel reduce-range": _ort("static", reduce_range=True,
                                                                         weighted_only=False),
}
MODELOPT_VARIANTS: dict[str, QdqSettings] = {
    "modelopt QDQ max": QdqSettings(),
    "modelopt QDQ entropy": QdqSettings(calibration_method="entropy"),
    "modelopt QDQ max FFN-in-float": QdqSettings(nodes_to_exclude=(BERT_FFN_IN,)),
}


def split_texts(catalog_dir: Path, n_calibration: int, n_eval: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint calibration and held-out texts, half product titles and half search queries each."""
    from conversion.catalog_generator import Catalog

    catalog = Catalog.load(Path(catalog_dir))
    rng = np.random.default_rng(seed)
    cal, held_out = [], []
    for pool in (list(dict.fromkeys(catalog.titles)), list(dict.fromkeys(catalog.queries))):
        order = rng.permutation(len(pool))
        cal += [pool[i] for i in order[: n_calibration // 2]]
        held_out += [pool[i] for i in order[n_calibration // 2: n_calibration // 2 + n_eval // 2]]
    return cal, held_out


def fidelity(reference: np.ndarray, emb: np.ndarray) -> dict:
    """Row cosine to the FP32 embeddings and top-10 neighbour overlap within the held-out set."""
    cos = (emb * reference).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(reference, axis=1))
    top = lambda e: np.argsort(-(e @ e.T - 2 * np.eye(len(e))), axis=1)[:, :10]  # noqa: E731 (self excluded)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top(reference), top(emb))])
    return {"mean_cos": round(float(cos.mean()), 4), "min_cos": round(float(cos.min()), 4),
            "top10_overlap": round(float(overlap), 3)}


def time_encoders(paths: dict[str, Path], tokenizer_json: Path, texts: list[str], threads: int, runs: int,
                  rounds: int = 5) -> dict[str, dict]:
    """Median latency at batch 1 x seq 16 and throughput at batch 32 x seq 32 for each model.

    Models take turns in `rounds` rounds, so load from other processes on a shared machine spreads
    over all of them instead of penalising whichever ran during a busy minute.
    """
    from tqdm import tqdm

    def fixed(batch: list[str], width: int) -> dict:
        ids, mask = runtime.BucketTokenizer(tokenizer_json, buckets=(width,)).encode(batch)
        return {spec.INPUT_IDS.name: ids, spec.ATTENTION_MASK.name: mask}

    one, batch = fixed(texts[-1:], 16), fixed(texts[:32], 32)  # a query; 32 product titles
    sessions = {name: runtime.ort_session(p, threads) for name, p in paths.items()}
    times: dict[str, tuple[list, list]] = {name: ([], []) for name in paths}
    for _ in tqdm(range(rounds), desc="timing rounds", mininterval=1.0):
        for name, session in sessions.items():
            out = [session.get_outputs()[0].name]
            for feed, n, sink in ((one, max(runs // rounds, 1), times[name][0]),
                                  (batch, max(runs // 10 // rounds, 2), times[name][1])):
                session.run(out, feed)  # warm this shape again after the other models ran
                for _ in range(n):
                    t = time.perf_counter()
                    session.run(out, feed)
                    sink.append(time.perf_counter() - t)
    return {name: {"b1_s16_ms": round(1e3 * float(np.median(t1)), 2),
                   "b32_s32_texts_s": round(32 / float(np.median(t32)), 1)} for name, (t1, t32) in times.items()}


def _mb(path: Path) -> float:
    return round(Path(path).stat().st_size / 2**20, 1)


def _table(rows: list[dict]) -> str:
    cols = ["variant", "mb", "b1_s16_ms", "b32_s32_texts_s", "mean_cos", "min_cos", "top10_overlap", "quantize_s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _variants(args) -> dict:
    variants: dict = dict(ORT_VARIANTS)
    if args.bert_fusion:
        fusion = tuple(int(x) for x in args.bert_fusion.split(","))
        for rr in (False, True):
            suffix = " reduce-range" if rr else ""
            variants["dynamic fused-BERT MatMul per-channel" + suffix] = _ort(
                "dynamic", bert_fusion=fusion, reduce_range=rr)
            variants["dynamic fused-BERT MatMul+Attention per-channel" + suffix] = _ort(
                "dynamic", ("MatMul", "Attention"), bert_fusion=fusion, reduce_range=rr)
    if args.modelopt:
        variants.update(MODELOPT_VARIANTS)
    if args.variants:
        variants = {k: v for k, v in variants.items() if any(s.strip() == k for s in args.variants.split(","))}
    return variants


def compare(args) -> list[dict]:
    from tqdm import tqdm

    cal_texts, held_out = split_texts(args.catalog, args.n_calibration, args.n_eval, args.seed)
    feeds = encoder_calibration_feeds(args.tokenizer, cal_texts)
    tok = runtime.BucketTokenizer(args.tokenizer)
    embed = lambda path: runtime.encode_texts(tok, runtime.ort_session(path, args.threads), held_out, 32)  # noqa: E731
    reference = embed(args.onnx)
    rows = {"fp32": {"variant": "fp32", "mb": _mb(args.onnx), **fidelity(reference, reference)}}
    paths = {"fp32": args.onnx}
    with tempfile.TemporaryDirectory(prefix="quantize-compare-") as work:
        for name, settings in tqdm(_variants(args).items(), desc="quantizing", mininterval=1.0):
            out = Path(work) / name.replace(" ", "_").replace("/", "-") / runtime.ENCODER_FILE
            try:
                if isinstance(settings, QdqSettings):
                    report = quantize_qdq_modelopt(args.onnx, out, feeds, settings)
                else:
                    report = quantize_ort_int8(args.onnx, out, settings, feeds)
            except Exception as e:  # one failing variant is a row of the table, not the end of the run
                log.exception("variant %r failed", name)
                rows[name] = {"variant": name, "error": f"{type(e).__name__}: {e}"[:300]}
                continue
            label = name + (" (default)" if settings == OrtInt8Settings() else "")
            rows[name] = {"variant": label, "mb": _mb(out), **fidelity(reference, embed(out)),
                          "quantize_s": report["seconds"], "settings": dataclasses.asdict(settings)}
            paths[name] = out
        for name, timing in time_encoders(paths, args.tokenizer, held_out, args.threads, args.runs).items():
            rows[name].update(timing)
    print(_table(list(rows.values())))
    if args.out_json:
        meta = {"calibration_texts": len(cal_texts), "held_out_texts": len(held_out), "threads": args.threads,
                "runs": args.runs, "onnx": str(args.onnx), "catalog": str(args.catalog),
                "versions": {"onnxruntime": ort.__version__, "onnx": onnx.__version__}}
        Path(args.out_json).write_text(json.dumps({"meta": meta, "rows": list(rows.values())}, indent=2))
    return list(rows.values())


def build_qdq(args) -> dict:
    """The TensorRT QDQ encoder with its calibration set beside it, checked on ORT CPU."""
    cal_texts, held_out = split_texts(args.catalog, args.n_calibration, args.n_eval, args.seed)
    out = Path(args.out) / runtime.ENCODER_FILE
    settings = QdqSettings(calibration_method=args.calibration_method, n_calibration_samples=len(cal_texts),
                           nodes_to_exclude=tuple(args.exclude), high_precision_dtype=args.high_precision)
    report = quantize_qdq_modelopt(args.onnx, out, encoder_calibration_feeds(args.tokenizer, cal_texts), settings)
    _write_atomic(out.parent / "calibration_texts.json", lambda p: p.write_text(json.dumps(cal_texts, indent=1)))
    tok = runtime.BucketTokenizer(args.tokenizer)
    reference, emb = (runtime.encode_texts(tok, runtime.ort_session(p, args.threads), held_out, 32)
                      for p in (args.onnx, out))
    timing = time_encoders({"fp32": args.onnx, "qdq": out}, args.tokenizer, held_out, args.threads, args.runs)
    label = f"modelopt QDQ {args.calibration_method} {args.high_precision}" + "".join(f" {x}-float" for x in args.exclude)
    row = {"variant": label, "mb": _mb(out), **fidelity(reference, emb), **timing["qdq"]}
    report["evaluation"] = {"held_out_texts": len(held_out), "fp32": timing["fp32"], "qdq_on_ort_cpu": row,
                            "ort_cpu_precision": ort_cpu_precision(out)}
    report = _save_report(out, report)
    print(_table([{"variant": "fp32", **timing["fp32"]}, row]))
    return report


def census(args) -> dict:
    """The float census of a graph, and what ONNX Runtime's CPU provider really runs in fp16."""
    out = {"census": float_census(args.onnx), "ort_cpu_precision": ort_cpu_precision(args.onnx)}
    print(json.dumps(out, indent=1))
    return out


def fidelity_gate(args) -> dict:
    """Encoder graphs against the FP32 export on the catalog's held-out queries and titles (the encoder
    report's texts and measures: mean cosine, top-10 neighbour overlap), each run by ORT CPU as written
    and, for graphs with fp16 tensors, also with fp16 storage emulated (emulate_fp16_storage)."""
    from conversion.catalog_generator import Catalog
    from conversion.encoder_report import TARGETS, measure_fidelity
    from conversion.prune_encoder import split_texts

    texts = split_texts(Catalog.load(args.catalog))
    paths = {"fp32": args.reference}
    with tempfile.TemporaryDirectory(prefix="fp16-emulated-") as tmp:
        for k, path in enumerate(args.candidate):
            paths[str(path)] = path
            if float_census(path)["tensors"].get("fp16"):
                paths[f"{path} (fp16 storage emulated)"] = emulate_fp16_storage(path, Path(tmp) / f"{k}.onnx")
        rows = measure_fidelity(paths, runtime.BucketTokenizer(args.tokenizer), texts["heldout_queries"],
                                texts["heldout_titles"])
    gate = {k: TARGETS[k] for k in ("mean_cosine", "top10_overlap")}
    for name, row in rows.items():
        row["passes_gate"] = all(row[k] >= v for k, v in gate.items())
        print(f"{name}: mean cos {row['mean_cosine']:.4f}, min cos {row['min_cosine']:.4f}, "
              f"top-10 overlap {row['top10_overlap']:.3f}, gate {'PASS' if row['passes_gate'] else 'FAIL'}")
    out = {"gate": gate, "heldout": {k: len(texts[k]) for k in ("heldout_queries", "heldout_titles")}, "rows": rows}
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(out, indent=2))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m conversion.quantize", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("census", help="count FP16/FP32 tensors and ops of a graph").add_argument(
        "--onnx", type=Path, required=True)
    for name, help_ in (("compare", "measure the INT8 variants of an encoder"),
                        ("qdq", "write the modelopt INT8 QDQ encoder for TensorRT")):
        c = sub.add_parser(name, help=help_)
        c.add_argument("--onnx", type=Path, required=True)
        c.add_argument("--tokenizer", type=Path, required=True)
        c.add_argument("--catalog", type=Path, help="stage-02 catalog folder (default: the ci profile's)")
        c.add_argument("--n-calibration", type=int, default=512)
        c.add_argument("--n-eval", type=int, default=500)
        c.add_argument("--threads", type=int, default=spec.DEFAULT_ORT_THREADS)
        c.add_argument("--runs", type=int, default=300, help="timed runs at batch 1 (a tenth at batch 32)")
        c.add_argument("--seed", type=int, default=0)
    cmp_, qdq = sub.choices["compare"], sub.choices["qdq"]
    cmp_.add_argument("--out-json", type=Path)
    cmp_.add_argument("--variants", help="comma-separated variant names to run (default: all)")
    cmp_.add_argument("--bert-fusion", help="NUM_HEADS,HIDDEN: also measure ORT BERT attention fusion first")
    cmp_.add_argument("--modelopt", action="store_true", help="also measure the modelopt QDQ variants on CPU")
    qdq.add_argument("--out", type=Path, required=True, help="folder for encoder.onnx and its calibration set")
    qdq.add_argument("--calibration-method", default="max", choices=("max", "entropy"))
    qdq.add_argument("--high-precision", default=QdqSettings.high_precision_dtype, choices=("fp16", "fp32", "bf16"),
                     help="float type of everything not INT8 (default %(default)s)")
    qdq.add_argument("--exclude", action="append", default=None, metavar="REGEX",
                     help=f"node names to keep in float (repeatable; default {BERT_FFN_IN!r}, '' for none)")
    gate = sub.add_parser("fidelity", help="encoder graphs vs the FP32 export in ORT CPU (+ fp16 storage emulated)")
    gate.add_argument("--reference", type=Path, required=True, help="the FP32 export")
    gate.add_argument("--candidate", type=Path, action="append", required=True, help="repeatable")
    gate.add_argument("--tokenizer", type=Path, required=True)
    gate.add_argument("--catalog", type=Path, required=True, help="stage-02 catalog folder (its held-out split)")
    gate.add_argument("--out-json", type=Path)
    args = p.parse_args(argv)
    if args.command == "fidelity":
        fidelity_gate(args)
        return 0
    if args.command == "census":
        census(args)
        return 0
    if args.command == "qdq":
        args.exclude = [x for x in (args.exclude if args.exclude is not None else [BERT_FFN_IN]) if x]
    # WARNING for the root logger: onnxruntime's quantizer logs every tensor at INFO there.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    if args.catalog is None:
        from conversion.build_models import profile_settings
        from conversion.stages import stage_dir

        args.catalog = stage_dir("02-catalog", profile_settings("ci").artifact.catalog)
    try:
        _require_model(args.onnx)
        compare(args) if args.command == "compare" else build_qdq(args)
    except QuantizationError as e:
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
