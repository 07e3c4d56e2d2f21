"""`make bench`: search_rank latency through the client, one request at a time.

Reports median and tail latency for a fixed query mix; with --url it measures an existing
server, otherwise it starts one on the rendered repository. Numbers from a shared machine are
noisy: compare runs made back to back, never against constants.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
from tqdm import tqdm

from search_rank_client import SearchClient
from conversion.stages import build_root
from loadtests import traffic
from model_repository import spec
from model_repository.runtime import CatalogTables, served_catalog_dir
from model_repository.triton_server import run_triton_server

QUERIES = ("red running shoes", "waterproof hiking boots", "noise cancelling headphones", "cast iron frying pan")


def measure(client: SearchClient, item_ids: np.ndarray, candidates: int, calls: int, warmup: int = 20) -> dict:
    rng = np.random.default_rng(0)
    sets = [rng.choice(item_ids, size=candidates, replace=False) for _ in range(8)]
    for i in range(warmup):
        client.rank(QUERIES[i % len(QUERIES)], 1, sets[i % len(sets)])
    latencies = []
    for i in tqdm(range(calls), desc=f"search_rank x{candidates}", mininterval=1.0):
        t0 = time.perf_counter()
        client.rank(QUERIES[i % len(QUERIES)], int(i), sets[i % len(sets)])
        latencies.append((time.perf_counter() - t0) * 1000)
    ms = np.array(latencies)
    return {"candidates": candidates, "calls": calls, "median_ms": float(np.median(ms)),
            "p90_ms": float(np.percentile(ms, 90)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean())}


def fixed_requests(item_ids: np.ndarray, candidates: int) -> list[traffic.RankRequest]:
    """The fixed query mix above, each with its own seeded draw of `candidates` catalog items."""
    rng = np.random.default_rng(0)
    return [traffic.RankRequest(traffic.size_class_name(candidates), q, i + 1,
                               rng.choice(item_ids, candidates, replace=False), None)
            for i, q in enumerate(QUERIES)]


def perf_input_data(requests: list[traffic.RankRequest]) -> dict:
    """perf_analyzer's --input-data for these search_rank requests, in order."""
    rows = []
    for r in requests:
        row = {spec.QUERY.name: [r.query], spec.USER_ID.name: [int(r.user_id)],
               spec.CANDIDATE_IDS.name: {"content": r.candidate_ids.astype(np.int64).tolist(),
                                         "shape": [len(r.candidate_ids)]}}
        if r.top_k is not None:
            row[spec.TOP_K.name] = [int(r.top_k)]
        rows.append(row)
    return {"data": rows}


def perf_analyzer(binary: Path, url: str, requests: list[traffic.RankRequest], concurrency: int = 1,
                  csv_file: Path | None = None) -> str:
    """Triton's own load tool on a server speaking the KServe v2 gRPC protocol (Triton, or the naive
    service), `concurrency` requests in flight, cycling through `requests`; `csv_file` gets its
    summary (read_perf_csv). A benchmark that compares it with another load generator must pass the
    same requests: query length moves the encoder's cost several-fold (a 4-word query against the
    seeded traffic's tail of 100-token ones)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(perf_input_data(requests), f)
    env = dict(os.environ)
    # perf_analyzer links libcudart even without a GPU; the nvidia-cuda-runtime wheel in its venv has it.
    cudart = next(binary.resolve().parent.parent.glob("lib/python3*/site-packages/nvidia/cuda_runtime/lib"), None)
    if cudart is not None:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(cudart), env.get("LD_LIBRARY_PATH")]))
    cmd = [str(binary), "-m", spec.SEARCH_RANK, "-i", "grpc", "-u", url, "--input-data", f.name,
           "--concurrency-range", str(concurrency), "--measurement-mode", "count_windows", "--measurement-request-count", "200",
           # Loose stability: on a shared 2-core box windows rarely agree within perf_analyzer's default 10%.
           "-s", "50", "--max-trials", "20", "--percentile", "99"]
    if csv_file is not None:
        cmd += ["-f", str(csv_file)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    finally:
        os.unlink(f.name)
    if out.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed ({out.returncode}): {out.stderr.strip() or out.stdout[-2000:]}")
    return out.stdout


def read_perf_csv(path: Path) -> dict[str, float]:
    """Throughput (infer/s) and p50/p99 latency (ms) from perf_analyzer's `-f` file (last row)."""
    import csv

    with open(path, newline="") as f:
        row = list(csv.DictReader(f))[-1]
    return {"infer_per_s": float(row["Inferences/Second"]), "p50_ms": float(row["p50 latency"]) / 1000,
            "p99_ms": float(row["p99 latency"]) / 1000}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.latency", description=__doc__.splitlines()[0])
    p.add_argument("--repository", type=Path, default=build_root() / "model_repository")
    p.add_argument("--url", help="measure this running server (host:port) instead of starting one")
    p.add_argument("--candidates", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--perf-analyzer", type=Path, help="also run this perf_analyzer binary against the same server")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    item_ids = CatalogTables.load(served_catalog_dir(args.repository)).item_ids
    server_cm = nullcontext(None) if args.url else run_triton_server(args.repository)
    with server_cm as server:
        url = args.url or server.grpc_url
        with SearchClient(url, timeout_s=10.0) as client:
            results = [measure(client, item_ids, n, args.calls) for n in args.candidates]
        for r in results:
            print(f"search_rank, 1 query, {r['candidates']} candidates, {r['calls']} calls: "
                  f"median {r['median_ms']:.2f} ms, p90 {r['p90_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms", flush=True)
        print(json.dumps(results), flush=True)
        failed = False
        for n in args.candidates if args.perf_analyzer else []:
            print(f"\nperf_analyzer, search_rank, {n} candidates, concurrency 1:", flush=True)
            try:
                report = perf_analyzer(args.perf_analyzer, url, fixed_requests(item_ids, n))
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                print(f"error: {e}", file=sys.stderr)
                failed = True
                continue
            print("\n".join(line for line in report.splitlines() if "latency" in line.lower() or "Throughput" in line))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
