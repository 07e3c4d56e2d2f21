"""`make bench-ranker` (conversion.ranker_report) on the ci build: feeds shaped as serving sends
them, checks that follow from the numbers they print, the markdown table, CLI errors."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conversion.ranker_report import RankerTargets, build_report, candidate_feeds, main, markdown
from conversion.stages import REPO_ROOT
from conversion.train_ranker import METRICS_JSON
from model_repository import spec
from model_repository.runtime import CatalogTables

pytestmark = pytest.mark.unit


def test_candidate_feeds_are_one_query_and_user_over_real_catalog_rows(ci_models):
    feeds = candidate_feeds(ci_models["catalog_artifact"], 100)
    assert list(feeds) == [spec.query_embedding(0).name, spec.item_embedding(0).name, spec.ITEM_FEATURES.name,
                           spec.USER_FEATURES.name]
    assert all(len(v) == 100 for v in feeds.values())
    assert (feeds[spec.query_embedding(0).name] == feeds[spec.query_embedding(0).name][0]).all()
    assert (feeds[spec.USER_FEATURES.name] == feeds[spec.USER_FEATURES.name][0]).all()
    tables = CatalogTables.load(ci_models["catalog_artifact"], mmap=False)
    # every item row is a real catalog row (embedding and features of the same row)
    for emb, feat in zip(feeds[spec.item_embedding(0).name][:20], feeds[spec.ITEM_FEATURES.name][:20]):
        rows = np.flatnonzero((tables.item_embeddings == emb).all(axis=1))
        assert len(rows) >= 1 and rows[0] >= 1 and (tables.item_features[rows[0]] == feat).all()


def test_report_checks_follow_from_its_numbers(ci_models):
    targets = RankerTargets()
    report = build_report(ci_models["ranker"], ci_models["catalog_artifact"], runs=20, targets=targets, progress=False)
    metrics = json.loads((ci_models["ranker"] / METRICS_JSON).read_text())
    assert report["auc"]["fp32"] == metrics["auc"]["fp32"] and report["auc"]["compressed"] == metrics["auc"]["compressed"]
    for model in ("fp32", "compressed"):
        assert set(report["latency_ms"][model]) == {"100", "1000"}
        assert all(v > 0 for v in report["latency_ms"][model].values())
    checks = list(report["checks"].values())
    assert checks[0] == (report["auc"]["compressed"] >= report["auc"]["fp32"] - targets.max_auc_drop)
    assert checks[1] == (report["auc"]["fp32"] >= report["auc"]["ground_truth"] - targets.max_gap_to_ground_truth)
    assert checks[2] == (report["latency_ms"]["compressed"]["1000"] <= targets.max_ms_1000)
    assert report["flops_per_row"]["compressed"] < report["flops_per_row"]["fp32"]
    text = markdown(report, "make bench-ranker PROFILE=ci")
    assert f"{report['auc']['compressed']:.4f}" in text and f"{report['auc']['ground_truth']:.4f}" in text
    assert text.count("PASS") + text.count("FAIL") == len(checks)


def test_cli_writes_markdown_and_exits_by_the_checks(ci_models, tmp_path):
    out = tmp_path / "bench.md"
    code = main(["--profile", "ci", "--runs", "10", "--markdown", str(out)])
    text = out.read_text()
    assert text.startswith("# Ranker benchmark") and "| DCN-v2 FP32 |" in text
    assert code == (1 if "FAIL" in text else 0)
    assert not list(tmp_path.glob("*.tmp"))


def test_cli_rejects_bad_runs_in_one_line():
    result = subprocess.run([sys.executable, "-m", "conversion.ranker_report", "--runs", "3"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--runs" in lines[0]
