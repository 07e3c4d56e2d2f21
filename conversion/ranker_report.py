"""Ranker benchmark: AUCs of the built ranker stage next to FP32 and compressed latency, with the targets.

AUCs come from the stage's metrics.json (test split, position-aware, the same numbers the
compression gate used). Latency is measured here, in one run, FP32 and served files interleaved
call by call (ORT CPU, 2 threads, sessions configured as the server configures them), on real
catalog rows: 100 and 1000 candidates of one query and one user, as feature_lookup sends them.

    python -m conversion.ranker_report --profile default --markdown docs/ranker_benchmark.md

Exit status 1 when a target is missed (each is printed PASS/FAIL), 2 on bad input.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from conversion.stages import build_root, is_complete, stage_dir
from conversion.train_ranker import LATENCY_SIZES, METRICS_JSON, RANKER_FP32_ONNX, RANKER_ONNX, STAGE, measure_latency
from model_repository import spec
from model_repository.runtime import CatalogTables

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankerTargets:
    """Issue 4's acceptance targets."""

    max_auc_drop: float = 0.005  # compressed vs FP32 on the test split
    max_gap_to_ground_truth: float = 0.01  # FP32 vs the true click model, generated data
    max_ms_1000: float = 1.0  # median, compressed, 1000 candidates, ORT CPU, 2 threads


