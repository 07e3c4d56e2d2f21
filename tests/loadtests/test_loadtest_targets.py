"""The targets file and the PASS/FAIL check (loadtests.targets), on synthetic Locust statistics."""
from __future__ import annotations

import csv

import pytest

from loadtests import targets
from loadtests.traffic import REQUEST_NAMES

pytestmark = pytest.mark.unit

LOCUST_COLUMNS = ["Type", "Name", "Request Count", "Failure Count", "Median Response Time", "Average Response Time",
                  "Min Response Time", "Max Response Time", "Average Content Size", "Requests/s", "Failures/s",
                  "50%", "66%", "75%", "80%", "90%", "95%", "98%", "99%", "99.9%", "99.99%", "100%"]


def write_stats_csv(path, rows: dict[str, tuple[int, int, float, float, float, float]]):
    """Locust's _stats.csv layout; rows: name -> (requests, failures, p50, p95, p99, rps)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOCUST_COLUMNS)
        w.writeheader()
        total = [0, 0]
        for name, (n, fails, p50, p95, p99, rps) in rows.items():
            total[0] += n
            total[1] += fails
            w.writerow({**{c: 0 for c in LOCUST_COLUMNS}, "Type": "grpc", "Name": name, "Request Count": n,
                        "Failure Count": fails, "Requests/s": rps, "50%": p50, "95%": p95, "99%": p99})
        w.writerow({**{c: 0 for c in LOCUST_COLUMNS}, "Type": "", "Name": "Aggregated", "Request Count": total[0],
                    "Failure Count": total[1]})
    return path


def write_targets(path, body: str, version: int = 1):
    path.write_text(f"version = {version}\n{body}")
    return path


TWO_TYPES = """
[profiles.cpu.load]
users = 4
[profiles.cpu.targets.search_rank_100]
p50_ms = 20
p95_ms = 40
p99_ms = 60
max_error_rate = 0.01
min_rps = 5
[profiles.cpu.targets.text_embed]
p50_ms = 10
p95_ms = 20
p99_ms = 30
max_error_rate = 0.0
min_rps = 1
"""


def test_shipped_targets_file_has_cpu_and_gpu_profiles_for_every_request_type():
    for name in ("cpu", "gpu"):
        p = targets.load_profile(targets.DEFAULT_TARGETS, name)
        assert p.version == 1
        assert set(p.targets) == set(REQUEST_NAMES), name
        for t in p.targets.values():
            assert 0 < t.p50_ms <= t.p95_ms <= t.p99_ms
            assert 0 <= t.max_error_rate < 1 and t.min_rps >= 0
        assert p.load.users >= 1 and p.load.duration_s > 0
    # the three request types are among them
    assert {"search_rank_100", "search_rank_1000", "text_embed"} <= set(REQUEST_NAMES)


def test_unknown_version_and_profile_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="version"):
        targets.load_profile(write_targets(tmp_path / "t.toml", TWO_TYPES, version=99), "cpu")
    with pytest.raises(ValueError, match="no profile 'tpu'"):
        targets.load_profile(write_targets(tmp_path / "t.toml", TWO_TYPES), "tpu")
    with pytest.raises(ValueError, match="missing min_rps"):
        targets.load_profile(write_targets(tmp_path / "t.toml", TWO_TYPES.replace("min_rps = 1\n", "")), "cpu")


def test_evaluate_against_a_stats_csv(tmp_path):
    profile = targets.load_profile(write_targets(tmp_path / "t.toml", TWO_TYPES), "cpu")
    stats = write_stats_csv(tmp_path / "locust_stats.csv", {
        "search_rank_100": (1000, 5, 18, 41, 60, 7.5),  # p95 misses by 1 ms; p99 exactly at target passes
        "text_embed": (200, 1, 8, 15, 25, 0.5),  # one failure against a 0% budget; throughput too low
        "search_rank_250": (50, 0, 30, 60, 90, 1.0),  # no target: not checked
    })
    achieved = targets.achieved_from_stats_csv(stats)
    assert set(achieved) == {"search_rank_100", "text_embed", "search_rank_250"}
    checks = targets.evaluate(profile, achieved)
    verdicts = {(c.request_type, c.metric): c.verdict for c in checks}
    assert verdicts == {
        ("search_rank_100", "p50_ms"): "PASS", ("search_rank_100", "p95_ms"): "FAIL",
        ("search_rank_100", "p99_ms"): "PASS", ("search_rank_100", "error_rate"): "PASS",
        ("search_rank_100", "rps"): "PASS",
        ("text_embed", "p50_ms"): "PASS", ("text_embed", "p95_ms"): "PASS", ("text_embed", "p99_ms"): "PASS",
        ("text_embed", "error_rate"): "FAIL", ("text_embed", "rps"): "FAIL",
    }
    assert not targets.all_passed(checks)
    table = targets.format_table(checks)
    lines = table.splitlines()
    assert [c.strip() for c in lines[0].split("|")] == ["request type", "metric", "target", "achieved", "PASS/FAIL"]
    assert sum(line.endswith("PASS") for line in lines[2:]) == 7 and sum(line.endswith("FAIL") for line in lines[2:]) == 3
    assert "0.50%" in table and ">= 5.00/s" in table


def test_a_request_type_without_requests_fails_every_line(tmp_path):
    profile = targets.load_profile(write_targets(tmp_path / "t.toml", TWO_TYPES), "cpu")
    achieved = targets.achieved_from_stats_csv(write_stats_csv(tmp_path / "s.csv", {
        "search_rank_100": (100, 0, 10, 20, 30, 9.0), "text_embed": (0, 0, 0, 0, 0, 0.0)}))
    checks = targets.evaluate(profile, achieved)
    embed = [c for c in checks if c.request_type == "text_embed"]
    assert len(embed) == 5 and all(not c.passed and c.achieved is None for c in embed)
    assert all(c.passed for c in checks if c.request_type == "search_rank_100")
    assert "no requests" in targets.format_table(checks)


def test_all_passed_and_json_round_trip(tmp_path):
    profile = targets.load_profile(write_targets(tmp_path / "t.toml", TWO_TYPES), "cpu")
    achieved = {"search_rank_100": targets.Achieved(100, 0, 10, 20, 30, 9.0),
                "text_embed": targets.Achieved(10, 0, 5, 6, 7, 2.0)}
    checks = targets.evaluate(profile, achieved)
    assert targets.all_passed(checks)
    assert targets.checks_from_json(targets.checks_to_json(checks)) == checks
    assert not targets.all_passed([])
