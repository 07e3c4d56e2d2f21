"""Which encoder the build serves: the fastest candidate that passes the broad fidelity gate.

Candidates, fastest first:

1. "pruned int8": the profile's pruned + distilled + static INT8 encoder (stage 04-encoder-compressed).
2. "unpruned int8": the FP32 export with SmoothQuant on each layer's FFN-in MatMul, then static INT8
   with the served settings, layer 0's FFN-out left FP32 (stage 04-encoder-unpruned-int8, built here;
   docs/encoder_compression.md has the measurements that chose this recipe).

Each candidate's ORT INT8 graph (`encoder.onnx`, what the CPU repository serves) and its TensorRT Q/DQ
graph (`encoder.qdq.onnx`, scored in ORT on CPU) must both reach mean cosine >= 0.98 and top-10
neighbour overlap >= 0.9 against the FP32 teacher on the broad evaluation set (conversion/broad_text.py,
or `--eval-texts FILE`), measured with conversion.encoder_report's own code. The first that passes is
served; the choice, every candidate tried and its broad and catalog fidelity are written to
`04-encoder-choice-<hash>/choice.json`, which `build_models.built_artifacts` reads, so rendering and
manifests never re-measure. If none passes the build stops with one line naming the figure.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from conversion import stages
from conversion.catalog_generator import Catalog, CatalogSettings, build_catalog
from conversion.compress_encoder import (CALIBRATION_TEXTS, QDQ_ONNX, CompressSettings, build_compressed_encoder,
                                         calibration_texts)
from conversion.export_encoder import (ENCODER_ONNX, REPORT_JSON, TOKENIZER_JSON, EncoderExportSettings,
                                       check_fidelity, export_encoder, load_torch_encoder)
from conversion.quantize import (BERT_FFN_IN, OrtInt8Settings, QdqSettings, check_qdq_structure,
                                 encoder_calibration_feeds, quantize_ort_int8, quantize_qdq_modelopt)

log = logging.getLogger(__name__)

UNPRUNED_STAGE = "04-encoder-unpruned-int8"
CHOICE_STAGE = "04-encoder-choice"
CHOICE_JSON = "choice.json"
SMOOTHED_ONNX = "encoder.smoothed-fp32.onnx"
PRUNED, UNPRUNED = "pruned int8", "unpruned int8"
CANDIDATES = (PRUNED, UNPRUNED)
# The most sensitive FFN-out of the export (measured, docs/encoder_compression.md); left FP32.
LAYER0_FFN_OUT = "/model/encoder/layer.0/output/dense/MatMul"
FFN_OUT = r"/model/encoder/layer\.\d+/output/dense/MatMul"  # a regex (modelopt and the structure check)
METRIC_NAMES = {"mean_cosine": "mean cosine", "top10_overlap": "top-10 overlap"}


class EncoderGateError(ValueError):
    """No candidate passed the fidelity gate; the message is one line naming the figure."""


@dataclass(frozen=True)
class UnprunedInt8Settings:
    teacher: EncoderExportSettings = field(default_factory=EncoderExportSettings)
    catalog: CatalogSettings = field(default_factory=CatalogSettings)
    # The served static settings plus SmoothQuant (alpha 0.5) on every FFN-in and layer 0's FFN-out in FP32.
    ort_int8: OrtInt8Settings = field(default_factory=lambda: OrtInt8Settings(
        mode="static", smooth_alpha=0.5, smooth_nodes=BERT_FFN_IN, nodes_to_exclude=(LAYER0_FFN_OUT,)))
    # From the SMOOTHED FP32 graph. TensorRT's INT8 activations are symmetric, which costs more than ORT's
    # asymmetric uint8 after GELU: with only layer 0's FFN-out in float the Q/DQ graph read broad top-10
    # 0.891 (ci, 2026-12-02), 0.894 with attention's activation MatMuls in float too, 0.909 with layers
    # 0-1's FFN-out in float; every FFN-out in float (FP16 on TensorRT) gave 0.9964 / 0.936. Q, K, V, the
    # attention output and FFN-in (smoothed) stay INT8.
    qdq: QdqSettings = field(default_factory=lambda: QdqSettings(
        nodes_to_exclude=(FFN_OUT,), disable_mha_qdq=True, n_calibration_samples=1024))
    # Calibration: the served encoder's catalog texts plus seeded vocabulary pseudo-texts (never eval text).
    catalog_calibration_texts: int = 512
    vocabulary_calibration_texts: int = 512
    seed: int = 0
    min_int8_cosine: float = 0.95  # per row against the FP32 PyTorch model: below it the graph is broken


@dataclass(frozen=True)
class EncoderGate:
    mean_cosine: float = 0.98
    top10_overlap: float = 0.9
    eval_texts: str = ""  # a user's --eval-texts file; "" = the bundled broad set
    # sha256 of the texts judged (conversion.broad_text.EvalTexts.sha256), so edited texts re-select
    eval_sha256: str = field(default_factory=lambda: _bundled_sha256())
    candidates: tuple[str, ...] = CANDIDATES

    def __post_init__(self):
        unknown = set(self.candidates) - set(CANDIDATES)
        if unknown or not self.candidates:
            raise ValueError(f"gate candidates must be drawn from {CANDIDATES}, got {self.candidates}")

    @classmethod
    def for_texts(cls, eval_texts: Path | str | None = None, **kw) -> "EncoderGate":
        """The gate on a file (validated now, so a bad file fails before any build work) or the bundled set."""
        from conversion.broad_text import load_eval_texts

        texts = load_eval_texts(Path(eval_texts) if eval_texts else None)
        return cls(eval_texts=str(Path(eval_texts).resolve()) if eval_texts else "", eval_sha256=texts.sha256, **kw)


def _bundled_sha256() -> str:
    from conversion.broad_text import load_broad_texts

    return load_broad_texts().sha256


# ---- the unpruned SmoothQuant INT8 stage -----------------------------------------------------------------


def unpruned_calibration_texts(settings: UnprunedInt8Settings, tokenizer_json: Path) -> list[str]:
    from conversion.generated_text import vocabulary_texts

    catalog = Catalog.load(build_catalog(settings.catalog))
    return (calibration_texts(catalog, settings.catalog_calibration_texts, settings.seed)
            + vocabulary_texts(tokenizer_json, settings.vocabulary_calibration_texts, seed=settings.seed))


def build_unpruned_int8(settings: UnprunedInt8Settings = UnprunedInt8Settings(), force: bool = False) -> Path:
    """FP32 export -> SmoothQuant -> static ORT INT8 (encoder.onnx) and modelopt Q/DQ (encoder.qdq.onnx)."""
    folder = stages.stage_dir(UNPRUNED_STAGE, settings)
    if stages.is_complete(folder) and not force:
        log.info("unpruned INT8 encoder up to date: %s", folder)
        return folder
    fp32 = export_encoder(settings.teacher)
    export = json.loads((fp32 / REPORT_JSON).read_text())
    texts = unpruned_calibration_texts(settings, fp32 / TOKENIZER_JSON)
    module, _ = load_torch_encoder(settings.teacher.model, settings.teacher.max_length)
    with stages.atomic_stage(folder, settings) as tmp:
        shutil.copyfile(fp32 / TOKENIZER_JSON, tmp / TOKENIZER_JSON)
        (tmp / CALIBRATION_TEXTS).write_text(json.dumps(texts, ensure_ascii=False, indent=0))
        feeds = encoder_calibration_feeds(tmp / TOKENIZER_JSON, texts)
        int8 = quantize_ort_int8(fp32 / ENCODER_ONNX, tmp / ENCODER_ONNX, settings.ort_int8, feeds,
                                 smoothed_out=tmp / SMOOTHED_ONNX)
        smoothed_fidelity = check_fidelity(module, tmp / SMOOTHED_ONNX, tmp / TOKENIZER_JSON,
                                           min_cosine=settings.teacher.min_cosine,
                                           max_length=settings.teacher.max_length)
        int8_fidelity = check_fidelity(module, tmp / ENCODER_ONNX, tmp / TOKENIZER_JSON,
                                       min_cosine=settings.min_int8_cosine, max_length=settings.teacher.max_length)
        qdq = quantize_qdq_modelopt(tmp / SMOOTHED_ONNX, tmp / QDQ_ONNX, feeds, settings.qdq)
        structure = check_qdq_structure(tmp / QDQ_ONNX, exempt=settings.qdq.nodes_to_exclude)
        report = {"embedding_dim": export["embedding_dim"], "source_model": export["source_model"],
                  "source_export": fp32.name, "opset": export["opset"], "max_length": export["max_length"],
                  "variant": UNPRUNED, "fidelity": export["fidelity"],
                  "smoothed_fidelity_to_torch": smoothed_fidelity, "int8_fidelity_to_torch": int8_fidelity,
                  "int8": int8, "qdq": qdq, "qdq_structure": structure,
                  "calibration": {"catalog_texts": settings.catalog_calibration_texts,
                                  "vocabulary_texts": settings.vocabulary_calibration_texts, "seed": settings.seed}}
        (tmp / REPORT_JSON).write_text(json.dumps(report, indent=2, default=str))
    return folder


# ---- the gate ----------------------------------------------------------------------------------------


def choice_settings(compression: CompressSettings, unpruned: UnprunedInt8Settings | None, gate: EncoderGate) -> dict:
    return {"compression": compression, "unpruned": unpruned, "gate": gate}


def choice_dir(compression: CompressSettings, unpruned: UnprunedInt8Settings | None, gate: EncoderGate) -> Path:
    return stages.stage_dir(CHOICE_STAGE, choice_settings(compression, unpruned, gate))


def read_choice(folder: Path) -> dict:
    return json.loads((Path(folder) / CHOICE_JSON).read_text())


def chosen_folder(choice_folder: Path) -> Path:
    """The served encoder folder a completed choice names (a sibling under the same build root)."""
    return Path(choice_folder).parent / read_choice(choice_folder)["folder"]


def _target(t: float) -> str:
    return f"{t:.2f}" if round(t, 2) == t else f"{t:g}"


def gate_failures(fid: dict, gate: EncoderGate) -> list[tuple[str, float, float]]:
    """(metric, value, target) for each gated figure below its target, on the broad set."""
    return [(m, fid["broad"][m], t) for m, t in (("mean_cosine", gate.mean_cosine),
                                                 ("top10_overlap", gate.top10_overlap)) if fid["broad"][m] < t]


def _candidate_folder(name: str, compression: CompressSettings, unpruned: UnprunedInt8Settings | None) -> Path:
    if name == PRUNED:
        return build_compressed_encoder(compression)
    if unpruned is None:
        raise ValueError("the unpruned int8 candidate has no settings")
    return build_unpruned_int8(unpruned)


def measure_candidate(fp32_dir: Path, folder: Path, eval_texts, catalog: CatalogSettings) -> dict:
    """{"int8": {set: fidelity}, "qdq": {...}} against the FP32 export: encoder_report.measure_fidelity."""
    from conversion.encoder_report import BROAD, CATALOG, measure_fidelity
    from conversion.prune_encoder import split_texts
    from model_repository.runtime import BucketTokenizer

    held = split_texts(Catalog.load(build_catalog(catalog)))
    rows = measure_fidelity({"fp32": fp32_dir / ENCODER_ONNX, "int8": folder / ENCODER_ONNX, "qdq": folder / QDQ_ONNX},
                            BucketTokenizer(folder / TOKENIZER_JSON),
                            {BROAD: (eval_texts.queries, eval_texts.titles),
                             CATALOG: (held["heldout_queries"], held["heldout_titles"])})
    return {"int8": rows["int8"], "qdq": rows["qdq"]}


def choose_served_encoder(encoder: EncoderExportSettings, compression: CompressSettings,
                          unpruned: UnprunedInt8Settings | None, gate: EncoderGate, force: bool = False) -> Path:
    """Build candidates in speed order until one passes the gate; return its folder (choice cached)."""
    from conversion.broad_text import load_eval_texts

    folder = choice_dir(compression, unpruned, gate)
    if stages.is_complete(folder) and not force and chosen_folder(folder).is_dir():
        choice = read_choice(folder)
        log.info("served encoder (gate chose %s earlier): %s", choice["chosen"], choice["folder"])
        return chosen_folder(folder)
    texts = load_eval_texts(Path(gate.eval_texts) if gate.eval_texts else None)
    if gate.eval_sha256 and texts.sha256 != gate.eval_sha256:
        raise EncoderGateError(f"encoder gate: {texts.source} changed since the build settings were made "
                               "(sha256 differs); run the build again")
    fp32 = export_encoder(encoder)
    tried, failures = [], []
    for name in gate.candidates:
        cand = _candidate_folder(name, compression, unpruned)
        fid = measure_candidate(fp32, cand, texts, compression.prune.catalog)
        fails = [(name.replace("int8", graph), m, v, t)
                 for graph in ("int8", "qdq") for m, v, t in gate_failures(fid[graph], gate)]
        tried.append({"candidate": name, "folder": cand.name, "fidelity": fid, "passes": not fails,
                      "failures": [f"{n} {METRIC_NAMES[m]} {v:.4f} < {_target(t)}" for n, m, v, t in fails]})
        log.info("encoder gate: %s %s", name, "PASS" if not fails else "FAIL (" + "; ".join(tried[-1]["failures"]) + ")")
        if not fails:
            break
        failures.append(fails)
    else:
        n, m, v, t = failures[-1][0]
        others = "".join(f"; {f[0][0]} failed too ({METRIC_NAMES[f[0][1]]} {f[0][2]:.3f})" for f in failures[:-1])
        raise EncoderGateError(f"encoder gate failed: {n} {METRIC_NAMES[m]} {v:.3f} < {_target(t)} on broad set "
                               f"({texts.source}){others}")
    chosen = tried[-1]
    reason = ("the fastest candidate, and it passes the gate" if len(tried) == 1 else
              f"{', '.join(t['candidate'] for t in tried[:-1])} failed the gate "
              f"({'; '.join(f for t in tried[:-1] for f in t['failures'])}); {chosen['candidate']} passes")
    record = {"chosen": chosen["candidate"], "folder": chosen["folder"], "reason": reason, "tried": tried,
              "gate": {"mean_cosine": gate.mean_cosine, "top10_overlap": gate.top10_overlap, "set": "broad",
                       "graphs": ["encoder.onnx (ORT INT8, served on CPU)",
                                  "encoder.qdq.onnx (TensorRT Q/DQ, scored in ORT CPU)"]},
            "eval": texts.summary(), "candidates_in_speed_order": list(gate.candidates)}
    with stages.atomic_stage(folder, choice_settings(compression, unpruned, gate)) as tmp:
        (tmp / CHOICE_JSON).write_text(json.dumps(record, indent=2, default=str))
    log.info("served encoder: %s (%s)", chosen["candidate"], reason)
    return folder.parent / chosen["folder"]
