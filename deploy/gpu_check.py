"""`make gpu-check`: the first GPU node's one command (issue 18).

`preflight` (standard library only, well under a second): prints one line naming what this machine
lacks for the check (NVIDIA driver, a visible GPU, Triton's tensorrt backend) and exits 2, or prints
nothing and exits 0. `run`: stages the bundle, starts the entrypoint with `--target gpu` (it builds
the plan, renders the GPU repository and execs Triton), checks `text_embed` and `search_rank`
against the FP32 reference within the fidelity gates, runs perf_analyzer at concurrency 1/8/32 with
100 and 1000 candidates while sampling Triton's GPU utilisation, and writes a short report
(build/reports/gpu_check.{md,json}). Never run on the machine that wrote it (no GPU there).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

NGC_TRITONSERVER = Path("/opt/tritonserver/bin/tritonserver")
# The gates of DESIGN.md: encoder (mean cosine, top-10 neighbour overlap) and end to end (top-10 agreement).
GATES = {"text_embed_mean_cosine": 0.98, "text_embed_top10_overlap": 0.9, "search_rank_top10_agreement": 0.9}


@dataclass(frozen=True)
class GpuCheckSettings:
    profile: str = "ci"  # the ci models build in minutes; the whole check must fit in 8 minutes
    tritonserver: Path = NGC_TRITONSERVER
    perf_analyzer: Path = Path(".venv-perf/bin/perf_analyzer")
    work: Path = Path("build/gpu-check")
    report: Path = Path("build/reports/gpu_check")
    concurrency: tuple[int, ...] = (1, 8, 32)
    candidates: tuple[int, ...] = (100, 1000)
    queries: int = 200  # held-out queries for text_embed / search_rank against the FP32 reference
    perf_requests: int = 300  # per perf_analyzer measurement window
    start_timeout_s: int = 300


# ---- preflight (stdlib only: it must answer in well under a second) -------------------------------

def _gpu_problem() -> str | None:
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "an NVIDIA driver (libcuda.so.1 not found)"
    count = ctypes.c_int()
    if (rc := cuda.cuInit(0)) != 0:
        return f"a usable GPU (cuInit returned CUresult {rc}; check CUDA_VISIBLE_DEVICES)"
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        return "a visible GPU (the driver sees none)"
    return None


def missing(settings: GpuCheckSettings) -> list[str]:
    """What this machine lacks for the check; [] when it can run. Python packages (tensorrt, the
    perf_analyzer venv) are not listed: `make gpu-check` installs those itself."""
    problems = [p for p in [_gpu_problem()] if p]
    backend = settings.tritonserver.parent.parent / "backends" / "tensorrt"
    if not settings.tritonserver.is_file():
        problems.append(f"tritonserver at {settings.tritonserver} (run inside nvcr.io/nvidia/tritonserver)")
    elif not backend.is_dir():
        problems.append(f"Triton's tensorrt backend ({backend})")
    return problems


# ---- the check ------------------------------------------------------------------------------------

@dataclass
class Server:
    process: subprocess.Popen
    grpc: str
    http: str
    metrics: str
    ready_s: float


def stage(settings: GpuCheckSettings):
    from conversion.build_models import built_artifacts
    from deploy.bundle import stage_bundle

    artifacts, dim = built_artifacts(settings.profile)
    return stage_bundle(artifacts, dim, settings.work / "bundle")


def start_server(settings: GpuCheckSettings, bundle) -> Server:
    from search_rank_client import SearchClient
    from model_repository.triton_server import free_ports

    ports = free_ports()
    log_file = open(settings.work / "entrypoint.log", "w")
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "deploy.entrypoint", "--bundle", str(bundle.root), "--target", "gpu",
         "--repository", str(settings.work / "repository"), "--engine-cache", str(settings.work / "engines"),
         "--host", "127.0.0.1", "--http-port", str(ports.http), "--grpc-port", str(ports.grpc),
         "--metrics-port", str(ports.metrics), "--tritonserver", str(settings.tritonserver)],
        stdout=log_file, stderr=subprocess.STDOUT)
    with SearchClient(f"127.0.0.1:{ports.grpc}", timeout_s=30) as c:
        c.wait_ready(timeout_s=settings.start_timeout_s)
    return Server(proc, f"127.0.0.1:{ports.grpc}", f"127.0.0.1:{ports.http}",
                  f"http://127.0.0.1:{ports.metrics}/metrics", time.monotonic() - started)


def stop_server(server: Server) -> None:
    server.process.send_signal(signal.SIGTERM)
    try:
        server.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.process.kill()


def engine_facts(settings: GpuCheckSettings) -> list[dict]:
    facts = []
    for meta_path in sorted((settings.work / "engines").rglob("*.json")):
        meta = json.loads(meta_path.read_text())
        facts.append({"engine": meta.get("engine"), "build_seconds": meta.get("build_seconds"),
                      "plan_mb": round(meta.get("plan_bytes", 0) / 2**20, 1), "key": meta.get("key")})
    return facts


def heldout_texts(settings: GpuCheckSettings) -> tuple[list[str], list[str]]:
    from conversion.build_models import profile_settings
    from conversion.catalog_generator import Catalog, build_catalog
    from conversion.prune_encoder import split_texts

    texts = split_texts(Catalog.load(build_catalog(profile_settings(settings.profile).artifact.catalog)))
    return texts["heldout_queries"][: settings.queries], texts["heldout_titles"][: settings.queries]


def text_embed_fidelity(grpc: str, fp32_encoder_dir: Path, queries: list[str], titles: list[str]) -> dict:
    """Served text_embed against the FP32 export in ONNX Runtime: mean cosine and top-10 overlap."""
    import numpy as np

    from search_rank_client import SearchClient
    from conversion.encoder_report import top_k_overlap
    from model_repository import runtime

    tok = runtime.BucketTokenizer(fp32_encoder_dir / runtime.TOKENIZER_FILE)
    session = runtime.ort_session(fp32_encoder_dir / runtime.ENCODER_FILE)
    ref_q, ref_t = (runtime.encode_texts(tok, session, t) for t in (queries, titles))
    with SearchClient(grpc, timeout_s=30) as c:
        got_q, got_t = (np.stack([c.embed(x) for x in t]) for t in (queries, titles))
    cos = np.concatenate([(got_q * ref_q).sum(1), (got_t * ref_t).sum(1)])
    return {"texts": len(queries) + len(titles), "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
            "top10_overlap": top_k_overlap(ref_q, ref_t, got_q, got_t)}


def search_rank_agreement(grpc: str, profile: str, queries: list[str], candidates: int = 100) -> dict:
    """Served search_rank against the FP32 pipeline (FP32 encoder and ranker, same catalog): top-10 agreement."""
    import numpy as np

    from search_rank_client import SearchClient
    from conversion.build_models import fp32_artifacts
    from conversion.reference_pipeline import ReferencePipeline
    from model_repository.runtime import CatalogTables

    artifacts, _ = fp32_artifacts(profile)
    reference = ReferencePipeline(artifacts.encoder_dir, artifacts.catalog_dir, artifacts.ranker_dir)
    items = CatalogTables.load(artifacts.catalog_dir).item_ids
    rng = np.random.default_rng(0)
    overlaps = []
    with SearchClient(grpc, timeout_s=30) as c:
        for k, query in enumerate(queries):
            cands = [int(x) for x in rng.choice(items, candidates, replace=False)]
            served = {r.item_id for r in c.rank(query, k + 1, cands, top_k=10)}
            expected = {i for i, _ in reference.rank(query, k + 1, cands, top_k=10)}
            overlaps.append(len(served & expected) / 10)
    return {"queries": len(queries), "candidates": candidates, "top10_agreement": float(np.mean(overlaps))}


class GpuUtilisation:
    """Samples Triton's nv_gpu_utilization (0..1) once a second while a measurement runs."""

    def __init__(self, metrics_url: str):
        self.url, self.samples, self._stop = metrics_url, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(1.0):
            try:
                text = urllib.request.urlopen(self.url, timeout=2).read().decode()
            except OSError:
                continue
            values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith("nv_gpu_utilization{")]
            if values:
                self.samples.append(sum(values) / len(values))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def perf_run(settings: GpuCheckSettings, server: Server, item_ids, candidates: int, concurrency: int) -> dict:
    """perf_analyzer against search_rank: client p50/p99 and throughput, GPU utilisation meanwhile."""
    import csv

    import numpy as np

    from model_repository import spec

    rng = np.random.default_rng(candidates)
    data = {"data": [{spec.QUERY.name: [f"query {i}"], spec.USER_ID.name: [i + 1],
                      spec.CANDIDATE_IDS.name: {"content": rng.choice(item_ids, candidates, replace=False).tolist(),
                                                "shape": [candidates]}} for i in range(16)]}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "data.json").write_text(json.dumps(data))
        cmd = [str(settings.perf_analyzer), "-m", spec.SEARCH_RANK, "-i", "grpc", "-u", server.grpc,
               "--input-data", str(Path(tmp) / "data.json"), "--concurrency-range", str(concurrency),
               "--measurement-mode", "count_windows", "--measurement-request-count", str(settings.perf_requests),
               "-s", "20", "--max-trials", "5", "-f", str(Path(tmp) / "out.csv")]
        with GpuUtilisation(server.metrics) as gpu:
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if run.returncode != 0:
            return {"candidates": candidates, "concurrency": concurrency, "error": (run.stderr or run.stdout)[-300:]}
        row = next(csv.DictReader(open(Path(tmp) / "out.csv")))
    return {"candidates": candidates, "concurrency": concurrency,
            "throughput_per_s": float(row["Inferences/Second"]), "p50_ms": float(row["p50 latency"]) / 1e3,
            "p99_ms": float(row["p99 latency"]) / 1e3, "gpu_utilisation": gpu.mean}


