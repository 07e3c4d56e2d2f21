"""The PNG of a load test: latency percentiles and throughput over time per request type (from
Locust's full stats history), and Triton's per-model queue vs compute time (from the scraped
metrics), so a missed target can be attributed to a pipeline step."""
from __future__ import annotations

import csv
import logging
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on CI or release machines
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from loadtests.metrics import ModelBreakdown  # noqa: E402
from loadtests.targets import Profile  # noqa: E402
from model_repository import spec  # noqa: E402

log = logging.getLogger(__name__)

PERCENTILES = (("50%", "-", "p50"), ("95%", "--", "p95"), ("99%", ":", "p99"))
# Bars top to bottom in pipeline order; the ensembles (whose "compute" is the whole pipeline and
# whose queue is always 0) go last, drawn faint, as the end-to-end reference.
PIPELINE_ORDER = (spec.TOKENIZER, spec.QUERY_ENCODER, spec.RANKER)
ENSEMBLES = (spec.SEARCH_RANK, spec.TEXT_EMBED)


def _order(model: str) -> tuple[int, str]:
    if model in PIPELINE_ORDER:
        return PIPELINE_ORDER.index(model), model
    return len(PIPELINE_ORDER) + (1 if model in ENSEMBLES else 0), model


def read_history(path: Path) -> dict[str, list[dict]]:
    """Rows of Locust's `_stats_history.csv` per request name (full history: one row per name per tick)."""
    out: dict[str, list[dict]] = defaultdict(list)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            out[row["Name"]].append(row)
    return dict(out)


def _num(value: str) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    # Locust writes 0 for a window percentile it cannot compute yet (no cached window).
    return v if v > 0 else None


def plot_report(history_csv: Path, out_png: Path, breakdown: list[ModelBreakdown] | None = None,
                metrics_series: list[tuple[float, ModelBreakdown]] | None = None,
                profile: Profile | None = None, title: str = "") -> Path:
    history = read_history(history_csv) if Path(history_csv).is_file() else {}
    t0 = min((float(r["Timestamp"]) for rows in history.values() for r in rows), default=0.0)
    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    ax_lat, ax_rps, ax_bar, ax_queue = axes.flat
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    names = [n for n in history if n != "Aggregated"]
    for i, name in enumerate(names):
        color = colors[i % len(colors)]
        rows = history[name]
        t = [float(r["Timestamp"]) - t0 for r in rows]
        for col, style, label in PERCENTILES:
            pts = [(x, _num(r[col])) for x, r in zip(t, rows)]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                ax_lat.plot(*zip(*pts), style, color=color, label=f"{name} {label}")
        if profile is not None and name in profile.targets:
            ax_lat.axhline(profile.targets[name].p99_ms, color=color, alpha=0.35, linewidth=1)
        ax_rps.plot(t, [float(r["Requests/s"]) for r in rows], color=color, label=name)
    if "Aggregated" in history:
        rows = history["Aggregated"]
        t = [float(r["Timestamp"]) - t0 for r in rows]
        ax_rps.plot(t, [float(r["Failures/s"]) for r in rows], color="red", linewidth=2, label="failures/s (all)")
    ax_lat.set(title="latency percentiles, ~10 s window (faint lines: p99 targets)", xlabel="s", ylabel="ms")
    ax_lat.set_ylim(bottom=0)
    ax_rps.set(title="throughput per request type", xlabel="s", ylabel="requests/s")
    for ax in (ax_lat, ax_rps):
        if ax.lines:
            ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)

    if breakdown:
        breakdown = sorted(breakdown, key=lambda b: _order(b.model), reverse=True)  # barh draws bottom-up
        for y, b in enumerate(breakdown):
            if b.model in ENSEMBLES:
                # An ensemble's own queue/compute counters do not add up to its latency; its
                # request duration (first step in to last step out) does.
                ax_bar.barh(y, b.request_ms, color="tab:gray", alpha=0.5)
                label = f" {b.request_ms:.1f} ms end to end in Triton"
                end = b.request_ms
            else:
                ax_bar.barh(y, b.queue_ms, color="tab:orange")
                ax_bar.barh(y, b.compute_ms, left=b.queue_ms, color="tab:blue")
                label = f" {b.queue_ms:.1f} + {b.compute_ms:.1f} ms (batch {b.avg_batch:.1f})"
                end = b.queue_ms + b.compute_ms
            ax_bar.text(end, y, label, va="center", fontsize=7)
        ax_bar.set_yticks(range(len(breakdown)),
                          [f"{b.model} (ensemble)" if b.model in ENSEMBLES else b.model for b in breakdown])
        ax_bar.legend(handles=[Patch(color="tab:orange", label="queue"),
                               Patch(color="tab:blue", label="compute (input+infer+output)"),
                               Patch(color="tab:gray", alpha=0.5, label="ensemble: request duration")], fontsize=8)
    else:
        ax_bar.text(0.5, 0.5, "no Triton metrics scraped", ha="center", va="center", transform=ax_bar.transAxes)
    ax_bar.set(title="Triton per model, mean per request over the run", xlabel="ms")

    if metrics_series:
        per_model: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for t_end, row in metrics_series:
            if row.model in ENSEMBLES:
                continue  # an ensemble does not queue; its composing models do
            per_model[row.model].append((t_end - t0 if t0 else t_end, row.queue_ms))
        for i, (model, pts) in enumerate(sorted(per_model.items(), key=lambda kv: _order(kv[0]))):
            ax_queue.plot(*zip(*pts), color=colors[i % len(colors)], label=model)
        ax_queue.legend(fontsize=7)
    else:
        ax_queue.text(0.5, 0.5, "no Triton metrics scraped", ha="center", va="center", transform=ax_queue.transAxes)
    ax_queue.set(title="Triton queue time per request, composing models", xlabel="s", ylabel="ms")
    ax_queue.grid(alpha=0.3)

    fig.suptitle(title or "load test")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    log.info("wrote %s", out_png)
    return Path(out_png)
