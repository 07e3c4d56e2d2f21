"""`make loadtest`: Locust headless against a Triton server, checked against the targets file.

Without --target it starts a local server on --repository (free loopback ports) and stops it at
the end. Locust runs as a subprocess (one process, or a master and --workers workers on this
machine); Triton's metrics endpoint is scraped on a background thread meanwhile. The output
folder gets Locust's CSV and HTML reports, the metrics (raw and per model), the PNG and
results.json; the table of achieved vs target is printed, and the exit code is Locust's, which
the locustfile sets to 1 when any target line fails.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from conversion.stages import build_root
from loadtests import metrics, report, targets, traffic
from model_repository.runtime import served_catalog_dir
from model_repository.triton_server import TritonPorts

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
# Triton's default; a remote --target's metrics are assumed there.
TRITON_METRICS_PORT = TritonPorts().metrics
# Locust needs a few seconds to start and to write its reports after the run time; past this
# margin the run is considered hung and killed, so a load test can never run unbounded.
STARTUP_MARGIN_S = 90


@dataclass
class RunSettings:
    catalog: Path
    out: Path
    targets_file: Path = targets.DEFAULT_TARGETS
    profile: str = "cpu"
    users: int = 8
    spawn_rate: float = 8.0
    duration_s: int = 60
    mode: str = "closed"  # closed: ClosedLoopUser; open: OpenLoopUser at arrival_rate
    arrival_rate: float = 10.0
    think_time_s: float = 0.1
    request_timeout_s: float = 2.0
    workers: int = 0  # 0: one Locust process; N: a master and N workers on this machine
    seed: int = 2024
    scrape_interval_s: float = 1.0

    @property
    def user_class(self) -> str:
        return "OpenLoopUser" if self.mode == "open" else "ClosedLoopUser"


@dataclass
class RunResult:
    exit_code: int
    out: Path
    checks: list[targets.Check] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    breakdown: list[metrics.ModelBreakdown] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.exit_code == 0


def locust_command(s: RunSettings, target: str) -> list[str]:
    return [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-H", target,
        "-u", str(s.users), "-r", str(s.spawn_rate), "-t", f"{s.duration_s}s",
        # In-flight requests may finish (they carry a deadline) before users are stopped.
        "--stop-timeout", f"{math.ceil(s.request_timeout_s) + 1}s",
        "--csv", str(s.out / "locust"), "--csv-full-history", "--html", str(s.out / "report.html"),
        "--only-summary", "--loglevel", "INFO",
        "--catalog", str(s.catalog), "--seed", str(s.seed),
        "--targets", str(s.targets_file), "--targets-profile", s.profile,
        "--results-file", str(s.out / "results.json"),
        "--request-timeout", str(s.request_timeout_s), "--think-time", str(s.think_time_s),
        "--arrival-rate", str(s.arrival_rate),
        s.user_class,
    ]


def _wait(proc: subprocess.Popen, timeout_s: float, what: str) -> int:
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        log.error("%s still running after %.0f s; killing it", what, timeout_s)
        proc.kill()
        proc.wait()
        return 124


def run_locust(s: RunSettings, target: str) -> int:
    """Locust headless, single process or master + workers; returns the master's exit code."""
    from model_repository.triton_server import free_port

    cmd = locust_command(s, target)
    limit = s.duration_s + s.request_timeout_s + STARTUP_MARGIN_S
    if s.workers <= 0:
        log.info("locust: %s", " ".join(cmd))
        return _wait(subprocess.Popen(cmd, cwd=REPO_ROOT, stdin=subprocess.DEVNULL), limit, "locust")
    port = free_port()
    master_cmd = cmd[:-1] + ["--master", "--master-bind-host", "127.0.0.1", "--master-bind-port", str(port),
                             "--expect-workers", str(s.workers), "--expect-workers-max-wait", "60", cmd[-1]]
    log.info("locust master: %s", " ".join(master_cmd))
    master = subprocess.Popen(master_cmd, cwd=REPO_ROOT, stdin=subprocess.DEVNULL)
    workers = []
    for i in range(s.workers):
        # Workers get the custom options (catalog, seed, timeouts, ...) from the master.
        worker_cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--worker",
                      "--master-host", "127.0.0.1", "--master-port", str(port), "--loglevel", "INFO"]
        log_file = open(s.out / f"worker-{i}.log", "w")
        workers.append((subprocess.Popen(worker_cmd, cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                                         stdout=log_file, stderr=subprocess.STDOUT), log_file))
    code = _wait(master, limit + 60, "locust master")
    for proc, log_file in workers:
        _wait(proc, 30, "locust worker")  # a worker quits when its master does
        log_file.close()
    return code


def write_reports(s: RunSettings, samples: list[metrics.Sample], profile: targets.Profile) -> list[metrics.ModelBreakdown]:
    rows = metrics.breakdown(samples[0], samples[-1]) if len(samples) >= 2 else []
    if samples:
        metrics.write_samples_csv(s.out / "triton_metrics.csv", samples)
        metrics.write_breakdown_csv(s.out / "triton_models.csv", rows)
    title = (f"{s.user_class}: " + (f"{s.arrival_rate:g} req/s" if s.mode == "open" else f"{s.users} users")
             + f", {s.duration_s} s, profile {s.profile}")
    report.plot_report(s.out / "locust_stats_history.csv", s.out / "latency.png", breakdown=rows,
                       metrics_series=metrics.series(samples), profile=profile, title=title)
    return rows


