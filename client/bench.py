"""`make bench`: search_rank latency through the client, one request at a time.

Reports median and tail latency for a fixed query mix; with --url it measures an existing
server, otherwise it starts one on the rendered repository. Numbers from a shared machine are
noisy: compare runs made back to back, never against constants.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
from tqdm import tqdm

from client import SearchClient
from conversion.stages import build_root
from model_repository import spec
from model_repository.runtime import CatalogTables
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m client.bench", description=__doc__.splitlines()[0])
    p.add_argument("--repository", type=Path, default=build_root() / "model_repository")
    p.add_argument("--url", help="measure this running server (host:port) instead of starting one")
    p.add_argument("--candidates", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    item_ids = CatalogTables.load(args.repository / spec.FEATURE_LOOKUP / "1" / "catalog").item_ids
    server_cm = nullcontext(None) if args.url else run_triton_server(args.repository)
    with server_cm as server:
        url = args.url or server.grpc_url
        with SearchClient(url, timeout_s=10.0) as client:
            results = [measure(client, item_ids, n, args.calls) for n in args.candidates]
    for r in results:
        print(f"search_rank, 1 query, {r['candidates']} candidates, {r['calls']} calls: "
              f"median {r['median_ms']:.2f} ms, p90 {r['p90_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
