"""Run every conversion stage in order and print the report (`make models`).

Stages are cached on a hash of their settings, so a second run with the same settings does
nothing and a changed setting rebuilds only what depends on it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from conversion import catalog_artifact, compress_encoder, export_encoder as export_stage, train_ranker
from conversion.catalog_artifact import CatalogArtifactSettings, build_catalog_artifact, served_encoder
from conversion.catalog_generator import CatalogSettings, build_catalog
from conversion.export_encoder import (REPORT_JSON, ExportFidelityError, EncoderExportSettings,
                                       UnsupportedModelError, export_encoder, read_embedding_dim)
from conversion.prune_encoder import PruneSettings
from conversion.stages import build_root, is_complete, stage_dir
from conversion.train_ranker import METRICS_JSON, RankerSettings, build_ranker
from model_repository.render import Artifacts, render_repository, write_artifacts_manifest
from model_repository.spec import build_spec

log = logging.getLogger(__name__)

_CI_CATALOG = CatalogSettings(n_items=3000, n_users=1500, n_sessions=12000)
# "ci" is small but real: the same stages on a smaller catalog and a short distillation, so the
# suite fits CI's budget.
PROFILES: dict[str, RankerSettings] = {
    "default": RankerSettings(),
    "ci": RankerSettings(
        artifact=CatalogArtifactSettings.compose(catalog=_CI_CATALOG,
                                                 prune=PruneSettings(distill_steps=80, importance_texts=256)),
        epochs=5),
}
ENCODERS = ("int8", "fp32")  # served encoder: pruned + ORT INT8 (default) or the FP32 export
# served ranker: what the ranker stage chose under its AUC and top-10 gates (default), or its FP32 export
RANKERS = ("compressed", "fp32")


def profile_settings(profile: str, model: str = "", encoder: str = "int8") -> RankerSettings:
    if encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {ENCODERS}, got {encoder!r}")
    settings = PROFILES[profile]
    art = settings.artifact
    prune = (art.compression.prune if art.compression is not None else PruneSettings()) if encoder == "int8" else None
    teacher = dataclasses.replace(art.encoder, model=str(Path(model).resolve())) if model else art.encoder
    artifact = CatalogArtifactSettings.compose(teacher, art.catalog, prune)
    return dataclasses.replace(settings, artifact=artifact)


def build(settings: RankerSettings) -> dict[str, Path]:
    folders = {"encoder_fp32": export_encoder(settings.artifact.encoder),
               "catalog": build_catalog(settings.artifact.catalog),
               "encoder": served_encoder(settings.artifact)}
    folders["catalog_artifact"] = build_catalog_artifact(settings.artifact)
    folders["ranker"] = build_ranker(settings)
    return folders


def built_artifacts(profile: str, model: str = "", encoder: str = "int8", ranker: str = "compressed"):
    """The stage folders of a profile as render needs them, failing if any is not built."""
    if ranker not in RANKERS:
        raise ValueError(f"ranker must be one of {RANKERS}, got {ranker!r}")
    settings = profile_settings(profile, model, encoder)
    art = settings.artifact
    folders = {
        "encoder": (stage_dir(export_stage.STAGE, art.encoder) if art.compression is None
                    else stage_dir(compress_encoder.STAGE, art.compression)),
        "catalog_artifact": stage_dir(catalog_artifact.STAGE, art),
        "ranker": stage_dir(train_ranker.STAGE, settings),
    }
    for name, folder in folders.items():
        if not is_complete(folder):
            raise FileNotFoundError(f"{name} for profile {profile!r} is not built: {folder} (run `make models`)")
    artifacts = Artifacts(encoder_dir=folders["encoder"], catalog_dir=folders["catalog_artifact"],
                          ranker_dir=folders["ranker"])
    if ranker == "fp32":
        artifacts = dataclasses.replace(artifacts, ranker_source=train_ranker.RANKER_FP32_ONNX)
    return artifacts, read_embedding_dim(folders["encoder"])


def fp32_artifacts(profile: str, model: str = ""):
    """The uncompressed counterpart of the served bundle, for side-by-side comparisons: queries
    through the FP32 encoder export and the ranker stage's FP32 export, over the same catalog
    artifact (item embeddings are computed offline once; only the per-request models differ)."""
    served, _ = built_artifacts(profile, model, "int8", ranker="fp32")
    encoder = stage_dir(export_stage.STAGE, profile_settings(profile, model).artifact.encoder)
    for path, built in ((encoder, is_complete(encoder)), (served.ranker_file, served.ranker_file.is_file())):
        if not built:
            raise FileNotFoundError(f"FP32 model for profile {profile!r} is not built: {path} (run `make models`)")
    return dataclasses.replace(served, encoder_dir=encoder), read_embedding_dim(encoder)


def encoder_report(profile: str, markdown: Path | None = None, model: str = "", rounds: int = 3,
                   force: bool = False, eval_texts: Path | None = None, unpruned: bool = False) -> dict:
    """Measure FP32 vs compressed encoders (cached beside the build unless `force`); `unpruned` adds
    the unpruned export quantized dynamic and static (comparison rows, conversion.encoder_report).

    eval_texts: a user's file for the fidelity gate (conversion/broad_text.py's format); default
    the bundled broad set. A cached report measured on other texts is measured again.
    """
    from conversion.broad_text import load_eval_texts
    from conversion.encoder_report import BROAD, build_report, write_report

    settings = profile_settings(profile, model)
    compression = settings.artifact.compression
    texts = load_eval_texts(eval_texts)  # first, so a bad file fails before any build work
    fp32, compressed = export_encoder(settings.artifact.encoder), served_encoder(settings.artifact)
    json_path = (build_root() / "reports"
                 / f"encoder-compression-{compressed.name}-{texts.sha256[:10]}{'-unpruned' if unpruned else ''}.json")
    cached = json.loads(json_path.read_text()) if json_path.is_file() and not force else None
    if cached is not None and cached.get("eval", {}).get(BROAD, {}).get("sha256") == texts.sha256:
        report = cached
    else:
        report = build_report(fp32, compressed, compression.prune.catalog, rounds=rounds, eval_texts=texts,
                              unpruned_dir=build_root() / "reports" / f"unpruned-int8-{compressed.name}" if unpruned
                              else None)
    command = f"make models PROFILE={profile}" if profile != "default" else "make models"
    if unpruned:
        command = f"python -m conversion.encoder_report --profile {profile} --unpruned-int8"
    if eval_texts is not None:
        command += f" (--eval-texts {eval_texts})"
    write_report(report, json_path, markdown, command)
    return report


def report(folders: dict[str, Path]) -> dict:
    export = json.loads((folders["encoder_fp32"] / REPORT_JSON).read_text())
    metrics = json.loads((folders["ranker"] / METRICS_JSON).read_text())
    return {
        "encoder_export_min_cosine": export["fidelity"]["min_cosine"],
        "embedding_dim": export["embedding_dim"],
        "ranker_test_auc": metrics["test"]["auc"],
        "ground_truth_test_auc": metrics["test"]["ground_truth_auc"],
        "ranker_test_logloss": metrics["test"]["logloss"],
        "ranker_onnx_max_abs_diff": metrics["export"]["max_abs_diff"],
        "folders": {k: str(v) for k, v in folders.items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m conversion.build_models", description=__doc__.splitlines()[0])
    p.add_argument("--profile", choices=sorted(PROFILES), default="default")
    p.add_argument("--model", default="", help="HF BERT-family folder (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--encoder", choices=ENCODERS, default="int8",
                   help="served encoder: pruned + INT8 (default) or the FP32 export")
    p.add_argument("--ranker", choices=RANKERS, default="compressed",
                   help="served ranker: the one the ranker stage's gates chose (default) or its FP32 export")
    p.add_argument("--report-markdown", type=Path,
                   help="measure the encoder compression report and write its markdown table here")
    p.add_argument("--eval-texts", type=Path,
                   help="with --report-markdown: judge encoder fidelity on this file (one text per line, each "
                        "starting 'query<TAB>' or 'title<TAB>') instead of the bundled broad set")
    p.add_argument("--manifest", type=Path,
                   help="write the served artifacts' folders here, for `python -m model_repository.render --artifacts`")
    p.add_argument("--repository", type=Path, help="also render the CPU model repository into this folder")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = profile_settings(args.profile, args.model, args.encoder)
        if args.eval_texts:  # a bad file fails in one line before minutes of building, not after
            from conversion.broad_text import load_eval_texts

            load_eval_texts(args.eval_texts)
        folders = build(settings)
        out = report(folders)
        if args.report_markdown and settings.artifact.compression is not None:
            out["encoder_compression"] = encoder_report(args.profile, args.report_markdown, args.model,
                                                        eval_texts=args.eval_texts)["targets"]
        if args.manifest or args.repository:
            artifacts, dim = built_artifacts(args.profile, args.model, args.encoder, args.ranker)
            if args.manifest:
                out["manifest"] = str(write_artifacts_manifest(args.manifest, artifacts, dim))
            if args.repository:
                out["repository"] = str(render_repository(build_spec(dim), artifacts, args.repository))
    except (ExportFidelityError, UnsupportedModelError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
