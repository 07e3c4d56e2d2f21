"""Triton's Prometheus metrics during a load test: scrape, parse, and break latency down per model.

Triton's per-model counters are cumulative (microseconds summed over requests), so the average
queue or compute time per request over the run is a ratio of deltas between the first and the
last scrape; consecutive scrapes give the same ratio per interval (a time series). Composing
models report their own counters, which is what attributes a latency miss to a pipeline step.
"""
from __future__ import annotations

import csv
import logging
import re
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from model_repository import spec

log = logging.getLogger(__name__)

SUCCESS = "nv_inference_request_success"
FAILURE = "nv_inference_request_failure"
COUNT = "nv_inference_count"
EXEC_COUNT = "nv_inference_exec_count"
QUEUE_US = "nv_inference_queue_duration_us"
COMPUTE_INPUT_US = "nv_inference_compute_input_duration_us"
COMPUTE_INFER_US = "nv_inference_compute_infer_duration_us"
COMPUTE_OUTPUT_US = "nv_inference_compute_output_duration_us"
REQUEST_US = "nv_inference_request_duration_us"
WANTED = (SUCCESS, FAILURE, COUNT, EXEC_COUNT, QUEUE_US, COMPUTE_INPUT_US, COMPUTE_INFER_US, COMPUTE_OUTPUT_US,
          REQUEST_US)

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

Counters = dict[tuple[str, str], float]  # (metric, model) -> value, summed over versions


def _samples(text: str) -> Iterator[tuple[str, dict[str, str], float]]:
    """(metric, labels, value) of every sample line in Prometheus text exposition format."""
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        yield m.group(1), dict(_LABEL.findall(m.group(2) or "")), value


# The query encoder's embedding-cache counters, kept per result ("hit", "miss") as metric
# "<name>:<result>", summed over the model's instances.
CACHE_HIT, CACHE_MISS = f"{spec.CACHE_LOOKUPS_METRIC}:hit", f"{spec.CACHE_LOOKUPS_METRIC}:miss"


def parse_prometheus(text: str, wanted: tuple[str, ...] = WANTED) -> Counters:
    """Per-model values of the wanted metrics (and the embedding cache's hits and misses) from
    Prometheus text exposition format."""
    out: Counters = {}
    for name, labels, value in _samples(text):
        model = labels.get("model")
        if name == spec.CACHE_LOOKUPS_METRIC and labels.get("result") in ("hit", "miss"):
            name = f"{name}:{labels['result']}"
        elif name not in wanted:
            continue
        if model is None:
            continue
        key = (name, model)
        out[key] = out.get(key, 0.0) + value
    return out


def cache_lookups(text: str, model: str) -> dict[str, float]:
    """{"hit": n, "miss": n} of `model`'s embedding cache, summed over its instances (zeros where
    the server exports none: the cache is off, or the stubs have not reported yet)."""
    counters = parse_prometheus(text, wanted=())
    return {"hit": counters.get((CACHE_HIT, model), 0.0), "miss": counters.get((CACHE_MISS, model), 0.0)}


@dataclass(frozen=True)
class Sample:
    t: float  # unix time of the scrape
    counters: Counters


@dataclass(frozen=True)
class ModelBreakdown:
    model: str
    requests: float  # successful requests over the window
    queue_ms: float  # average per request
    compute_input_ms: float
    compute_infer_ms: float
    compute_output_ms: float
    request_ms: float  # end-to-end inside Triton, per request
    avg_batch: float  # inferences per execution (1.0 for non-batching models)
    cache_hit_share: float | None = None  # embedding-cache hits / lookups; None: no cache lookups

    @property
    def compute_ms(self) -> float:
        return self.compute_input_ms + self.compute_infer_ms + self.compute_output_ms


def breakdown(first: Sample, last: Sample) -> list[ModelBreakdown]:
    """Per-model averages over the window between two scrapes (models with requests in it)."""
    def delta(metric: str, model: str) -> float:
        return last.counters.get((metric, model), 0.0) - first.counters.get((metric, model), 0.0)

    rows = []
    for model in sorted({m for (_, m) in last.counters}):
        n = delta(SUCCESS, model)
        if n <= 0:
            continue
        execs = delta(EXEC_COUNT, model)
        hits = delta(CACHE_HIT, model)
        lookups = hits + delta(CACHE_MISS, model)
        rows.append(ModelBreakdown(
            model=model, requests=n,
            queue_ms=delta(QUEUE_US, model) / n / 1000, compute_input_ms=delta(COMPUTE_INPUT_US, model) / n / 1000,
            compute_infer_ms=delta(COMPUTE_INFER_US, model) / n / 1000,
            compute_output_ms=delta(COMPUTE_OUTPUT_US, model) / n / 1000,
            request_ms=delta(REQUEST_US, model) / n / 1000,
            avg_batch=delta(COUNT, model) / execs if execs > 0 else 0.0,
            cache_hit_share=hits / lookups if lookups > 0 else None))
    return rows


def series(samples: list[Sample]) -> list[tuple[float, ModelBreakdown]]:
    """Per-interval breakdowns: (interval end time, model row) for each consecutive pair of scrapes."""
    return [(b.t, row) for a, b in zip(samples, samples[1:]) for row in breakdown(a, b)]


def fetch(url: str, timeout_s: float = 2.0) -> str:
    """The metrics endpoint's text."""
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return resp.read().decode("utf-8", errors="replace")


def scrape(url: str, timeout_s: float = 2.0) -> Counters:
    return parse_prometheus(fetch(url, timeout_s))


@dataclass
class MetricsScraper:
    """Polls a metrics endpoint on a background thread from start() until stop()."""

    url: str
    interval_s: float = 1.0
    samples: list[Sample] = field(default_factory=list)
    errors: int = 0
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def start(self) -> "MetricsScraper":
        self._poll()  # baseline before any load, so the deltas cover exactly the run
        self._thread = threading.Thread(target=self._loop, name="triton-metrics", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[Sample]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._poll()
        return self.samples

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._poll()

    def _poll(self) -> None:
        try:
            self.samples.append(Sample(time.time(), scrape(self.url)))
        except OSError as e:  # a missed scrape only coarsens the series; the run goes on
            self.errors += 1
            if self.errors in (1, 10, 100):
                log.warning("scraping %s failed (%d so far): %s", self.url, self.errors, e)


def write_samples_csv(path: Path, samples: list[Sample]) -> None:
    """Raw counters, long format: one row per (scrape, metric, model)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["timestamp", "metric", "model", "value"])
        for s in samples:
            for (metric, model), value in sorted(s.counters.items()):
                w.writerow([f"{s.t:.3f}", metric, model, value])


def write_breakdown_csv(path: Path, rows: list[ModelBreakdown]) -> None:
    with open(path, "w", newline="") as f:
        fields = list(ModelBreakdown.__dataclass_fields__) + ["compute_ms"]
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow(dict(asdict(r), compute_ms=r.compute_ms))


def format_breakdown(rows: list[ModelBreakdown]) -> str:
    lines = [f"{'model':<16} {'requests':>9} {'queue ms':>9} {'compute ms':>10} {'in-Triton ms':>12} {'avg batch':>9} "
             f"{'cache hits':>10}"]
    for r in rows:
        hits = "-" if r.cache_hit_share is None else f"{100 * r.cache_hit_share:.0f}%"
        lines.append(f"{r.model:<16} {r.requests:>9.0f} {r.queue_ms:>9.2f} {r.compute_ms:>10.2f} "
                     f"{r.request_ms:>12.2f} {r.avg_batch:>9.1f} {hits:>10}")
    return "\n".join(lines)
