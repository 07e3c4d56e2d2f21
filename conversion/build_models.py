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

from conversion.catalog_artifact import CatalogArtifactSettings, build_catalog_artifact
from conversion.catalog_generator import CatalogSettings, build_catalog
from conversion.export_encoder import (REPORT_JSON, ExportFidelityError,
                                       UnsupportedModelError, export_encoder, read_embedding_dim)
from conversion.stages import is_complete, stage_dir
from conversion.train_ranker import METRICS_JSON, RankerSettings, build_ranker

log = logging.getLogger(__name__)

# "ci" is small but real: the same stages on a smaller catalog, so the suite fits CI's budget.
PROFILES: dict[str, RankerSettings] = {
    "default": RankerSettings(),
    "ci": RankerSettings(
        artifact=CatalogArtifactSettings(catalog=CatalogSettings(n_items=3000, n_users=1500, n_sessions=12000)),
        epochs=5),
}


def profile_settings(profile: str, model: str = "") -> RankerSettings:
    settings = PROFILES[profile]
    if model:
        encoder = dataclasses.replace(settings.artifact.encoder, model=str(Path(model).resolve()))
        settings = dataclasses.replace(settings, artifact=dataclasses.replace(settings.artifact, encoder=encoder))
    return settings


def build(settings: RankerSettings) -> dict[str, Path]:
    encoder_dir = export_encoder(settings.artifact.encoder)
    catalog_dir = build_catalog(settings.artifact.catalog)
    artifact_dir = build_catalog_artifact(settings.artifact)
    ranker_dir = build_ranker(settings)
    return {"encoder": encoder_dir, "catalog": catalog_dir, "catalog_artifact": artifact_dir, "ranker": ranker_dir}


def built_artifacts(profile: str, model: str = ""):
    """The stage folders of a profile as render needs them, failing if any is not built."""
    from model_repository.render import Artifacts

    settings = profile_settings(profile, model)
    folders = {
        "encoder": stage_dir("01-encoder-fp32", settings.artifact.encoder),
        "catalog_artifact": stage_dir("03-catalog-artifact", settings.artifact),
        "ranker": stage_dir("04-ranker-fp32", settings),
    }
    for name, folder in folders.items():
        if not is_complete(folder):
            raise FileNotFoundError(f"{name} for profile {profile!r} is not built: {folder} (run `make models`)")
    artifacts = Artifacts(encoder_dir=folders["encoder"], catalog_dir=folders["catalog_artifact"],
                          ranker_dir=folders["ranker"])
    return artifacts, read_embedding_dim(folders["encoder"])


def report(folders: dict[str, Path]) -> dict:
    export = json.loads((folders["encoder"] / REPORT_JSON).read_text())
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
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        folders = build(profile_settings(args.profile, args.model))
    except (ExportFidelityError, UnsupportedModelError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report(folders), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