def execute(s: RunSettings, target: str, metrics_url: str | None) -> RunResult:
    """One load test against a running server: scrape, Locust, reports, checks."""
    s.out.mkdir(parents=True, exist_ok=True)
    profile = targets.load_profile(s.targets_file, s.profile)
    scraper = metrics.MetricsScraper(metrics_url, s.scrape_interval_s).start() if metrics_url else None
    try:
        code = run_locust(s, target)
    finally:
        samples = scraper.stop() if scraper else []
    rows = write_reports(s, samples, profile)
    results_file = s.out / "results.json"
    if not results_file.is_file():
        log.error("locust left no %s (exit code %d): the run did not complete", results_file, code)
        return RunResult(exit_code=code or 2, out=s.out, breakdown=rows)
    summary = json.loads(results_file.read_text())
    return RunResult(exit_code=code, out=s.out, checks=targets.checks_from_json(summary["checks"]),
                     summary=summary, breakdown=rows)


def print_result(r: RunResult, s: RunSettings) -> None:
    failed = [c for c in r.checks if not c.passed]
    print(f"\n== targets: profile {s.profile} ({s.targets_file}) ==")
    if r.checks:
        print(targets.format_table(r.checks))
    verdict = "PASS" if r.passed else "FAIL"
    print(f"RESULT: {verdict} ({len(failed)} of {len(r.checks)} target lines failed; "
          f"max requests in flight {r.summary.get('max_inflight', '?')}; exit code {r.exit_code})")
    if r.breakdown:
        print("\n== Triton per model (mean per request over the run) ==")
        print(metrics.format_breakdown(r.breakdown))
    print(f"\nreports: {r.out} (locust_stats.csv, report.html, latency.png, triton_models.csv, results.json)")


def default_metrics_url(target: str) -> str:
    """Port 8002 of the target's host; "none" for a replica set (several addresses, dns:///...),
    whose servers' metrics are not one endpoint: pass --metrics-url for one replica."""
    if "," in target or target.startswith(("dns:", "ipv4:", "ipv6:")):
        log.warning("target %s names a replica set: no Triton metrics scrape (pass --metrics-url)", target)
        return "none"
    host = target.rsplit(":", 1)[0]
    return f"http://{host}:{TRITON_METRICS_PORT}/metrics"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests.run", description=__doc__.splitlines()[0])
    p.add_argument("--target", help="gRPC endpoint of a running server: host:port, a replica set "
                                    "host:port,host:port, or dns:///name:port (default: start a local one)")
    p.add_argument("--repository", type=Path, default=build_root() / "model_repository",
                   help="rendered model repository: served when no --target, and its catalog feeds the traffic")
    p.add_argument("--catalog", type=Path, help="catalog artifact folder (default: <repository>/ranker/1/catalog)")
    p.add_argument("--metrics-url", help="Triton metrics endpoint ('none' to skip; default: the local server's, "
                                         f"or port {TRITON_METRICS_PORT} of --target's host)")
    p.add_argument("--targets", type=Path, default=targets.DEFAULT_TARGETS, help="targets file")
    p.add_argument("--profile", default="cpu", help="targets profile (cpu, gpu)")
    p.add_argument("--users", type=int, help="Locust users (default: the profile's load; open mode: 1 per process)")
    p.add_argument("--spawn-rate", type=float, help="users started per second (default: the profile's load)")
    p.add_argument("--duration", type=int, help="seconds of load (default: the profile's load)")
    p.add_argument("--mode", choices=("closed", "open"), default="closed",
                   help="closed: users wait for each answer; open: constant arrival rate (--rate)")
    p.add_argument("--rate", type=float, default=10.0, help="open mode: requests per second in total")
    p.add_argument("--think-time", type=float, help="closed mode: mean pause between a user's requests, s")
    p.add_argument("--request-timeout", type=float, help="gRPC deadline per request, s")
    p.add_argument("--workers", type=int, default=0, help="distributed: a master and this many worker processes")
    p.add_argument("--seed", type=int, default=2024, help="traffic seed: same seed, same requests")
    p.add_argument("--out", type=Path, help="output folder (default: build/loadtest/<timestamp>)")
    p.add_argument("--scrape-interval", type=float, default=1.0, help="metrics scrape period, s")
    return p


def settings_from_args(args: argparse.Namespace, profile: targets.Profile) -> RunSettings:
    load = profile.load
    out = args.out or build_root() / "loadtest" / time.strftime("%Y%m%d-%H%M%S")
    users = args.users or (max(1, args.workers) if args.mode == "open" else load.users)
    return RunSettings(
        catalog=args.catalog or served_catalog_dir(args.repository), out=out, targets_file=args.targets,
        profile=args.profile, users=users, spawn_rate=args.spawn_rate or max(load.spawn_rate, users),
        duration_s=args.duration or load.duration_s, mode=args.mode, arrival_rate=args.rate,
        think_time_s=load.think_time_s if args.think_time is None else args.think_time,
        request_timeout_s=args.request_timeout or load.request_timeout_s, workers=args.workers, seed=args.seed,
        scrape_interval_s=args.scrape_interval)


def local_or_remote(args: argparse.Namespace):
    """A started local server (context manager), or nothing when --target names one."""
    from model_repository.triton_server import run_triton_server

    return nullcontext(None) if args.target else run_triton_server(args.repository)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        profile = targets.load_profile(args.targets, args.profile)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = settings_from_args(args, profile)
    try:
        traffic.CatalogData.load(s.catalog)  # fail before starting anything
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from model_repository.triton_server import TritonStartError

    try:
        with local_or_remote(args) as server:
            target = args.target or server.grpc_url
            url = args.metrics_url or (server.metrics_url if server else default_metrics_url(target))
            result = execute(s, target, None if url == "none" else url)
    except TritonStartError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_result(result, s)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
