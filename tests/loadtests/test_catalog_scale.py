"""The catalog-scale benchmark (loadtests.catalog_scale) at CI size: a synthetic catalog is built,
served by a real tritonserver, measured, and the report holds numbers that make sense; the target
rules judge only the target size."""
from __future__ import annotations

import json

import pytest

from conversion.stages import build_root
from loadtests import catalog_scale as cs


def _result(items: int, startup: float = 3.0, lookup: float = 0.5, anon: float = 1.0, artifact: float = 3.9) -> dict:
    return {"items": items, "startup_s": startup, "lookup_p50_ms": lookup, "anon_gib": anon, "artifact_gib": artifact}


@pytest.mark.unit
def test_targets_are_judged_at_the_target_size_only():
    targets = cs.ScaleTargets()
    ok = cs.verdicts([_result(100_000, startup=99), _result(10_000_000)], targets, 23.5)
    assert all(passed for _, passed, _ in ok)
    bad = cs.verdicts([_result(10_000_000, startup=16.0, lookup=1.2, anon=17.0, artifact=7.7)], targets, 23.5)
    assert [passed for _, passed, _ in bad] == [False, False, False]
    assert [passed for _, passed, _ in cs.verdicts([_result(10_000_000, anon=2.0, artifact=23.0)], targets, 23.5)] \
        == [True, True, False]
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
    assert r["items"] == 20_000 and r["embedding_dtype"] == "int8"
    # 20001 x 384 int8 embeddings plus scales, ids, features and the index
    assert 20_001 * 384 / 2**30 < r["artifact_gib"] < 0.05
    assert 0 < r["startup_s"] < 180 and 0 < r["anon_gib"] and 0 < r["pss_gib"] <= r["rss_gib"]
    assert 0 < r["index_p50_ms"] <= r["lookup_p50_ms"] <= r["lookup_p99_ms"]
    assert r["served_lookup_ms"] > 0 and r["search_rank_p50_ms"] > r["served_lookup_ms"]
    by = report["storage_effect"]["by_dtype"]
    assert by["float32"]["top10_agreement"] == 1.0 and by["float32"]["max_score_diff"] == 0.0
    # FP16 keeps ~3 significant digits of a unit vector, per-row INT8 ~2.5: the ranking must not notice
    for dtype in ("float16", "int8"):
        assert abs(by[dtype]["auc"] - by["float32"]["auc"]) < 1e-3
        assert by[dtype]["top10_agreement"] >= 0.95 and 0 < by[dtype]["max_score_diff"] < 1e-2
    assert by["int8"]["bytes_per_item"] == 384 + 4 and by["float16"]["bytes_per_item"] == 768
    assert "| 20,000 | int8 |" in out_md.read_text()
    # the artifact and its repository are deleted afterwards (at 10M items they are GBs)
    assert not list((build_root() / "catalog_scale").glob("*-20000*"))
