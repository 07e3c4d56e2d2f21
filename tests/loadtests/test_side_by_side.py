"""A CI-sized run of the side-by-side benchmark (loadtests.side_by_side): all three services start,
answer the same contract for the same candidate sets, and the report and its plot are written."""
from __future__ import annotations

import pytest

from loadtests import side_by_side as sbs


@pytest.mark.unit
def test_agreement_is_top10_overlap_with_the_reference():
    ref = sbs.ServiceResult(sbs.REFERENCE, top10=[list(range(10)), list(range(10))])
    other = sbs.ServiceResult(sbs.TRITON_COMPRESSED, top10=[list(range(10)), list(range(5, 15))])
    assert sbs.agreement({sbs.REFERENCE: ref, sbs.TRITON_COMPRESSED: other}) == {
        sbs.REFERENCE: 1.0, sbs.TRITON_COMPRESSED: 0.75}


@pytest.mark.unit
def test_throughput_counts_only_levels_within_the_budget_and_the_error_budget():
    r = sbs.ServiceResult("x", levels={100: [sbs.Level(1, 100, 0, 50.0, 10, 12, 20),
                                              sbs.Level(2, 300, 3, 150.0, 20, 30, 45),  # 1% refused: counts
                                              sbs.Level(8, 400, 0, 200.0, 30, 60, 80),  # p99 over budget
                                              sbs.Level(16, 400, 5, 210.0, 20, 30, 40)]})  # 1.25% refused
    assert r.best_rps(100, 50.0) == 150.0
    assert r.best_rps(100, 10.0) == 0.0


@pytest.mark.unit
def test_step_costs_are_per_request_deltas_and_skip_ensembles():
    before = {"ranker": {"requests": 10, "queue_ns": 1_000_000, "compute_ns": 5_000_000, "executions": 10, "rows": 10},
              "search_rank": {"requests": 10, "queue_ns": 0, "compute_ns": 9_000_000, "executions": 10, "rows": 10}}
    after = {"ranker": {"requests": 30, "queue_ns": 5_000_000, "compute_ns": 45_000_000, "executions": 15, "rows": 30},
             "search_rank": {"requests": 30, "queue_ns": 0, "compute_ns": 99_000_000, "executions": 30, "rows": 30},
             "query_encoder": {"requests": 4, "queue_ns": 400_000, "compute_ns": 8_000_000, "executions": 1, "rows": 4}}
    costs = sbs.step_costs(before, after)
    assert set(costs) == {"ranker", "query_encoder"}
    assert costs["ranker"] == {"requests": 20, "queue_ms": 0.2, "compute_ms": 2.0, "avg_batch": 4.0,
                               "from_cache": 0.0}
    assert costs["query_encoder"]["avg_batch"] == 4.0 and costs["query_encoder"]["compute_ms"] == 2.0


@pytest.mark.unit
def test_refusals_at_ordinary_concurrency_fail_the_bench():
    def result(name, errors_at_4):
        levels = [sbs.Level(c, 100, errors_at_4 if c == 4 else 0, 50.0 * c, 5, 6, 8) for c in (1, 4, 8)]
        return sbs.ServiceResult(name, levels={100: levels}, top10=[list(range(10))])
    s = sbs.BenchSettings(candidates=(100,), concurrency=(1, 4, 8))
    for errors, ok in ((0, True), (1, False)):
        results = {sbs.NAIVE: result(sbs.NAIVE, 0), sbs.TRITON_FP32: result(sbs.TRITON_FP32, 0),
                   sbs.TRITON_COMPRESSED: result(sbs.TRITON_COMPRESSED, errors)}
        verdicts = sbs.checks(results, sbs.agreement(results), s)
        assert verdicts["compressed refuses nothing at concurrency 4 and 8, 100 cand."][1] is ok


def _levels(*rps_p99_errors):
    return [sbs.Level(c, 1000, errors, rps, 5, 6, p99) for c, (rps, p99, errors) in zip((1, 2, 4, 8), rps_p99_errors)]


