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

from conversion import catalog_artifact, export_encoder as export_stage, train_ranker
from conversion.broad_text import load_eval_texts
from conversion.catalog_artifact import CatalogArtifactSettings, build_catalog_artifact, served_encoder
from conversion.catalog_generator import CatalogSettings, build_catalog
from conversion.export_encoder import (REPORT_JSON, ExportFidelityError, EncoderExportSettings,
                                       UnsupportedModelError, export_encoder, read_embedding_dim)
from conversion.compress_encoder import build_compressed_encoder
from conversion.prune_encoder import PruneSettings
from conversion.served_encoder import EncoderGate, choice_dir, chosen_folder, read_choice
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
                                                 prune=PruneSettings(distill_steps=80, importance_texts=256,
                                                                     generated_texts=3000)),
        epochs=5),
}
# served encoder: "int8" = the fastest INT8 candidate that passes the broad gate (pruned first, then the
# unpruned SmoothQuant INT8; conversion.served_encoder), or the FP32 export
ENCODERS = ("int8", "fp32")
# served ranker: what the ranker stage chose under its AUC and top-10 gates (default), or its FP32 export
RANKERS = ("compressed", "fp32")


def profile_settings(profile: str, model: str = "", encoder: str = "int8", eval_texts: Path | None = None,
                     distill_texts: Path | None = None, gate: dict | None = None) -> RankerSettings:
    """The profile's settings. eval_texts: the file the encoder gate judges (default: the bundled broad
    set); distill_texts: a user's texts added to distillation; gate: overrides of EncoderGate's targets.
    Both files are read and checked here, so a bad one fails in one line before any build work."""
    from conversion.generated_text import load_text_file, texts_sha256

    if encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {ENCODERS}, got {encoder!r}")
    settings = PROFILES[profile]
    art = settings.artifact
    prune = (art.compression.prune if art.compression is not None else PruneSettings()) if encoder == "int8" else None
    gate_settings = None
    if prune is not None:
        gate_settings = EncoderGate.for_texts(eval_texts, **(gate or {}))
        if distill_texts is not None:
            extra = load_text_file(distill_texts)
            judged = load_eval_texts(eval_texts)
            shared = set(extra) & set(judged.queries + judged.titles)
            if shared:
                raise ValueError(f"{distill_texts}: {len(shared)} of its texts are in the evaluation set "
                                 f"({judged.source}), e.g. {sorted(shared)[0]!r}; the gate would flatter the student")
            prune = dataclasses.replace(prune, extra_texts=str(Path(distill_texts).resolve()),
                                        extra_texts_sha256=texts_sha256(extra))
    elif eval_texts is not None or distill_texts is not None:
        load_eval_texts(eval_texts)  # still checked: a bad file is an error whatever is served
        if distill_texts is not None:
            load_text_file(distill_texts)
    teacher = dataclasses.replace(art.encoder, model=str(Path(model).resolve())) if model else art.encoder
    artifact = CatalogArtifactSettings.compose(teacher, art.catalog, prune, gate=gate_settings,
                                               unpruned=art.unpruned if art.compression is not None else None)
    return dataclasses.replace(settings, artifact=artifact)


def served_encoder_dir(art: CatalogArtifactSettings) -> Path:
    """The served encoder folder as built (the gate's recorded choice), without building or measuring."""
    if art.compression is None:
        return stage_dir(export_stage.STAGE, art.encoder)
    choice = choice_dir(art.compression, art.unpruned, art.gate)
    if not is_complete(choice):
        raise FileNotFoundError(f"the encoder gate has not chosen a served encoder yet: {choice} (run `make models`)")
    return chosen_folder(choice)


def build(settings: RankerSettings) -> dict[str, Path]:
    folders = {"encoder_fp32": export_encoder(settings.artifact.encoder),
               "catalog": build_catalog(settings.artifact.catalog),
               "encoder": served_encoder(settings.artifact)}
    folders["catalog_artifact"] = build_catalog_artifact(settings.artifact)
    folders["ranker"] = build_ranker(settings)
    return folders


