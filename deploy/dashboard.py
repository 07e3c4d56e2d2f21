"""Generate the Grafana dashboard for the bundle (deploy/k8s/base/dashboards/search-rank.json).

Model names come from the pipeline spec, so a renamed model cannot leave a panel querying nothing;
tests/deploy checks the committed JSON equals this output and that every metric it queries is one
a real tritonserver exports. Panels: request and failure rates, latency by pipeline step, queue vs
compute time, the autoscaling signal, batch sizes, pending requests, CPU and GPU use, and the
query embedding cache's hit rate.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from model_repository import spec

DASHBOARD = Path(__file__).resolve().parent / "k8s" / "base" / "dashboards" / "search-rank.json"
UID = "searchrank-triton"
# The public ensembles (what a client request enters) and the steps behind them.
ENSEMBLES = (spec.SEARCH_RANK, spec.TEXT_EMBED)
# Both renderings' steps: the CPU one has query_encoder and ranker, the GPU one adds the tokenizer.
STEPS = (spec.TOKENIZER, spec.QUERY_ENCODER, spec.RANKER)
# Exported only by a server with GPUs and --allow-gpu-metrics (the CPU server in the tests has none).
GPU_ONLY_METRICS = ("nv_gpu_utilization", "nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes")

_SEL = 'namespace=~"$namespace", pod=~"$pod"'
_RATE = "[$__rate_interval]"


def _models(names) -> str:
    return "|".join(names)


def queue_us_per_request(by: str = "pod") -> str:
    """The autoscaling signal, as the Prometheus Adapter rule computes it (per pod)."""
    return (f"sum by ({by}) (rate(nv_inference_queue_duration_us{{{_SEL}}}{_RATE}))"
            f" / clamp_min(sum by ({by}) (rate(nv_inference_request_success{{{_SEL}, model=~\"{_models(ENSEMBLES)}\"}}"
            f"{_RATE})), 0.001)")


def _per_request(metric: str, models, by: str = "model") -> str:
    sel = f'{_SEL}, model=~"{_models(models)}"'
    return (f"sum by ({by}) (rate({metric}{{{sel}}}{_RATE}))"
            f" / clamp_min(sum by ({by}) (rate(nv_inference_request_success{{{sel}}}{_RATE})), 0.001)")


def _panel(pid: int, title: str, targets: list[tuple[str, str]], unit: str, x: int, y: int, w: int = 12,
           description: str = "") -> dict:
    return {
        "id": pid, "type": "timeseries", "title": title, "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": w, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "right", "calcs": ["mean", "max"]}},
        "targets": [{"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend}
                    for i, (expr, legend) in enumerate(targets)],
    }


def dashboard() -> dict:
    ens = f'{_SEL}, model=~"{_models(ENSEMBLES)}"'
    steps_batching = list(STEPS)
    panels = [
        _panel(1, "Requests/s by ensemble", [
            (f"sum by (model) (rate(nv_inference_request_success{{{ens}}}{_RATE}))", "{{model}}")], "reqps", 0, 0),
        _panel(2, "Failures/s by ensemble and reason", [
            (f"sum by (model, reason) (rate(nv_inference_request_failure{{{ens}}}{_RATE}))", "{{model}} {{reason}}")],
            "reqps", 12, 0),
        _panel(3, "Latency per request by pipeline step (in Triton)", [
            (_per_request("nv_inference_request_duration_us", ENSEMBLES + STEPS), "{{model}}")], "µs", 0, 8,
            description="Average server-side time per request, queue + compute; ensembles include their steps."),
        _panel(4, "Queue vs compute per request, by step", [
            (_per_request("nv_inference_queue_duration_us", STEPS), "queue {{model}}"),
            (_per_request("nv_inference_compute_infer_duration_us", STEPS), "compute {{model}}"),
            (_per_request("nv_inference_compute_input_duration_us", STEPS), "input {{model}}"),
            (_per_request("nv_inference_compute_output_duration_us", STEPS), "output {{model}}")], "µs", 12, 8),
        _panel(5, "Queue time per request by pod (autoscaling signal)", [
            (queue_us_per_request("pod"), "{{pod}}")], "µs", 0, 16,
            description="What the HPA scales on (searchrank_queue_us_per_request via Prometheus Adapter)."),
        _panel(6, "Average batch size by model", [
            (f"sum by (model) (rate(nv_inference_count{{{_SEL}, model=~\"{_models(steps_batching)}\"}}{_RATE}))"
             f" / clamp_min(sum by (model) (rate(nv_inference_exec_count{{{_SEL}, model=~\"{_models(steps_batching)}\"}}"
             f"{_RATE})), 0.001)", "{{model}}")], "short", 12, 16,
            description="Inferences per model execution: what the dynamic batcher achieves."),
        _panel(7, "Pending requests by model", [
            (f"sum by (model) (nv_inference_pending_request_count{{{_SEL}}})", "{{model}}")], "short", 0, 24),
        _panel(8, "CPU utilisation by pod", [
            (f"avg by (pod) (nv_cpu_utilization{{{_SEL}}})", "{{pod}}")], "percentunit", 12, 24),
        _panel(9, "GPU utilisation by pod (GPU nodes)", [
            (f"avg by (pod) (nv_gpu_utilization{{{_SEL}}})", "{{pod}}")], "percentunit", 0, 32),
        _panel(10, "GPU memory used by pod (GPU nodes)", [
            (f"sum by (pod) (nv_gpu_memory_used_bytes{{{_SEL}}})", "used {{pod}}"),
            (f"sum by (pod) (nv_gpu_memory_total_bytes{{{_SEL}}})", "total {{pod}}")], "bytes", 12, 32),
        _panel(11, "Query embedding cache hit rate by pod (CPU nodes)", [
            (f"sum by (pod) (rate({spec.CACHE_LOOKUPS_METRIC}{{{_SEL}, result=\"hit\"}}{_RATE}))"
             f" / clamp_min(sum by (pod) (rate({spec.CACHE_LOOKUPS_METRIC}{{{_SEL}}}{_RATE})), 0.001)", "{{pod}}")],
            "percentunit", 0, 40,
            description="Share of query texts the CPU query encoder answered from its embedding cache "
                        "(docs/architecture.md); what it buys depends on how often queries repeat."),
    ]
    variables = [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
        {"name": "namespace", "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
         "query": "label_values(nv_inference_request_success, namespace)", "refresh": 2, "includeAll": False},
        {"name": "pod", "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
         "query": 'label_values(nv_inference_request_success{namespace=~"$namespace"}, pod)', "refresh": 2,
         "includeAll": True, "multi": True, "allValue": ".*"},
    ]
    return {
        "uid": UID, "title": "Search ranking (Triton)", "tags": ["triton", "search-ranking"],
        "schemaVersion": 39, "version": 1, "editable": True, "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"}, "timezone": "utc",
        "templating": {"list": variables}, "panels": panels, "annotations": {"list": []},
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.dashboard", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DASHBOARD, help=f"default: {DASHBOARD}")
    p.add_argument("--check", action="store_true", help="exit 1 if the file differs from what would be written")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text() if args.out.is_file() else ""
        if current != text:
            print(f"error: {args.out} is out of date; run python -m deploy.dashboard", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
