"""Overload: offer a multiple of the sustainable arrival rate and check that admission holds.

    python -m loadtests.overload                       # a local server on build/model_repository
    python -m loadtests.overload --compare-unbounded   # the same, then without the queue policy

1. Capacity: `--capacity-clients` callers in a closed loop keep the server busy for
   `--capacity-s`; completed calls per second is the sustainable rate.
2. Overload: open-loop Poisson arrivals at `--multiple` x that rate for `--duration` s, every
   call with a deadline, no client retries (the server's behaviour is what is measured).

Admitted calls must keep p99 <= 2x the profile's p99 target (loadtests/targets.toml), refused ones
must be refused fast with a retryable code (UNAVAILABLE), and no call may run into its deadline.
Prints a table with PASS/FAIL and exits 1 when a check fails. Requests come from the seeded
traffic generator (search_rank only, a fixed candidate count), so two runs send the same calls.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from conversion.stages import build_root
from loadtests import targets, traffic
from loadtests.grpc_load import OK, Call, FreshStreams, closed_loop, open_loop, percentile, split_cpus
from model_repository import spec
from model_repository.render import CONFIG, read_config, write_config
from model_repository.runtime import served_catalog_dir

log = logging.getLogger(__name__)

# What a caller may retry (elsewhere, or after a pause): the queue-full and queue-timeout answers.
RETRYABLE = ("UNAVAILABLE",)


@dataclass(frozen=True)
class OverloadSettings:
    candidates: int = 100
    capacity_clients: int = 8
    capacity_s: float = 10.0
    multiple: float = 3.0
    duration_s: float = 20.0
    deadline_s: float = 2.0
    seed: int = 2024
    target_p99_ms: float = 250.0  # the profile's p99 target for this request class
    # A refused caller must learn no later than an admitted one gets its answer at worst (2x the
    # p99 target), leaving most of its deadline to retry elsewhere. Refusing sooner than the queue
    # timeout would need a queue-length limit, which stalls this Triton (spec.QueuePolicy).
    rejection_p99_ms: float = 500.0


@dataclass
class PhaseReport:
    name: str
    offered_rps: float
    calls: int
    ok: int
    goodput_rps: float
    admitted_p50_ms: float | None
    admitted_p99_ms: float | None
    rejected: int
    rejected_p50_ms: float | None
    rejected_p99_ms: float | None
    by_code: dict[str, int] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(self.checks.values())


def measure_capacity(target: str, requests: list[bytes], concurrency: int, seconds: float) -> float:
    """Completed search_rank calls per second with `concurrency` calls always in flight, each request
    sent once (a repeat would be an embedding-cache hit the traffic did not make)."""
    calls = closed_loop(target, requests, concurrency, seconds, cycle=False)
    return sum(c.code == OK for c in calls) / seconds


def summarize(name: str, calls: list[Call], offered: float, seconds: float, s: OverloadSettings) -> PhaseReport:
    ok = [c.latency_ms for c in calls if c.code == OK]
    rejected = [c.latency_ms for c in calls if c.code != OK]
    by_code: dict[str, int] = {}
    for c in calls:
        by_code[c.code] = by_code.get(c.code, 0) + 1
    r = PhaseReport(name, offered, len(calls), len(ok), len(ok) / seconds, percentile(ok, 50), percentile(ok, 99),
                    len(rejected), percentile(rejected, 50), percentile(rejected, 99), by_code)
    r.checks = {
        f"admitted p99 <= {2 * s.target_p99_ms:g} ms": bool(ok) and r.admitted_p99_ms <= 2 * s.target_p99_ms,
        f"rejections p99 <= {s.rejection_p99_ms:g} ms": not rejected or r.rejected_p99_ms <= s.rejection_p99_ms,
        f"rejections retryable ({'/'.join(RETRYABLE)})": all(c.code in (OK, *RETRYABLE) for c in calls),
    }
    return r


def linked_copy(repository: Path, out: Path, change) -> Path:
    """A copy of `repository` (hard links, so no model file is duplicated) whose configs went through
    `change(cfg)`, which edits the parsed ModelConfig in place."""
    shutil.copytree(repository, out, copy_function=os.link)
    for path in out.glob(f"*/{CONFIG}"):
        cfg = read_config(path)
        change(cfg)
        path.unlink()  # a hard link: rewriting in place would change the original
        write_config(cfg, path.parent)
    return out


def without_queue_policy(repository: Path, out: Path) -> Path:
    """A copy of `repository` (hard links) whose configs have no queue policy: Triton's default."""
    def drop_policy(cfg) -> None:
        if cfg.HasField("dynamic_batching"):
            cfg.dynamic_batching.ClearField("default_queue_policy")

    return linked_copy(repository, out, drop_policy)


def run_phase(name: str, target: str, streams: FreshStreams, s: OverloadSettings) -> tuple[float, PhaseReport]:
    capacity = measure_capacity(target, streams.for_closed_loop(s.candidates, s.capacity_s, "capacity"),
                                s.capacity_clients, s.capacity_s)
    log.info("%s: capacity %.1f search_rank/s (%d closed-loop callers)", name, capacity, s.capacity_clients)
    offered = s.multiple * capacity
    # Poisson arrivals: a fifth more than the mean keeps the open loop from wrapping round its stream
    overload = streams.take(s.candidates, int(1.2 * offered * s.duration_s) + 64, "overload")
    calls = open_loop(target, overload, offered, s.duration_s, s.deadline_s, s.seed)
    return capacity, summarize(name, calls, offered, s.duration_s, s)