def built_artifacts(profile: str, model: str = "", encoder: str = "int8", ranker: str = "compressed",
                    eval_texts: Path | None = None, distill_texts: Path | None = None, gate: dict | None = None):
    """The stage folders of a profile as render needs them, failing if any is not built. The encoder is
    the one the gate chose (its choice.json), never re-measured."""
    if ranker not in RANKERS:
        raise ValueError(f"ranker must be one of {RANKERS}, got {ranker!r}")
    settings = profile_settings(profile, model, encoder, eval_texts, distill_texts, gate)
    art = settings.artifact
    folders = {
        "encoder": served_encoder_dir(art),
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
                   force: bool = False, eval_texts: Path | None = None, unpruned: bool = False,
                   distill_texts: Path | None = None, gate: dict | None = None) -> dict:
    """Measure FP32 vs compressed encoders (cached beside the build unless `force`); `unpruned` adds
    the unpruned export quantized dynamic and static (comparison rows, conversion.encoder_report).

    eval_texts: a user's file for the fidelity gate (conversion/broad_text.py's format); default
    the bundled broad set. A cached report measured on other texts is measured again.
    """
    from conversion.broad_text import load_eval_texts
    from conversion.encoder_report import BROAD, build_report, write_report

    texts = load_eval_texts(eval_texts)  # first, so a bad file fails before any build work
    settings = profile_settings(profile, model, eval_texts=eval_texts, distill_texts=distill_texts, gate=gate)
    art = settings.artifact
    compression = art.compression
    fp32, compressed = export_encoder(art.encoder), served_encoder(art)
    pruned = build_compressed_encoder(compression)  # the gate's first candidate, always built
    choice = read_choice(choice_dir(compression, art.unpruned, art.gate))
    json_path = (build_root() / "reports"
                 / f"encoder-compression-{compressed.name}-{texts.sha256[:10]}{'-unpruned' if unpruned else ''}.json")
    cached = json.loads(json_path.read_text()) if json_path.is_file() and not force else None
    if (cached is not None and cached.get("eval", {}).get(BROAD, {}).get("sha256") == texts.sha256
            and cached.get("selection") == choice):
        report = cached
    else:
        report = build_report(fp32, pruned, compression.prune.catalog, rounds=rounds, eval_texts=texts,
                              unpruned_dir=build_root() / "reports" / f"unpruned-int8-{compressed.name}" if unpruned
                              else None, served_dir=compressed, selection=choice)
    command = f"make models PROFILE={profile}" if profile != "default" else "make models"
    if unpruned:
        command = f"python -m conversion.encoder_report --profile {profile} --unpruned-int8"
    if eval_texts is not None:
        command += f" (--eval-texts {eval_texts})"
    if distill_texts is not None:
        command += f" (--distill-texts {distill_texts})"
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
                   help="the encoder gate (and the report) judge fidelity on this file (one text per line, each "
                        "starting 'query<TAB>' or 'title<TAB>') instead of the bundled broad set")
    p.add_argument("--distill-texts", type=Path,
                   help="add this file's texts (UTF-8, one per line) to the pruned encoder's distillation; the "
                        "FP32 teacher labels them. Must share no text with the evaluation set")
    p.add_argument("--gate-mean-cosine", type=float, default=EncoderGate.mean_cosine,
                   help="encoder gate: minimum mean cosine to the FP32 teacher on the broad set (default %(default)s)")
    p.add_argument("--gate-top10", type=float, default=EncoderGate.top10_overlap,
                   help="encoder gate: minimum top-10 neighbour overlap on the broad set (default %(default)s)")
    p.add_argument("--manifest", type=Path,
                   help="write the served artifacts' folders here, for `python -m model_repository.render --artifacts`")
    p.add_argument("--repository", type=Path, help="also render the CPU model repository into this folder")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        gate = {"mean_cosine": args.gate_mean_cosine, "top10_overlap": args.gate_top10}
        # Both files are read and checked here: a bad one fails in one line before minutes of building.
        settings = profile_settings(args.profile, args.model, args.encoder, args.eval_texts, args.distill_texts, gate)
        folders = build(settings)
        out = report(folders)
        if settings.artifact.compression is not None:
            choice = read_choice(choice_dir(settings.artifact.compression, settings.artifact.unpruned,
                                            settings.artifact.gate))
            out["encoder_gate"] = {"chosen": choice["chosen"], "folder": choice["folder"], "reason": choice["reason"],
                                   "tried": {t["candidate"]: {g: {k: round(v, 4) for k, v in t["fidelity"][g]["broad"].items()}
                                                              for g in ("int8", "qdq")} for t in choice["tried"]}}
        if args.report_markdown and settings.artifact.compression is not None:
            out["encoder_compression"] = encoder_report(args.profile, args.report_markdown, args.model,
                                                        eval_texts=args.eval_texts, distill_texts=args.distill_texts,
                                                        gate=gate)["targets"]
        if args.manifest or args.repository:
            artifacts, dim = built_artifacts(args.profile, args.model, args.encoder, args.ranker, args.eval_texts,
                                             args.distill_texts, gate)
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