@pytest.mark.unit
def test_gated_speedup_is_the_median_of_the_sweep_and_the_paired_rounds():
    results = {sbs.NAIVE: sbs.ServiceResult(sbs.NAIVE, levels={100: _levels((100.0, 40, 0), (90.0, 80, 0))}),
               sbs.TRITON_COMPRESSED: sbs.ServiceResult(sbs.TRITON_COMPRESSED, levels={100: _levels(
                   (200.0, 10, 0), (400.0, 20, 0), (600.0, 45, 0), (700.0, 90, 0))})}
    # the sweep: 600/s within 50 ms against the naive service's 100/s within it
    assert sbs.speedup_vs_naive(results, [], 100, 50.0) == (6.0, [6.0])
    naive_c1 = lambda rps: sbs.Level(1, 1000, 0, rps, 5, 6, 40)  # noqa: E731
    rounds = [sbs.PairedRound(100, naive_c1(150.0), sbs.Level(4, 1000, 0, 600.0, 5, 6, 45), 3.0),  # 4x
              sbs.PairedRound(100, naive_c1(120.0), sbs.Level(4, 1000, 0, 600.0, 5, 6, 55), 3.0),  # over budget: 0x
              sbs.PairedRound(100, naive_c1(100.0), sbs.Level(4, 1000, 20, 550.0, 5, 6, 45), 3.0),  # 2% refused: 0x
              sbs.PairedRound(1000, naive_c1(10.0), sbs.Level(4, 1000, 0, 600.0, 5, 6, 45), 3.0)]  # other size
    median, ratios = sbs.speedup_vs_naive(results, rounds, 100, 50.0)
    assert ratios == [6.0, 4.0, 0.0, 0.0] and median == 2.0
    verdict = sbs.checks({**results, sbs.TRITON_FP32: results[sbs.NAIVE]}, {sbs.TRITON_COMPRESSED: 1.0},
                         sbs.BenchSettings(candidates=(100,), concurrency=(1, 2, 4, 8)), rounds)
    assert verdict["compressed >= 5x naive throughput at p99 <= 50 ms, 100 cand."] == (
        "2.0x (median of 6.0, 4.0, 0.0, 0.0)", False)


@pytest.mark.unit
def test_a_round_counts_the_faster_bundle_level_within_the_budget():
    naive = sbs.Level(1, 1000, 0, 100.0, 5, 6, 40)
    edge, lower = sbs.Level(8, 1000, 0, 700.0, 5, 6, 53), sbs.Level(4, 1000, 0, 500.0, 5, 6, 30)
    assert sbs.PairedRound(100, naive, edge, 3.0, lower).ratio(50.0) == 5.0  # the edge level broke it
    assert sbs.PairedRound(100, naive, sbs.Level(8, 1000, 0, 700.0, 5, 6, 49), 3.0, lower).ratio(50.0) == 7.0
    over = sbs.Level(4, 1000, 0, 500.0, 5, 6, 51)
    assert sbs.PairedRound(100, naive, edge, 3.0, over).ratio(50.0) == 0.0  # neither met it
    refusing = sbs.Level(4, 1000, 20, 500.0, 5, 6, 30)
    assert sbs.PairedRound(100, naive, edge, 3.0, refusing).ratio(50.0) == 0.0  # 2% refused


@pytest.mark.unit
def test_the_fallback_is_the_fastest_lower_level_within_the_budget():
    bundle = sbs.ServiceResult(sbs.TRITON_COMPRESSED, levels={100: _levels(
        (200.0, 10, 0), (400.0, 20, 0), (600.0, 45, 0), (700.0, 90, 0))})
    best = bundle.best_level(100, 50.0)
    assert best.concurrency == 4
    assert bundle.fallback_level(100, 50.0, best).concurrency == 2
    assert bundle.fallback_level(100, 50.0, bundle.at(100, 1)) is None


@pytest.mark.unit
def test_a_baseline_that_never_met_the_budget_is_held_at_its_peak():
    slow = sbs.ServiceResult(sbs.NAIVE, levels={100: _levels((40.0, 60, 0), (45.0, 120, 0), (42.0, 250, 0))})
    assert slow.best_level(100, 50.0) is None
    assert slow.baseline_level(100, 50.0).rps == 45.0


