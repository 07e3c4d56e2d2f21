"""The catalog-scale benchmark (loadtests.catalog_scale) at CI size: a synthetic catalog is built,
served by a real tritonserver, measured, and the report holds numbers that make sense; the target
rules judge only the target size."""
from __future__ import annotations

import json

import pytest

from conversion.stages import build_root
from loadtests import catalog_scale as cs


def _result(items: int, startup: float = 3.0, lookup: float = 0.5, served: float = 0.6, pss: float = 1.0,
            artifact: float = 7.2) -> dict:
    return {"items": items, "startup_s": startup, "lookup_p50_ms": lookup, "served_lookup_ms": served,
            "pss_gib": pss, "artifact_gib": artifact}


@pytest.mark.unit
def test_targets_are_judged_at_the_target_size_only():
    targets = cs.ScaleTargets()
    ok = cs.verdicts([_result(100_000, startup=99), _result(10_000_000)], targets, 23.5)
    assert all(passed for _, passed, _ in ok)
    bad = cs.verdicts([_result(10_000_000, startup=16.0, lookup=1.2, served=0.5, pss=17.0)], targets, 23.5)
    assert [passed for _, passed, _ in bad] == [False, False, True, False]
    small = cs.verdicts([_result(1_000_000, startup=99, lookup=9)], targets, 23.5)
    assert all(passed for _, passed, _ in small) and all("informational" in name for name, _, _ in small)


@pytest.mark.unit
def test_cli_refuses_bad_sizes(capsys):
    assert cs.main(["--sizes", "10,-5"]) == 2
    assert "--sizes" in capsys.readouterr().err


@pytest.mark.server
def test_ci_sized_run_serves_a_synthetic_catalog_and_reports(ci_models, tmp_path):
    out_json, out_md = tmp_path / "scale.json", tmp_path / "scale.md"
    code = cs.main(["--profile", "ci", "--sizes", "20000", "--served-calls", "5",
                    "--json", str(out_json), "--markdown", str(out_md)])
    assert code == 0  # below the target size every rule is informational
    report = json.loads(out_json.read_text())
    (r,) = report["results"]
    assert r["items"] == 20_000 and r["embedding_dtype"] == "float16"
    # 20001 x 384 float16 embeddings plus ids, features and the index
    assert 20_001 * 384 * 2 / 2**30 < r["artifact_gib"] < 0.1
    assert 0 < r["startup_s"] < 180 and 0 < r["pss_gib"] <= r["rss_gib"]
    assert 0 < r["index_p50_ms"] <= r["lookup_p50_ms"] <= r["lookup_p99_ms"]
    assert r["served_lookup_ms"] > 0 and r["search_rank_p50_ms"] > r["served_lookup_ms"]
    effect = report["fp16_effect"]
    # FP16 keeps ~3 decimal digits of a unit vector: the ranking must not notice
    assert abs(effect["auc_float32"] - effect["auc_float16"]) < 1e-3
    assert effect["top10_agreement"] >= 0.95 and effect["max_score_diff"] < 1e-2
    assert "| 20,000 | float16 |" in out_md.read_text()
    # the artifact and its repository are deleted afterwards (at 10M items they are GBs)
    assert not list((build_root() / "catalog_scale").glob("*-20000*"))
