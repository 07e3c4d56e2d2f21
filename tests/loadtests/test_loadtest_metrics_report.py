"""Triton metrics parsing and per-model breakdown (loadtests.metrics), the PNG (loadtests.report)
and the CLI's settings (loadtests.run), without a server."""
from __future__ import annotations

import csv
import time

import pytest

from loadtests import metrics, report, run, targets

pytestmark = pytest.mark.unit

# Shaped like Triton 2.51's /metrics: HELP/TYPE lines, per-model counters labelled model and
# version, and metrics without a model label that must be ignored.
METRICS_TEXT = """\
# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{{model="search_rank",version="1"}} {sr}
nv_inference_request_success{{model="query_encoder",version="1"}} {qe}
# TYPE nv_inference_count counter
nv_inference_count{{model="query_encoder",version="1"}} {qe}
nv_inference_exec_count{{model="query_encoder",version="1"}} {qe_exec}
nv_inference_queue_duration_us{{model="search_rank",version="1"}} 0
nv_inference_queue_duration_us{{model="query_encoder",version="1"}} {qe_queue}
nv_inference_compute_input_duration_us{{model="query_encoder",version="1"}} 0
nv_inference_compute_infer_duration_us{{model="query_encoder",version="1"}} {qe_infer}
nv_inference_compute_output_duration_us{{model="query_encoder",version="1"}} 0
nv_inference_request_duration_us{{model="query_encoder",version="1"}} {qe_req}
nv_cpu_utilization 0.5
nv_inference_pending_request_count{{model="query_encoder",version="1"}} 3
"""


def text(sr=0, qe=0, qe_exec=0, qe_queue=0, qe_infer=0, qe_req=0) -> str:
    return METRICS_TEXT.format(sr=sr, qe=qe, qe_exec=qe_exec, qe_queue=qe_queue, qe_infer=qe_infer, qe_req=qe_req)


def test_parse_prometheus_keeps_wanted_per_model_counters():
    c = metrics.parse_prometheus(text(sr=5, qe=7, qe_queue=1400.5))
    assert c[(metrics.SUCCESS, "search_rank")] == 5
    assert c[(metrics.QUEUE_US, "query_encoder")] == 1400.5
    assert not any(m == "nv_cpu_utilization" for m, _ in c)
    assert not any(m == "nv_inference_pending_request_count" for m, _ in c)


def test_breakdown_is_the_ratio_of_counter_deltas():
    first = metrics.Sample(100.0, metrics.parse_prometheus(text(sr=1, qe=1, qe_exec=1, qe_queue=500, qe_infer=4000,
                                                                qe_req=5000)))
    last = metrics.Sample(110.0, metrics.parse_prometheus(text(sr=11, qe=41, qe_exec=11, qe_queue=80500,
                                                               qe_infer=204000, qe_req=305000)))
    rows = {r.model: r for r in metrics.breakdown(first, last)}
    qe = rows["query_encoder"]
    assert qe.requests == 40
    assert qe.queue_ms == pytest.approx(80000 / 40 / 1000)
    assert qe.compute_ms == pytest.approx(200000 / 40 / 1000)
    assert qe.request_ms == pytest.approx(300000 / 40 / 1000)
    assert qe.avg_batch == pytest.approx(40 / 10)
    assert rows["search_rank"].requests == 10
    # per-interval series: one row per model per consecutive pair of scrapes
    assert len(metrics.series([first, last])) == 2
    assert "query_encoder" in metrics.format_breakdown(list(rows.values()))


CACHE_TEXT = """\
# TYPE searchrank_embedding_cache_lookups_total counter
searchrank_embedding_cache_lookups_total{{instance="query_encoder_0_0",model="query_encoder",result="hit"}} {h0}
searchrank_embedding_cache_lookups_total{{instance="query_encoder_0_0",model="query_encoder",result="miss"}} {m0}
searchrank_embedding_cache_lookups_total{{instance="query_encoder_0_1",model="query_encoder",result="hit"}} {h1}
searchrank_embedding_cache_lookups_total{{instance="query_encoder_0_1",model="query_encoder",result="miss"}} {m1}
"""


def test_breakdown_reports_the_embedding_cache_hit_share_over_the_window():
    first = metrics.Sample(0.0, metrics.parse_prometheus(text(sr=1, qe=1, qe_exec=1)
                                                         + CACHE_TEXT.format(h0=5, m0=5, h1=0, m1=0)))
    last = metrics.Sample(10.0, metrics.parse_prometheus(text(sr=11, qe=41, qe_exec=11)
                                                         + CACHE_TEXT.format(h0=25, m0=15, h1=10, m1=10)))
    rows = {r.model: r for r in metrics.breakdown(first, last)}
    # both instances, only what the window added: (20 + 10) hits of (20 + 10) + (10 + 10) lookups
    assert rows["query_encoder"].cache_hit_share == pytest.approx(30 / 50)
    assert rows["search_rank"].cache_hit_share is None
    table = metrics.format_breakdown(list(rows.values()))
    assert "cache hits" in table and "60%" in table