def format_table(rows: list[tuple[float, PhaseReport]], s: OverloadSettings) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
    lines = [f"search_rank, {s.candidates} candidates, deadline {s.deadline_s:g} s, "
             f"{s.multiple:g}x capacity for {s.duration_s:g} s, no client retries",
             "",
             "| server | capacity /s | offered /s | sent | OK | goodput /s | admitted p50 / p99 ms "
             "| refused | refused p50 / p99 ms | codes | checks |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for capacity, r in rows:
        checks = "; ".join(f"{k}: {'PASS' if v else 'FAIL'}" for k, v in r.checks.items())
        codes = ", ".join(f"{k} {v}" for k, v in sorted(r.by_code.items()))
        lines.append(f"| {r.name} | {capacity:.1f} | {r.offered_rps:.1f} | {r.calls} | {r.ok} | {r.goodput_rps:.1f} | "
                     f"{fmt(r.admitted_p50_ms)} / {fmt(r.admitted_p99_ms)} | {r.rejected} | "
                     f"{fmt(r.rejected_p50_ms)} / {fmt(r.rejected_p99_ms)} | {codes} | {checks} |")
    return "\n".join(lines)


@contextmanager
def _server(repository: Path, target: str | None, cpus: tuple[int, ...] | None) -> Iterator[str]:
    from model_repository.triton_server import run_triton_server

    if target:
        yield target
        return
    with run_triton_server(repository, cpus=cpus) as server:
        yield server.grpc_url


def main(argv: list[str] | None = None) -> int:
    d = OverloadSettings()
    p = argparse.ArgumentParser(prog="python -m loadtests.overload", description=__doc__.splitlines()[0])
    p.add_argument("--repository", type=Path, default=build_root() / "model_repository",
                   help="rendered repository: served when no --target; its catalog feeds the requests")
    p.add_argument("--target", help="measure this running server (host:port) instead of starting one")
    p.add_argument("--compare-unbounded", action="store_true",
                   help="also measure a copy of the repository without queue policy (needs no --target)")
    p.add_argument("--candidates", type=int, default=d.candidates)
    p.add_argument("--multiple", type=float, default=d.multiple, help="offered rate as a multiple of capacity")
    p.add_argument("--duration", type=float, default=d.duration_s, help="seconds of overload")
    p.add_argument("--capacity-s", type=float, default=d.capacity_s, help="seconds of the capacity measurement")
    p.add_argument("--capacity-clients", type=int, default=d.capacity_clients)
    p.add_argument("--deadline", type=float, default=d.deadline_s, help="per-call deadline, s")
    p.add_argument("--rejection-p99-ms", type=float,
                   help="bound on refusals' p99 (default: 2x the profile's p99 target, the admitted bound)")
    p.add_argument("--profile", default="cpu", help="targets profile whose p99 target bounds admitted calls")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--json", type=Path, help="also write the reports here")
    args = p.parse_args(argv)
    if not 1 <= args.candidates <= spec.MAX_CANDIDATES:
        p.error(f"--candidates must be in 1..{spec.MAX_CANDIDATES}, got {args.candidates}")
    if args.multiple <= 0 or args.duration <= 0 or args.capacity_s <= 0 or args.deadline <= 0:
        p.error("--multiple, --duration, --capacity-s and --deadline must be > 0")
    if args.compare_unbounded and args.target:
        p.error("--compare-unbounded starts its own servers; drop --target")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        profile = targets.load_profile(targets.DEFAULT_TARGETS, args.profile)
        streams = FreshStreams(served_catalog_dir(args.repository), args.seed)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    target_p99 = profile.targets[traffic.size_class_name(args.candidates)].p99_ms
    s = OverloadSettings(candidates=args.candidates, capacity_clients=args.capacity_clients, capacity_s=args.capacity_s,
                         multiple=args.multiple, duration_s=args.duration, deadline_s=args.deadline, seed=args.seed,
                         target_p99_ms=target_p99, rejection_p99_ms=args.rejection_p99_ms or 2 * target_p99)
    from model_repository.triton_server import TritonStartError

    server_cpus, load_cpus = split_cpus() if not args.target else (None, None)
    if load_cpus:
        os.sched_setaffinity(0, load_cpus)
        log.info("server on CPUs %s, load generator on CPUs %s", server_cpus, load_cpus)
    rows = []
    try:
        with _server(args.repository, args.target, server_cpus) as target:
            rows.append(run_phase("queue policy (served config)", target, streams, s))
        if args.compare_unbounded:
            with tempfile.TemporaryDirectory() as tmp:
                unbounded = without_queue_policy(args.repository, Path(tmp) / "model_repository")
                with _server(unbounded, None, server_cpus) as target:
                    rows.append(run_phase("no queue policy (Triton default)", target, streams, s))
    except TritonStartError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n" + format_table(rows, s), flush=True)
    if args.json:
        args.json.write_text(json.dumps([{"capacity_rps": c, **asdict(r)} for c, r in rows], indent=2))
    # Only the served configuration is judged; the unbounded one is there to show the difference.
    return 0 if rows[0][1].passed else 1


if __name__ == "__main__":
    sys.exit(main())
