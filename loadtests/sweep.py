"""Open-loop sweep: the same seeded traffic at increasing arrival rates against one server, to
find the throughput at which a request type's p99 crosses its target.

    python -m loadtests.sweep --rates 2 4 8 12 16 --duration 45

Each rate is a full `loadtests.run` (own output folder under --out, own reports); the summary
table lists offered vs achieved rate, the chosen type's percentiles and the error rate, and
names the first rate whose p99 misses the target.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from conversion.stages import build_root
from loadtests import run, targets, traffic

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    p = run.build_parser()
    p.prog = "python -m loadtests.sweep"
    p.description = __doc__.splitlines()[0]
    p.add_argument("--rates", type=float, nargs="+", required=True, help="arrival rates to try, requests/s")
    p.add_argument("--watch", default=f"{traffic.REQUEST_NAMES[0]}", help="request type whose p99 is tracked")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    profile = targets.load_profile(args.targets, args.profile)
    target_p99 = profile.targets[args.watch].p99_ms
    root = args.out or build_root() / "loadtest" / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    rows = []
    with run.local_or_remote(args) as server:
        target = args.target or server.grpc_url
        url = args.metrics_url or (server.metrics_url if server else run.default_metrics_url(target))
        for rate in sorted(args.rates):
            args.mode, args.rate, args.out = "open", rate, Path(root) / f"rate-{rate:g}"
            s = run.settings_from_args(args, profile)
            r = run.execute(s, target, None if url == "none" else url)
            ach = r.summary.get("achieved", {})
            total = sum(a["rps"] for a in ach.values())
            sent = sum(a["requests"] for a in ach.values())
            fails = sum(a["failures"] for a in ach.values())
            w = ach.get(args.watch, {})
            rows.append((rate, total, w.get("p50_ms"), w.get("p95_ms"), w.get("p99_ms"),
                         fails / sent if sent else float("nan"), r.passed))
    print(f"\n== open-loop sweep: {args.watch} p99 target {target_p99:g} ms (profile {args.profile}) ==")
    print(f"{'offered/s':>9} | {'achieved/s':>10} | {'p50 ms':>7} | {'p95 ms':>7} | {'p99 ms':>7} | "
          f"{'errors':>7} | all targets")
    crossing = None
    for rate, total, p50, p95, p99, err, passed in rows:
        fmt = lambda v: f"{v:7.0f}" if v is not None else "    n/a"  # noqa: E731
        print(f"{rate:9g} | {total:10.2f} | {fmt(p50)} | {fmt(p95)} | {fmt(p99)} | {100 * err:6.2f}% | "
              f"{'PASS' if passed else 'FAIL'}")
        if crossing is None and (p99 is None or p99 > target_p99):
            crossing = (rate, total)
    if crossing:
        print(f"{args.watch} p99 first exceeds {target_p99:g} ms at {crossing[0]:g} requests/s offered "
              f"({crossing[1]:.2f}/s achieved)")
    else:
        print(f"{args.watch} p99 stayed within {target_p99:g} ms up to {rows[-1][0]:g} requests/s")
    print(f"reports: {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