def markdown(report: dict) -> str:
    lines = ["# GPU check", "", f"GPU: {report['gpu']}; started {report['date']}; profile {report['profile']}; "
             f"total {report['seconds']:.0f} s (budget 480 s)", "", "| engine | build s | plan MB |", "|---|---|---|"]
    lines += [f"| {e['engine']} | {e['build_seconds']} | {e['plan_mb']} |" for e in report["engines"]]
    lines += ["", f"Server ready after {report['server_ready_s']:.0f} s (engine build included).", "",
              "| check | value | gate | pass |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['value']:.4f} | {v['gate']} | {'PASS' if v['pass'] else 'FAIL'} |"
              for k, v in report["gates"].items()]
    lines += ["", "| candidates | concurrency | p50 ms | p99 ms | req/s | GPU util |", "|---|---|---|---|---|---|"]
    for r in report["perf"]:
        if "error" in r:
            lines.append(f"| {r['candidates']} | {r['concurrency']} | error: {r['error'][:80]} | | | |")
        else:
            util = "" if r["gpu_utilisation"] is None else f"{100 * r['gpu_utilisation']:.0f} %"
            lines.append(f"| {r['candidates']} | {r['concurrency']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                         f"{r['throughput_per_s']:.0f} | {util} |")
    return "\n".join(lines) + "\n"


def run(settings: GpuCheckSettings) -> dict:
    import datetime

    from conversion.build_models import fp32_artifacts
    from conversion.build_trt_engine import probe_target
    from model_repository.runtime import CatalogTables

    started = time.monotonic()
    settings.work.mkdir(parents=True, exist_ok=True)
    bundle = stage(settings)
    server = start_server(settings, bundle)
    try:
        queries, titles = heldout_texts(settings)
        fp32, _ = fp32_artifacts(settings.profile)
        embed = text_embed_fidelity(server.grpc, fp32.encoder_dir, queries, titles)
        ranking = search_rank_agreement(server.grpc, settings.profile, queries[:100])
        items = CatalogTables.load(bundle.artifacts.catalog_dir).item_ids
        perf = [perf_run(settings, server, items, n, c) for n in settings.candidates for c in settings.concurrency]
    finally:
        stop_server(server)
    values = {"text_embed_mean_cosine": embed["mean_cosine"], "text_embed_top10_overlap": embed["top10_overlap"],
              "search_rank_top10_agreement": ranking["top10_agreement"]}
    report = {"gpu": probe_target().gpu_name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "profile": settings.profile, "settings": json.loads(json.dumps(asdict(settings), default=str)),
              "engines": engine_facts(settings), "server_ready_s": server.ready_s, "text_embed": embed,
              "search_rank": ranking, "perf": perf, "seconds": time.monotonic() - started,
              "gates": {k: {"value": v, "gate": GATES[k], "pass": v >= GATES[k]} for k, v in values.items()}}
    settings.report.parent.mkdir(parents=True, exist_ok=True)
    settings.report.with_suffix(".json").write_text(json.dumps(report, indent=2))
    settings.report.with_suffix(".md").write_text(markdown(report))
    return report


def main(argv: list[str] | None = None) -> int:
    d = GpuCheckSettings()
    p = argparse.ArgumentParser(prog="python -m deploy.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=("preflight", "run"))
    p.add_argument("--profile", default=d.profile)
    p.add_argument("--tritonserver", type=Path, default=d.tritonserver)
    p.add_argument("--perf-analyzer", type=Path, default=d.perf_analyzer)
    a = p.parse_args(argv)
    settings = GpuCheckSettings(profile=a.profile, tritonserver=a.tritonserver, perf_analyzer=a.perf_analyzer)
    if problems := missing(settings):
        print(f"gpu-check: this machine lacks {'; '.join(problems)}", file=sys.stderr if a.command == "run" else sys.stdout)
        return 2
    if a.command == "preflight":
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = run(settings)
    print(markdown(report))
    return 0 if all(g["pass"] for g in report["gates"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