def candidate_feeds(catalog_dir: Path, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One request's ranker input as feature_lookup builds it: real item rows, one query and user."""
    tables = CatalogTables.load(catalog_dir, mmap=False)
    rng = np.random.default_rng(seed)
    rows = rng.integers(1, len(tables.item_ids) + 1, n)
    query = tables.item_embeddings[rng.integers(1, len(tables.item_ids) + 1)]  # any unit-norm text embedding
    user = tables.user_features[rng.integers(1, len(tables.user_ids) + 1)]
    return {spec.query_embedding(0).name: np.repeat(query[None, :], n, axis=0),
            spec.item_embedding(0).name: np.ascontiguousarray(tables.item_embeddings[rows]),
            spec.ITEM_FEATURES.name: np.ascontiguousarray(tables.item_features[rows]),
            spec.USER_FEATURES.name: np.repeat(user[None, :], n, axis=0)}


def build_report(ranker_dir: Path, catalog_dir: Path, runs: int = 1000, targets: RankerTargets = RankerTargets(),
                 progress: bool = True) -> dict:
    metrics = json.loads((ranker_dir / METRICS_JSON).read_text())
    feeds = {n: candidate_feeds(catalog_dir, n) for n in LATENCY_SIZES}
    latency = measure_latency({"fp32": ranker_dir / RANKER_FP32_ONNX, "compressed": ranker_dir / RANKER_ONNX},
                              feeds, runs=runs, progress=progress)
    auc = dict(metrics["auc"])
    compression = metrics["compression"]
    if compression.get("tensorrt_qdq"):
        auc["qdq_in_ort"] = compression["tensorrt_qdq"]["auc"]
    checks = {
        f"compressed AUC >= FP32 AUC - {targets.max_auc_drop}": auc["compressed"] >= auc["fp32"] - targets.max_auc_drop,
        f"FP32 AUC >= ground-truth AUC - {targets.max_gap_to_ground_truth}":
            auc["fp32"] >= auc["ground_truth"] - targets.max_gap_to_ground_truth,
        f"compressed median at 1000 candidates <= {targets.max_ms_1000} ms":
            latency["compressed"]["1000"] <= targets.max_ms_1000,
    }
    return {
        "ranker_dir": str(ranker_dir), "chosen": compression["chosen"], "prune_fraction": compression["prune_fraction"],
        "auc": auc, "latency_ms": latency, "runs": runs,
        "build_latency_ms": metrics["latency_ms"],  # measured during the build, for comparison
        "flops_per_row": {"fp32": metrics["fp32"]["flops_per_row"], "compressed": compression["flops_per_row"],
                          **({"baseline": metrics["baseline"]["flops_per_row"]} if "baseline" in metrics else {})},
        "bytes": {"fp32": metrics["fp32"]["bytes"],
                  "compressed": (ranker_dir / RANKER_ONNX).stat().st_size},
        "checks": checks, "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
    }


def markdown(report: dict, command: str) -> str:
    a, lat = report["auc"], report["latency_ms"]
    rows = [("ground truth (true P(click))", a["ground_truth"], None, None, None)]
    if "baseline" in a:
        b = report["build_latency_ms"].get("baseline", {})
        rows.append(("baseline MLP (first ranker; latency from the build run)", a["baseline"], b.get("100"),
                     b.get("1000"), report["flops_per_row"].get("baseline")))
    rows.append(("DCN-v2 FP32", a["fp32"], lat["fp32"]["100"], lat["fp32"]["1000"], report["flops_per_row"]["fp32"]))
    rows.append((f"DCN-v2 compressed, served ({report['chosen']}, prune {report['prune_fraction']})", a["compressed"],
                 lat["compressed"]["100"], lat["compressed"]["1000"], report["flops_per_row"]["compressed"]))
    if "qdq_in_ort" in a:
        rows.append(("DCN-v2 Q/DQ for TensorRT (scored by ORT here)", a["qdq_in_ort"], None, None, None))

    def cell(v, fmt):
        return "–" if v is None else format(v, fmt)

    lines = ["| model | test AUC | median ms, 100 cand. | median ms, 1000 cand. | FLOPs/row |",
             "|---|---|---|---|---|"]
    lines += [f"| {name} | {auc:.4f} | {cell(m100, '.3f')} | {cell(m1000, '.3f')} | {cell(fl, ',')} |"
              for name, auc, m100, m1000, fl in rows]
    lines += ["", *(f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in report["checks"].items()), "",
              f"Latency: ORT CPU, 2 intra-op threads, {report['runs']} interleaved calls per cell, this machine "
              f"({report['machine']['cpu']}); AUC: test split, position-aware. Command: `{command}`."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m conversion.ranker_report", description=__doc__.splitlines()[0])
    p.add_argument("--profile", choices=("default", "ci"), default="default")
    p.add_argument("--encoder", choices=("int8", "fp32"), default="int8")
    p.add_argument("--runs", type=int, default=1000, help="timed calls per model and candidate count")
    p.add_argument("--markdown", type=Path, help="also write the table here")
    p.add_argument("--compare-baseline", action="store_true",
                   help="report the stage built by `python -m conversion.train_ranker --compare-baseline` "
                        "(adds the first MLP ranker's AUC and latency)")
    args = p.parse_args(argv)
    if args.runs < 10:
        print(f"error: --runs must be >= 10, got {args.runs}", file=sys.stderr)
        return 2
    from conversion.build_models import profile_settings

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = profile_settings(args.profile, encoder=args.encoder)
    if args.compare_baseline:
        settings = dataclasses.replace(settings, compare_baseline=True)
    ranker_dir = stage_dir(STAGE, settings)
    if not is_complete(ranker_dir):
        build = "python -m conversion.train_ranker --compare-baseline" if args.compare_baseline else "make models"
        print(f"error: ranker for profile {args.profile!r} is not built: {ranker_dir} (run `{build}`)",
              file=sys.stderr)
        return 2
    from conversion.catalog_artifact import STAGE as CATALOG_STAGE

    report = build_report(ranker_dir, stage_dir(CATALOG_STAGE, settings.artifact), runs=args.runs)
    command = "make bench-ranker" + (f" PROFILE={args.profile}" if args.profile != "default" else "") + \
        (" RANKER_BASELINE=1" if args.compare_baseline else "")
    text = markdown(report, command)
    out = build_root() / "reports" / f"ranker-{ranker_dir.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    if args.markdown:
        tmp = args.markdown.with_name(args.markdown.name + ".tmp")
        tmp.write_text(f"# Ranker benchmark\n\n{text}")
        tmp.replace(args.markdown)
    print(text)
    return 0 if all(report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