@pytest.mark.unit
def test_perf_analyzer_input_carries_each_request_as_sent():
    """perf_analyzer must send what the closed loop sends: its input rows are the requests
    themselves, in order, top_k included only where the request sets it."""
    import numpy as np

    from loadtests import traffic
    from loadtests.latency import perf_input_data
    from model_repository import spec

    reqs = [traffic.RankRequest("search_rank_100", "a much longer query than four words", 7, np.array([5, 3, 9]), 10),
            traffic.RankRequest("search_rank_100", "shoes", 0, np.array([11]), None)]
    rows = perf_input_data(reqs)["data"]
    assert rows[0] == {spec.QUERY.name: ["a much longer query than four words"], spec.USER_ID.name: [7],
                       spec.CANDIDATE_IDS.name: {"content": [5, 3, 9], "shape": [3]}, spec.TOP_K.name: [10]}
    assert spec.TOP_K.name not in rows[1] and rows[1][spec.CANDIDATE_IDS.name]["shape"] == [1]


@pytest.mark.unit
def test_a_stopped_perf_analyzer_is_reported_not_dropped():
    s = sbs.BenchSettings()
    results = {sbs.NAIVE: sbs.ServiceResult(sbs.NAIVE, perf={"infer_per_s": 50.0, "p50_ms": 20.0, "p99_ms": 90.0}),
               sbs.TRITON_COMPRESSED: sbs.ServiceResult(sbs.TRITON_COMPRESSED,
                                                        perf_error="perf_analyzer failed (99): Request timeout expired")}
    text = "\n".join(sbs.perf_section(results, s))
    assert "| naive PyTorch FP32 | 50.0 | 20.0 | 90.0 |" in text
    assert "stopped: perf_analyzer failed (99): Request timeout expired" in text
    assert "ratio" not in text  # no ratio from one side only


@pytest.mark.unit
def test_refusals_say_how_long_the_slowest_took():
    assert sbs.refusals(sbs.Level(8, 100, 0, 50.0, 5, 6, 8)) == ""
    stalled = sbs.Level(8, 100, 3, 50.0, 5, 6, 8, refused_ms=(501.4, 500.9, 500.2))
    assert sbs.refusals(stalled) == ", 3 err (slowest answered after 501, 501, 500 ms)"
    assert sbs.refusals(sbs.Level(8, 100, 2, 50.0, 5, 6, 8)) == ", 2 err"


@pytest.mark.unit
def test_concurrency_one_latency_is_split_by_query_length():
    import numpy as np
    from loadtests.grpc_load import Call, serialize
    from loadtests.traffic import RankRequest

    texts = ["red hat"] * 98 + [" ".join(["word"] * 17), " ".join(["word"] * 16)]
    requests = [serialize(RankRequest("x", t, 1, np.array([1, 2]), 1)) for t in texts]
    calls = [Call(0.0, 5.0, sbs.OK, i) for i in range(98)] + [Call(0.0, 30.0, sbs.OK, 98), Call(0.0, 7.0, sbs.OK, 99)]
    calls.append(Call(0.0, 99.0, "UNAVAILABLE", 98))  # refused: in no latency
    split = sbs.latency_by_query(calls, requests, 16)
    # 99 short calls, sorted: 98 x 5 ms then 7 ms; the p99 sits at position 0.99 * 98 = 97.02
    assert split == {"long": (1, 30.0, 30.0), "short": (99, 5.0, pytest.approx(5.0 + 0.02 * 2.0))}
    level = sbs.Level(1, 101, 1, 100.0, 5.0, 5.0, 29.0, (), split)
    assert sbs.query_split(level, 16) == " (p99 of queries over 16 words (1% of calls): 30.0 ms; the rest (99% of calls): 5.0 ms)"
    assert sbs.query_split(sbs.Level(1, 1, 0, 1.0, 5.0, 5.0, 5.0), 16) == ""


@pytest.mark.unit
def test_cli_refuses_bad_settings(capsys):
    with pytest.raises(SystemExit) as e:
        sbs.main(["--candidates", "0"])
    assert e.value.code == 2 and "--candidates must be in 1..1000" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        sbs.main(["--paired-rounds", "-1"])
    assert e.value.code == 2 and "--paired-rounds must be 0 or more" in capsys.readouterr().err


