"""Batching table: the encoder's average batch, throughput and p99 at several concurrencies, for
several encoder batching delays (docs/architecture.md, "Batching", keeps the table).

    python -m loadtests.batching                         # build/model_repository, delays 0,500,2000 us

Each delay is a copy of the repository (hard links) with only the query encoder's
`max_queue_delay_microseconds` changed, served alone, pinned like `make bench` (server and load
generator on separate CPUs), with the same seeded search_rank requests in a closed loop. The
average batch is Triton's own count: requests the encoder served per execution.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from conversion.stages import build_root
from loadtests.grpc_load import OK, FreshStreams, closed_loop, percentile, split_cpus
from loadtests.overload import linked_copy
from loadtests.side_by_side import Endpoint, step_costs, triton_stats
from model_repository import spec
from model_repository.render import CONFIG

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Row:
    delay_us: int
    concurrency: int
    rps: float
    p99_ms: float | None
    refused: int
    encoder_batch: float
    ranker_batch: float


def with_encoder_delay(repository: Path, out: Path, delay_us: int) -> Path:
    """A hard-linked copy of `repository` whose query encoder waits `delay_us` to fill a batch."""
    def set_delay(cfg) -> None:
        if cfg.name == spec.QUERY_ENCODER:
            cfg.dynamic_batching.max_queue_delay_microseconds = delay_us

    return linked_copy(repository, out, set_delay)


def measure(repository: Path, delays: list[int], concurrency: list[int], candidates: int, seconds: float,
            seed: int = 2024) -> list[Row]:
    from model_repository.triton_server import run_triton_server

    server_cpus, load_cpus = split_cpus()
    from model_repository.runtime import served_catalog_dir

    streams = FreshStreams(served_catalog_dir(repository), seed)
    rows = []
    before = os.sched_getaffinity(0)
    try:
        if load_cpus:
            os.sched_setaffinity(0, load_cpus)
        for delay in delays:
            with tempfile.TemporaryDirectory(dir=build_root()) as tmp:
                variant = with_encoder_delay(repository, Path(tmp) / "model_repository", delay)
                with run_triton_server(variant, cpus=server_cpus) as server:
                    service = Endpoint(server.grpc_url, server.process.pid, server.metrics_url)
                    closed_loop(server.grpc_url, streams.for_closed_loop(candidates, 1.0, "warm"), 2, 1.0,
                                warmup_s=0.5, cycle=False)
                    for conc in concurrency:
                        stats0 = triton_stats(service)
                        # the same stream at this level for every delay, never a request twice
                        calls = closed_loop(server.grpc_url, streams.for_closed_loop(candidates, seconds, f"c{conc}"),
                                            conc, seconds, cycle=False)
                        steps = step_costs(stats0, triton_stats(service))
                        ok = [c.latency_ms for c in calls if c.code == OK]
                        rows.append(Row(delay, conc, len(ok) / seconds, percentile(ok, 99), len(calls) - len(ok),
                                        steps.get(spec.QUERY_ENCODER, {}).get("avg_batch", 0.0),
                                        steps.get(spec.RANKER, {}).get("avg_batch", 0.0)))
                        log.info("%s", rows[-1])
    finally:
        os.sched_setaffinity(0, before)
    return rows


def table(rows: list[Row], candidates: int) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    lines = [f"search_rank, {candidates} candidates, closed loop", "",
             "| encoder delay µs | concurrency | search_rank/s | p99 ms | refused | encoder batch | ranker batch |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.delay_us} | {r.concurrency} | {r.rps:.1f} | {fmt(r.p99_ms)} | {r.refused} | "
              f"{r.encoder_batch:.2f} | {r.ranker_batch:.2f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.batching", description=__doc__.splitlines()[0])
    p.add_argument("--repository", type=Path, default=build_root() / "model_repository")
    p.add_argument("--delays", default="0,500,2000", help="encoder max_queue_delay_microseconds values")
    p.add_argument("--concurrency", default="1,4,8,16")
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--seconds", type=float, default=6.0, help="per concurrency level")
    args = p.parse_args(argv)
    try:
        delays = [int(x) for x in args.delays.split(",")]
        conc = [int(x) for x in args.concurrency.split(",")]
    except ValueError:
        p.error("--delays and --concurrency take comma-separated integers")
    if any(d < 0 for d in delays) or any(c < 1 for c in conc) or not 1 <= args.candidates <= spec.MAX_CANDIDATES:
        p.error("delays >= 0, concurrency >= 1, candidates in 1..1000")
    if not (args.repository / spec.QUERY_ENCODER / CONFIG).is_file():
        print(f"error: no rendered repository at {args.repository} (run `make models`)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(table(measure(args.repository, delays, conc, args.candidates, args.seconds), args.candidates))
    return 0


if __name__ == "__main__":
    sys.exit(main())