def test_a_model_without_requests_in_the_window_is_left_out():
    s = metrics.Sample(0.0, metrics.parse_prometheus(text(sr=3, qe=3)))
    assert metrics.breakdown(s, s) == []


def test_scraper_records_samples_from_an_endpoint(tmp_path):
    # A file URL stands in for the endpoint: urllib reads it the same way, nothing is listened on.
    page = tmp_path / "metrics"
    page.write_text(text(sr=2, qe=2))
    scraper = metrics.MetricsScraper(page.as_uri(), interval_s=0.05).start()
    page.write_text(text(sr=4, qe=4, qe_exec=2, qe_queue=2000))
    time.sleep(0.3)
    samples = scraper.stop()
    assert len(samples) >= 3 and scraper.errors == 0
    rows = {r.model: r for r in metrics.breakdown(samples[0], samples[-1])}
    assert rows["query_encoder"].queue_ms == pytest.approx(1.0)
    metrics.write_samples_csv(tmp_path / "raw.csv", samples)
    metrics.write_breakdown_csv(tmp_path / "models.csv", list(rows.values()))
    with open(tmp_path / "models.csv") as f:
        assert {r["model"] for r in csv.DictReader(f)} == {"search_rank", "query_encoder"}


def test_scraper_survives_an_unreachable_endpoint(tmp_path):
    scraper = metrics.MetricsScraper((tmp_path / "absent").as_uri(), interval_s=0.05).start()
    assert scraper.stop() == [] and scraper.errors >= 2


def write_history(path):
    cols = ["Timestamp", "User Count", "Type", "Name", "Requests/s", "Failures/s", "50%", "66%", "75%", "80%", "90%",
            "95%", "98%", "99%", "99.9%", "99.99%", "100%", "Total Request Count", "Total Failure Count"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for t in range(20):
            for name in ("search_rank_100", "text_embed", "Aggregated"):
                p = "N/A" if t == 0 else 0 if t == 1 else 10 + t  # N/A and 0 mean "no window yet"
                w.writerow({c: 0 for c in cols} | {"Timestamp": 1000 + t, "User Count": 2, "Name": name,
                                                   "Requests/s": t / 2, "Failures/s": 0,
                                                   "50%": p, "95%": p, "99%": p})
    return path


def test_plot_report_writes_a_png(tmp_path):
    rows = [metrics.ModelBreakdown("query_encoder", 10, 1.5, 0.1, 4.0, 0.1, 6.0, 2.0),
            metrics.ModelBreakdown("search_rank", 10, 0.0, 0.0, 9.0, 0.0, 9.5, 1.0)]
    series = [(1005.0, rows[0]), (1010.0, rows[0])]
    out = report.plot_report(write_history(tmp_path / "h.csv"), tmp_path / "latency.png", rows, series,
                             targets.load_profile(), "test")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    # without metrics or history it still writes a (mostly empty) PNG rather than failing the run
    assert report.plot_report(tmp_path / "absent.csv", tmp_path / "empty.png").stat().st_size > 0


def test_cli_settings_default_to_the_profile_load(tmp_path):
    profile = targets.load_profile()
    args = run.build_parser().parse_args(["--repository", str(tmp_path), "--out", str(tmp_path / "o")])
    s = run.settings_from_args(args, profile)
    assert (s.users, s.duration_s, s.mode) == (profile.load.users, profile.load.duration_s, "closed")
    assert s.catalog == tmp_path / "ranker" / "1" / "catalog"
    args = run.build_parser().parse_args(["--mode", "open", "--rate", "25", "--workers", "3", "--duration", "7"])
    s = run.settings_from_args(args, profile)
    assert (s.users, s.arrival_rate, s.duration_s, s.user_class) == (3, 25.0, 7, "OpenLoopUser")
    cmd = run.locust_command(s, "127.0.0.1:9")
    assert cmd[-1] == "OpenLoopUser" and "--headless" in cmd and cmd[cmd.index("-H") + 1] == "127.0.0.1:9"
    assert cmd[cmd.index("--arrival-rate") + 1] == "25.0"


def test_cli_rejects_a_broken_targets_file_before_starting_anything(tmp_path, capsys):
    bad = tmp_path / "t.toml"
    bad.write_text("version = 2\n")
    assert run.main(["--targets", str(bad), "--target", "127.0.0.1:9"]) == 2
    assert "unsupported targets version" in capsys.readouterr().err
    assert run.main(["--target", "127.0.0.1:9", "--catalog", str(tmp_path)]) == 2
    assert "--catalog" in capsys.readouterr().err