# Triton FP32 runs the same FP32 models as the naive service through ONNX instead of PyTorch: only
# float reassociation separates them (measured 1.0), so anything under 0.9 is a wiring fault. The
# compressed service measured 0.87 here (ci profile: pruned INT8 encoder distilled for 80 steps, the
# ranker that passed the top-10 gate; 2026-12-02). A request's overlap varies by about 0.15, so the
# mean of 20 has a standard error near 0.035: 0.75 is 3.5 of them below the measurement and catches
# a compression that really moves the ranking (the ranker before its top-10 gate read 0.77 on the
# default profile). The 0.9 release target is `make bench`'s PASS line, not this floor.
COMPRESSED_AGREEMENT_FLOOR = 0.75


@pytest.mark.server
def test_ci_sized_run_writes_report_and_plot(ci_models, tmp_path):
    # A budget every level meets, so that the paired round always runs (it follows the levels behind the
    # headline, and a bundle that met the budget nowhere gets none).
    s = sbs.BenchSettings(profile="ci", candidates=(100,), concurrency=(1, 2), seconds=1.5, agreement_queries=20,
                          p99_budget_ms=5000.0, paired_rounds=1)
    md, png = tmp_path / "BENCHMARKS.md", tmp_path / "benchmarks.png"
    results, rounds, verdicts, _ = sbs.run(s, md, png, "pytest")
    assert set(results) == set(sbs.SERVICES)
    for r in results.values():
        # measure_service already refuses a broken contract; here: every level served. Refusals
        # (Triton's queue timeout) stay rare, but a 1.5 s level is ~50 calls and a loaded 2-core
        # runner refuses a couple: 5%, not the benchmark's 1% budget.
        assert [lv.concurrency for lv in r.levels[100]] == [1, 2]
        assert all(lv.errors <= 0.05 * lv.calls and lv.rps > 0 for lv in r.levels[100])
        assert len(r.top10) == 20 and r.cpu_ms_per_request[100] > 0
    agree = sbs.agreement(results)
    print(f"\ntop-10 agreement with the naive FP32 pipeline over 20 requests of 100 candidates: {agree}")
    assert agree[sbs.REFERENCE] == 1.0 and agree[sbs.TRITON_FP32] >= 0.9
    assert agree[sbs.TRITON_COMPRESSED] >= COMPRESSED_AGREEMENT_FLOOR
    text = md.read_text()
    for name in sbs.SERVICES:
        assert f"| {name} |" in text
    assert "GOP/s" in text and "(benchmarks.png)" in text
    # concurrency 1's calls are split by query length for every service (the CI traffic has both)
    for r in results.values():
        by_query = r.at(100, 1).by_query
        assert set(by_query) <= {"long", "short"} and sum(c for c, _, _ in by_query.values()) == \
            r.at(100, 1).calls - r.at(100, 1).errors
    assert "by query length" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any("agreement" in k for k in verdicts)
    # the paired rounds ran against both live servers, at the sweep's headline levels
    assert [r.candidates for r in rounds] == [100] * s.paired_rounds
    assert all(r.naive.rps > 0 and r.bundle.rps > 0 for r in rounds)
    assert "## Paired rounds" in text
    # where a request's server time goes, per step, for both Triton services
    for name in (sbs.TRITON_FP32, sbs.TRITON_COMPRESSED):
        steps = results[name].steps[100]
        assert {"query_encoder", "ranker"} <= set(steps), steps
        assert all(c["compute_ms"] > 0 and c["avg_batch"] >= 1 for c in steps.values())
        # CPU by process: each python model's stub under its model's name, and tritonserver itself
        cpu = results[name].cpu_ms_by_part[100]
        assert {"query_encoder", "ranker", "tritonserver"} <= set(cpu), cpu
        assert all(cpu[part] > 0 for part in ("query_encoder", "ranker", "tritonserver")), cpu
        assert abs(sum(cpu.values()) - results[name].cpu_ms_per_request[100]) < 1e-9
    assert "queue ms / request" in text and "average batch per step" in text and "CPU ms / request" in text
