"""The item-encoding benchmark's arithmetic: checks, projection and report (the Ray runs themselves are
exercised by tests/conversion/test_encode_items.py)."""
from __future__ import annotations

import pytest

from loadtests import bench_item_encoding as bench


def _runs(plain, one, two):
    run = {"wall_s": 10.0, "ray_start_s": 4.0, "first_batch_s": 6.0, "wall_items_per_s": 1.0}
    return ({**run, "steady_items_per_s": plain}, {**run, "steady_items_per_s": one, "actors": 1},
            {**run, "steady_items_per_s": two, "actors": 2})


@pytest.mark.unit
def test_checks_and_projection():
    ev = bench.evaluate(*_runs(1000, 950, 1800))
    assert ev["scaling_2_vs_1"] == pytest.approx(1800 / 950) and ev["ray_overhead"] == pytest.approx(0.05)
    assert all(ev["checks"].values())
    # 100M items / (8 actors x 900 items/s) in hours
    assert ev["projection_100M_hours"][8] == pytest.approx(1e8 / (8 * 900) / 3600)
    failing = bench.evaluate(*_runs(1000, 800, 1200))
    assert failing["checks"] == {f"scaling (c)/(b) >= {bench.MIN_SCALING}": False,
                                 f"Ray overhead 1-(b)/(a) <= {bench.MAX_RAY_OVERHEAD:.0%}": False}


@pytest.mark.unit
def test_markdown_reports_every_run_and_verdict():
    plain, one, two = _runs(1000, 950, 1500)
    report = {"settings": {"items": 100, "batch_size": 64}, "encoder": "enc", "cpus": 2, "plain": plain,
              "ray_1": one, "ray_2": two, "evaluation": bench.evaluate(plain, one, two)}
    text = bench.markdown(report, "python -m loadtests.bench_item_encoding --items 100")
    assert "(a) plain loop" in text and "(c) Ray, 2 actors" in text and "| 512 |" in text
    assert "PASS Ray overhead" in text and "FAIL scaling" in text


@pytest.mark.unit
def test_too_few_items_is_a_usage_error():
    with pytest.raises(SystemExit) as e:
        bench.main(["--items", "10"])
    assert e.value.code == 2


@pytest.mark.unit
def test_generated_titles_are_distinct_items():
    ids, titles = bench.generate_titles(500, seed=3)
    assert len(set(ids.tolist())) == 500 and len(titles) == 500 and all(titles)
