"""Stage 04: the pruned encoder exported to ONNX, then INT8 for ORT CPU and Q/DQ for TensorRT.

The folder is laid out like stage 01's, so render, the catalog artifact and the tests treat it
as just another encoder folder: `encoder.onnx` is what the CPU repository serves (pruned + ORT
INT8), `encoder.pruned-fp32.onnx` is the pruned model before quantization, and
`encoder.qdq.onnx` is the explicit-quantization graph a TensorRT engine is built from, with the
calibration set it was calibrated on saved beside it.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from conversion import stages
from conversion.catalog_generator import Catalog, build_catalog
from conversion.export_encoder import (ENCODER_ONNX, REPORT_JSON, TOKENIZER_JSON, ExportFidelityError,
                                       check_fidelity, export_onnx)
from conversion.prune_encoder import (DISTILL_JSON, STRUCTURE_JSON, PruneSettings, build_pruned_encoder,
                                      load_pruned_encoder, split_texts)
from conversion.quantize import (OrtInt8Settings, QdqSettings, check_qdq_structure, encoder_calibration_feeds,
                                 quantize_ort_int8, quantize_qdq_modelopt)

log = logging.getLogger(__name__)

STAGE = "04-encoder-compressed"
PRUNED_ONNX = "encoder.pruned-fp32.onnx"
QDQ_ONNX = "encoder.qdq.onnx"
CALIBRATION_TEXTS = "calibration_texts.json"


@dataclass(frozen=True)
class CompressSettings:
    prune: PruneSettings = field(default_factory=PruneSettings)
    # Static (calibrated) scales, not dynamic: dynamic INT8 takes each activation scale from the
    # whole batch, so a query's embedding moved by up to 0.02 depending on what it was batched or
    # padded with; static measured the same speed here and is batch-independent (docs).
    ort_int8: OrtInt8Settings = field(default_factory=lambda: OrtInt8Settings(mode="static"))
    qdq: QdqSettings = field(default_factory=QdqSettings)
    calibration_texts: int = 512
    # INT8 rounding costs a little on top of pruning; below this per-row floor against the pruned
    # FP32 graph the quantized model is rejected rather than served.
    min_int8_cosine: float = 0.95


def calibration_texts(catalog: Catalog, n: int, seed: int) -> list[str]:
    """Titles and queries in their catalog proportions, drawn only from the non-held-out share."""
    train = split_texts(catalog)["train"]
    rng = np.random.default_rng(seed)
    return [train[i] for i in sorted(rng.choice(len(train), min(n, len(train)), replace=False))]


def build_compressed_encoder(settings: CompressSettings = CompressSettings(), force: bool = False) -> Path:
    folder = stages.stage_dir(STAGE, settings)
    if stages.is_complete(folder) and not force:
        log.info("compressed encoder up to date: %s", folder)
        return folder
    pruned_dir = build_pruned_encoder(settings.prune)
    module, tok = load_pruned_encoder(pruned_dir)
    dim = int(module.model.config.hidden_size)
    texts = calibration_texts(Catalog.load(build_catalog(settings.prune.catalog)), settings.calibration_texts,
                              settings.prune.seed)
    with stages.atomic_stage(folder, settings) as tmp:
        tok.save(str(tmp / TOKENIZER_JSON))
        export_onnx(module, tok, tmp / PRUNED_ONNX, settings.prune.teacher.opset, dim)
        fidelity = check_fidelity(module, tmp / PRUNED_ONNX, tmp / TOKENIZER_JSON,
                                  min_cosine=settings.prune.teacher.min_cosine,
                                  max_length=settings.prune.teacher.max_length)
        (tmp / CALIBRATION_TEXTS).write_text(json.dumps(texts, ensure_ascii=False, indent=0))
        feeds = encoder_calibration_feeds(tmp / TOKENIZER_JSON, texts)
        int8 = quantize_ort_int8(tmp / PRUNED_ONNX, tmp / ENCODER_ONNX, settings.ort_int8, feeds)
        int8_fidelity = check_fidelity(module, tmp / ENCODER_ONNX, tmp / TOKENIZER_JSON,
                                       min_cosine=settings.min_int8_cosine,
                                       max_length=settings.prune.teacher.max_length)
        qdq = quantize_qdq_modelopt(tmp / PRUNED_ONNX, tmp / QDQ_ONNX, feeds, settings.qdq)
        structure = check_qdq_structure(tmp / QDQ_ONNX)
        distill = json.loads((pruned_dir / DISTILL_JSON).read_text())
        (tmp / STRUCTURE_JSON).write_text((pruned_dir / STRUCTURE_JSON).read_text())
        report = {"embedding_dim": dim, "source_model": str(pruned_dir), "opset": settings.prune.teacher.opset,
                  "max_length": settings.prune.teacher.max_length, "fidelity": fidelity,
                  "int8_fidelity_to_pruned": int8_fidelity, "int8": int8, "qdq": qdq, "qdq_structure": structure,
                  "pruning": {k: distill[k] for k in ("structure", "flops", "parameters", "keep_flops_achieved",
                                                       "heldout_title_cosine", "distill")}}
        (tmp / REPORT_JSON).write_text(json.dumps(report, indent=2, default=str))
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    d = PruneSettings()
    p = argparse.ArgumentParser(prog="python -m conversion.compress_encoder", description=__doc__.splitlines()[0])
    p.add_argument("--keep-flops", type=float, default=d.keep_flops, help="fraction of the teacher's FLOPs to keep")
    p.add_argument("--steps", type=int, default=d.distill_steps, help="distillation steps")
    p.add_argument("--generated-texts", type=int, default=d.generated_texts,
                   help="vocabulary pseudo-texts added to distillation (default %(default)s)")
    p.add_argument("--distill-texts", type=Path,
                   help="add this file's texts (UTF-8, one per line) to distillation; the FP32 teacher labels them")
    p.add_argument("--force", action="store_true", help="rebuild even if the stage folder is complete")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        extra = {}
        if args.distill_texts is not None:  # checked before any build work
            from conversion.generated_text import load_text_file, texts_sha256

            extra = {"extra_texts": str(args.distill_texts.resolve()),
                     "extra_texts_sha256": texts_sha256(load_text_file(args.distill_texts))}
        prune = PruneSettings(keep_flops=args.keep_flops, distill_steps=args.steps,
                              generated_texts=args.generated_texts, **extra)
        folder = build_compressed_encoder(CompressSettings(prune=prune), force=args.force)
    except (ExportFidelityError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
