"""Short load tests against the real tritonserver (the session's `triton` fixture), through the CLI.

Targets here are written by the tests: loose ones so the smoke run's verdict does not depend on
how busy the CI machine is, and impossible ones to prove that a miss exits non-zero. The
release targets themselves (loadtests/targets.toml) are checked by the unit tests and by
`make loadtest`.
"""
from __future__ import annotations

import csv
import json

import pytest

from loadtests import run, traffic

pytestmark = pytest.mark.server


def targets_file(path, p_ms: float, max_error_rate: float, min_rps: float):
    body = ["version = 1", "[profiles.cpu]", 'description = "written by the test"']
    for name in traffic.REQUEST_NAMES:
        body += [f"[profiles.cpu.targets.{name}]", f"p50_ms = {p_ms}", f"p95_ms = {p_ms}", f"p99_ms = {p_ms}",
                 f"max_error_rate = {max_error_rate}", f"min_rps = {min_rps}"]
    path.write_text("\n".join(body) + "\n")
    return path


def cli(triton, ci_repository, out, targets, *extra) -> list[str]:
    return ["--target", triton.grpc_url, "--metrics-url", triton.metrics_url, "--repository", str(ci_repository),
            "--targets", str(targets), "--out", str(out), "--scrape-interval", "1", *extra]


def table_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.rstrip().endswith(("| PASS", "| FAIL"))]


def test_smoke_load_meets_loose_targets_with_concurrent_requests(triton, ci_repository, tmp_path, capsys):
    loose = targets_file(tmp_path / "loose.toml", p_ms=60_000, max_error_rate=0.0, min_rps=0.01)
    out = tmp_path / "smoke"
    code = run.main(cli(triton, ci_repository, out, loose, "--users", "3", "--duration", "20", "--think-time", "0.05"))
    stdout = capsys.readouterr().out
    assert code == 0, stdout

    with open(out / "locust_stats.csv", newline="") as f:
        stats = {r["Name"]: r for r in csv.DictReader(f)}
    assert int(stats["Aggregated"]["Request Count"]) >= 30
    assert int(stats["Aggregated"]["Failure Count"]) == 0
    for name in traffic.REQUEST_NAMES:  # every request type of the mix was sent and answered
        assert int(stats[name]["Request Count"]) > 0, name

    lines = table_lines(stdout)
    assert len(lines) == 5 * len(traffic.REQUEST_NAMES) and all(line.endswith("PASS") for line in lines)
    assert "RESULT: PASS" in stdout

    summary = json.loads((out / "results.json").read_text())
    assert summary["passed"] and summary["mode"] == "ClosedLoopUser"
    # gRPC under gevent really overlaps calls: a blocking client would never have 2 in flight
    assert summary["max_inflight"] >= 2, "requests ran one at a time: grpc is not gevent-cooperative"

    for name in ("locust_stats.csv", "locust_stats_history.csv", "report.html", "latency.png",
                 "triton_metrics.csv", "triton_models.csv"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "latency.png").read_bytes()[:4] == b"\x89PNG"
    with open(out / "triton_models.csv", newline="") as f:
        models = {r["model"]: r for r in csv.DictReader(f)}
    # the per-model breakdown covers the pipeline steps, with time in them
    assert {"search_rank", "text_embed", "query_encoder", "ranker"} <= set(models)
    assert float(models["query_encoder"]["compute_ms"]) > 0


def test_impossible_target_exits_non_zero_in_open_loop_mode(triton, ci_repository, tmp_path, capsys):
    impossible = targets_file(tmp_path / "impossible.toml", p_ms=0.001, max_error_rate=0.0, min_rps=0.01)
    out = tmp_path / "impossible"
    code = run.main(cli(triton, ci_repository, out, impossible, "--mode", "open", "--rate", "8", "--duration", "8"))
    stdout = capsys.readouterr().out
    assert code == 1, stdout
    lines = table_lines(stdout)
    assert any(line.endswith("FAIL") and "p50_ms" in line for line in lines)
    assert "RESULT: FAIL" in stdout
    summary = json.loads((out / "results.json").read_text())
    assert not summary["passed"] and summary["mode"] == "OpenLoopUser"
    sent = sum(a["requests"] for a in summary["achieved"].values())
    assert sent >= 30  # ~8 requests/s for 8 s, whatever the latency: arrivals do not wait for answers
    assert (out / "latency.png").stat().st_size > 0
