"""The targets file (loadtests/targets.toml) and the achieved-vs-target check.

A profile (`cpu`, `gpu`) holds the load the targets were set for and, per request type, p50/p95/
p99 latency ceilings in ms, a maximum error rate and a minimum throughput. `evaluate` turns the
achieved statistics into one PASS/FAIL line per (request type, metric); a request type that sent
no request fails every metric, since a gate must not pass on missing data.
"""
from __future__ import annotations

import csv
import logging
import math
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_TARGETS = Path(__file__).resolve().parent / "targets.toml"
SUPPORTED_VERSIONS = (1,)
LATENCY_METRICS = ("p50_ms", "p95_ms", "p99_ms")
METRICS = LATENCY_METRICS + ("error_rate", "rps")


@dataclass(frozen=True)
class Target:
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_error_rate: float
    min_rps: float


@dataclass(frozen=True)
class Load:
    """The load a profile's targets hold for; run.py uses it as its defaults."""

    users: int = 8
    spawn_rate: float = 8.0
    duration_s: int = 60
    think_time_s: float = 0.1
    request_timeout_s: float = 2.0


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    load: Load
    targets: dict[str, Target]
    version: int = 1
    source: str = ""


@dataclass(frozen=True)
class Achieved:
    requests: int
    failures: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    rps: float

    @property
    def error_rate(self) -> float:
        return self.failures / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class Check:
    request_type: str
    metric: str
    target: float
    achieved: float | None  # None: no request of this type was sent
    passed: bool

    @property
    def verdict(self) -> str:
        return "PASS" if self.passed else "FAIL"


def load_profile(path: Path | str = DEFAULT_TARGETS, profile: str = "cpu") -> Profile:
    path = Path(path)
    with open(path, "rb") as f:
        data = tomllib.load(f)
    version = data.get("version")
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"{path}: unsupported targets version {version!r} (supported: {SUPPORTED_VERSIONS})")
    profiles = data.get("profiles", {})
    if profile not in profiles:
        raise ValueError(f"{path}: no profile {profile!r} (has: {', '.join(profiles) or 'none'})")
    p = profiles[profile]
    targets = {}
    for name, t in p.get("targets", {}).items():
        missing = {f for f in Target.__dataclass_fields__} - set(t)
        if missing:
            raise ValueError(f"{path}: profile {profile!r}, {name}: missing {', '.join(sorted(missing))}")
        targets[name] = Target(**{k: float(t[k]) for k in Target.__dataclass_fields__})
    if not targets:
        raise ValueError(f"{path}: profile {profile!r} has no targets")
    load = Load(**p.get("load", {}))
    return Profile(name=profile, description=p.get("description", ""), load=load, targets=targets,
                   version=version, source=str(path))


def _check(request_type: str, metric: str, target: float, achieved: float | None, ok) -> Check:
    passed = achieved is not None and not math.isnan(achieved) and ok(achieved, target)
    return Check(request_type, metric, target, achieved, bool(passed))


def evaluate(profile: Profile, achieved: dict[str, Achieved]) -> list[Check]:
    checks = []
    for name, t in profile.targets.items():
        a = achieved.get(name)
        if a is not None and a.requests == 0:
            a = None
        for metric in LATENCY_METRICS:
            checks.append(_check(name, metric, getattr(t, metric), a and getattr(a, metric), lambda x, y: x <= y))
        checks.append(_check(name, "error_rate", t.max_error_rate, a and a.error_rate, lambda x, y: x <= y))
        checks.append(_check(name, "rps", t.min_rps, a and a.rps, lambda x, y: x >= y))
    for name in sorted(set(achieved) - set(profile.targets)):
        log.info("request type %s has no target in profile %s; not checked", name, profile.name)
    return checks


def all_passed(checks: list[Check]) -> bool:
    return bool(checks) and all(c.passed for c in checks)


def achieved_from_locust_stats(stats, names) -> dict[str, Achieved]:
    """From a Locust RequestStats (duck-typed: entries keyed by (name, method))."""
    out = {}
    for (name, _method), e in stats.entries.items():
        if name not in names or not e.num_requests:
            continue
        out[name] = Achieved(requests=e.num_requests, failures=e.num_failures,
                             p50_ms=float(e.get_response_time_percentile(0.50)),
                             p95_ms=float(e.get_response_time_percentile(0.95)),
                             p99_ms=float(e.get_response_time_percentile(0.99)),
                             rps=float(e.total_rps))
    return out


def achieved_from_stats_csv(path: Path | str) -> dict[str, Achieved]:
    """From Locust's `<prefix>_stats.csv` (the same numbers, as written to disk)."""
    out = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row["Name"] == "Aggregated" or not int(row["Request Count"]):
                continue
            out[row["Name"]] = Achieved(requests=int(row["Request Count"]), failures=int(row["Failure Count"]),
                                        p50_ms=float(row["50%"]), p95_ms=float(row["95%"]),
                                        p99_ms=float(row["99%"]), rps=float(row["Requests/s"]))
    return out


def _fmt(metric: str, value: float | None) -> str:
    if value is None:
        return "no requests"
    if metric == "error_rate":
        return f"{100 * value:.2f}%"
    if metric == "rps":
        return f"{value:.2f}/s"
    return f"{value:.1f} ms"


def format_table(checks: list[Check]) -> str:
    """request type | metric | target | achieved | PASS/FAIL, aligned."""
    rows = [("request type", "metric", "target", "achieved", "PASS/FAIL")]
    for c in checks:
        bound = "<=" if c.metric != "rps" else ">="
        rows.append((c.request_type, c.metric, f"{bound} {_fmt(c.metric, c.target)}", _fmt(c.metric, c.achieved),
                     c.verdict))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [" | ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def checks_to_json(checks: list[Check]) -> list[dict]:
    return [dict(asdict(c), verdict=c.verdict) for c in checks]


def checks_from_json(rows: list[dict]) -> list[Check]:
    return [Check(r["request_type"], r["metric"], r["target"], r["achieved"], r["passed"]) for r in rows]


@dataclass
class Summary:
    """What the locustfile leaves for run.py: the checks plus facts about the run."""

    profile: str
    targets_file: str
    checks: list[dict] = field(default_factory=list)
    achieved: dict[str, dict] = field(default_factory=dict)
    max_inflight: int = 0
    mode: str = "closed"
    seed: int = 0
    traffic_fingerprint: str = ""
    passed: bool = False
