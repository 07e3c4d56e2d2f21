"""Serving-side catalog scale (`make bench-catalog`): 10^5..10^7 items through the real server.

For each size a synthetic catalog artifact is built (conversion.synthetic_catalog: random unit
embeddings, real feature codes), rendered into a copy of the served repository (hard links) and
served by a fresh tritonserver. Measured per size, in one run:

- artifact build time and size on disk;
- start-up: tritonserver launch until `search_rank` and `text_embed` report ready;
- memory of the server process tree after the calls below (/proc smaps_rollup): PSS counts each
  shared page once in total, so it is what the tree holds; RSS counts the mapped catalog once per
  process that touched it; anon is private heap;
- feature lookup for 1000 candidates: in-process p50/p99 of `CatalogTables.candidate_rows` (the
  code the ranker model runs: hash index, gather, back to FP32) on the memory-mapped artifact, the
  same for a binary search over the sorted ids (what the O(1) index replaced), and the server's own
  ranker model's compute time per request (Triton statistics) over `search_rank` calls with 1000
  candidates, whose end-to-end p50 is reported too.

Lookups are measured cold (right after the build) and warm (after the artifact was read once, as
a node does before it takes traffic). A node that maps a catalog from a cold disk pays one disk
read per untouched page until the working set is resident; on a 24 GiB node a 10M x 384 INT8
table (4.4 GB with its index; FP16 7.7 GB) stays in the page cache beside the server.

It also measures what FP16 and INT8 storage cost the ranking on the real catalog: ranker AUC on
the test split and top-10 agreement with FP32 storage over 1000-candidate requests.

    python -m loadtests.catalog_scale --sizes 100000,1000000,10000000 --markdown docs/catalog_scale.md

Exit status 1 when a target is missed (printed PASS/FAIL), 2 on bad input.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from conversion.stages import build_root
from conversion.synthetic_catalog import SyntheticCatalogSettings, build_synthetic_catalog
from loadtests.grpc_load import percentile
from model_repository import spec
from model_repository.runtime import CatalogTables

log = logging.getLogger(__name__)
GIB = 2**30


@dataclass(frozen=True)
class ScaleTargets:
    """Issue 10's serving targets, checked at the largest size measured."""

    items: int = 10_000_000
    max_startup_s: float = 15.0
    max_lookup_p50_ms: float = 1.0
    memory_budget_gib: float = 24.0


@dataclass(frozen=True)
class ScaleSettings:
    sizes: tuple[int, ...] = (100_000, 1_000_000, 10_000_000)
    embedding_dtype: str = "int8"  # a quarter of FP32, ranking unchanged (storage_effect)
    candidates: int = 1000
    lookups: int = 500  # in-process candidate_rows calls per size
    served_calls: int = 200  # search_rank calls per size
    profile: str = "default"
    keep: bool = False  # keep the built artifacts and repositories (several GB at 10M)


def _lookup_ms(fn, requests: list[np.ndarray]) -> tuple[float, float]:
    times = []
    for ids in requests:
        t = time.perf_counter()
        fn(ids)
        times.append((time.perf_counter() - t) * 1e3)
    return percentile(times, 50), percentile(times, 99)


def warm_page_cache(folder: Path, chunk: int = 16 << 20) -> float:
    """Read every file of the artifact once, so its pages are in the page cache; returns seconds.
    What a node does (vmtouch, or reading the catalog once at deploy) before it takes traffic."""
    started = time.perf_counter()
    buffer = bytearray(chunk)
    for path in sorted(folder.iterdir()):
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass
    return time.perf_counter() - started


def candidate_requests(tables: CatalogTables, n: int, candidates: int, seed: int) -> list[np.ndarray]:
    """Random known ids with 2% unknown ones (cold start), as a search backend sends them."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = np.asarray(tables.item_ids)[rng.integers(0, len(tables.item_ids), candidates)]
        ids = np.unique(ids)
        unknown = max(1, len(ids) // 50)
        ids[:unknown] = rng.choice(10**12, unknown, replace=False) + 10**13
        out.append(ids)
    return out


def measure_size(items: int, template: Path, work: Path, settings: ScaleSettings) -> dict:
    from search_rank_client import SearchClient
    from conversion.build_models import built_artifacts
    from model_repository.render import render_repository
    from model_repository.triton_server import TritonServer, TritonSettings, free_ports, tree_memory

    import os

    folder = work / f"catalog-{items}-{settings.embedding_dtype}"
    started = time.perf_counter()
    built = build_synthetic_catalog(folder, template, SyntheticCatalogSettings(items=items,
                                                                              embedding_dtype=settings.embedding_dtype))
    os.sync()  # written back before anything is timed: lookups must not compete with the flush
    built["build_s"] = time.perf_counter() - started
    tables = CatalogTables.load(folder)
    requests = candidate_requests(tables, settings.lookups, settings.candidates, seed=items)
    cold = _lookup_ms(tables.candidate_rows, candidate_requests(tables, 100, settings.candidates, seed=items + 1))
    warm_s = warm_page_cache(folder)
    prefault_s = tables.prefault()  # what the ranker model does on a background thread when it opens a catalog
    hashed = _lookup_ms(tables.candidate_rows, requests)
    binary = _lookup_ms(lambda ids: CatalogTables._rows(tables.item_ids, ids), requests)
    index_only = _lookup_ms(tables.item_rows, requests)
    del tables  # unmapped, so the server's PSS below is not split with this process

    artifacts, dim = built_artifacts(settings.profile)
    repo = render_repository(spec.build_spec(dim), _with_catalog(artifacts, folder), work / f"repo-{items}")
    server = TritonServer(TritonSettings(repository=repo, ports=free_ports(), warm=False))
    started = time.monotonic()
    server.start()
    try:
        server.wait_ready()
        startup_s = time.monotonic() - started
        queries = ["waterproof hiking boots", "usb c charger", "running shoes for women", "kids water bottle"]
        e2e = []
        with SearchClient(server.grpc_url, timeout_s=30) as client:
            client.rank(queries[0], 1, requests[0])  # first call loads ORT kernels: not a lookup cost
            before = _ranker_stats(client)
            for i in range(settings.served_calls):
                t = time.perf_counter()
                client.rank(queries[i % len(queries)], i, requests[i % len(requests)])
                e2e.append((time.perf_counter() - t) * 1e3)
            after = _ranker_stats(client)
        memory = tree_memory(server.process.pid)
    finally:
        server.stop()
    calls = after["count"] - before["count"]
    result = {
        "items": items, "embedding_dtype": settings.embedding_dtype, "artifact_gib": built["bytes"] / GIB,
        "build_s": built["build_s"], "startup_s": startup_s,
        "pss_gib": memory["pss"] / GIB, "rss_gib": memory["rss"] / GIB, "anon_gib": memory["anon"] / GIB,
        "lookup_p50_ms": hashed[0], "lookup_p99_ms": hashed[1], "cold_lookup_p50_ms": cold[0],
        "warm_s": warm_s, "prefault_s": prefault_s,
        "index_p50_ms": index_only[0], "binary_search_p50_ms": binary[0],
        "served_lookup_ms": (after["compute_ns"] - before["compute_ns"]) / max(calls, 1) / 1e6,
        "search_rank_p50_ms": percentile(e2e, 50),
    }
    if not settings.keep:
        shutil.rmtree(folder)
        shutil.rmtree(repo)
    log.info("%s", result)
    return result


def _with_catalog(artifacts, catalog_dir: Path):
    import dataclasses

    return dataclasses.replace(artifacts, catalog_dir=catalog_dir)


def _ranker_stats(client) -> dict:
    stats = client._grpc.get_inference_statistics(model_name=spec.RANKER, as_json=True)
    s = stats["model_stats"][0]["inference_stats"]
    return {"count": int(s["success"].get("count", 0)), "compute_ns": int(s["compute_infer"].get("ns", 0))}


def storage_effect(profile: str = "default", dtypes: tuple[str, ...] = ("float16", "int8"), requests: int = 200,
                   candidates: int = 1000) -> dict:
    """Per stored precision: ranker AUC on the test split and top-10 agreement with FP32 storage
    over random 1000-candidate requests (same ranker, same queries; only the item embeddings are
    stored and read back at that precision)."""
    import dataclasses

    from sklearn.metrics import roc_auc_score

    from conversion.build_models import built_artifacts, profile_settings
    from conversion.catalog_generator import Catalog, build_catalog
    from conversion.train_ranker import encode_queries, join_clicks, onnx_click_prob
    from model_repository.runtime import ort_session, stored_embeddings

    artifacts, _ = built_artifacts(profile)
    settings = profile_settings(profile)
    tables = CatalogTables.load(artifacts.catalog_dir, mmap=False)
    variants = {"float32": tables}
    all_rows = np.arange(len(tables.item_embeddings))
    for dtype in dtypes:
        stored, scales = stored_embeddings(tables.embedding_rows(all_rows), dtype)
        variants[dtype] = dataclasses.replace(tables, item_embeddings=stored, item_embedding_scales=scales)
    catalog = Catalog.load(build_catalog(settings.artifact.catalog))
    queries = encode_queries(catalog.queries, artifacts.encoder_dir)
    test = catalog.split(settings.artifact.catalog.seed)["test"]
    session = ort_session(artifacts.ranker_file, threads=2)
    rng = np.random.default_rng(0)
    draws = [(rng.choice(np.arange(1, len(tables.item_ids) + 1), candidates, replace=False),
              rng.integers(len(queries)), rng.integers(1, len(tables.user_ids) + 1)) for _ in range(requests)]

    def scores(t: CatalogTables, rows, q, u) -> np.ndarray:
        feeds = {spec.query_embedding(0).name: np.repeat(queries[q][None, :], candidates, axis=0),
                 spec.item_embedding(0).name: t.embedding_rows(rows), spec.ITEM_FEATURES.name: t.item_features[rows],
                 spec.USER_FEATURES.name: np.repeat(t.user_features[u][None, :], candidates, axis=0)}
        return session.run(None, feeds)[0].reshape(-1)

    reference = [scores(tables, *d) for d in draws]
    out = {}
    for dtype, t in variants.items():
        data = join_clicks(catalog, dataclasses.replace(t, item_embeddings=t.embedding_rows(all_rows),
                                                        item_embedding_scales=None), queries)
        auc = float(roc_auc_score(data.click.numpy()[test], onnx_click_prob(artifacts.ranker_file, data, test)))
        overlap, diff = [], 0.0
        for d, ref in zip(draws, reference):
            s = scores(t, *d)
            overlap.append(len(set(np.argsort(-s, kind="stable")[:10]) & set(np.argsort(-ref, kind="stable")[:10])) / 10)
            diff = max(diff, float(np.abs(s - ref).max()))
        out[dtype] = {"auc": auc, "top10_agreement": float(np.mean(overlap)), "max_score_diff": diff,
                      "bytes_per_item": int(t.item_embeddings.itemsize * t.embedding_dim
                                            + (4 if t.item_embedding_scales is not None else 0))}
    return {"requests": requests, "candidates": candidates, "by_dtype": out}


def verdicts(results: list[dict], targets: ScaleTargets, machine_gib: float) -> list[tuple[str, bool, str]]:
    largest = max(results, key=lambda r: r["items"])
    at = f"{largest['items']:,} items"
    out = [
        (f"start-up < {targets.max_startup_s:.0f} s at {at}", largest["startup_s"] < targets.max_startup_s,
         f"{largest['startup_s']:.1f} s"),
        (f"1000-candidate lookup p50 < {targets.max_lookup_p50_ms} ms at {at} (in-process)",
         largest["lookup_p50_ms"] < targets.max_lookup_p50_ms, f"{largest['lookup_p50_ms']:.3f} ms"),
        (f"served within {targets.memory_budget_gib:.0f} GiB at {at} (this machine: {machine_gib:.1f} GiB)",
         largest["anon_gib"] + largest["artifact_gib"] < targets.memory_budget_gib,
         f"server private memory {largest['anon_gib']:.2f} GiB + the whole artifact in the page cache "
         f"{largest['artifact_gib']:.2f} GiB"),
    ]
    if largest["items"] < targets.items:
        out = [(name + " (smaller than the target size: informational)", True, value) for name, _, value in out]
    return out


def markdown(results: list[dict], effect: dict | None, checks, command: str) -> str:
    lines = [
        "# Catalog scale: serving 10^5 to 10^7 items",
        "",
        f"Measured on this machine ({platform.machine()}, {_cpus()} CPUs, {_mem_gib():.1f} GiB) with synthetic "
        "artifacts (random unit embeddings, real feature codes), by:",
        "",
        f"    {command}",
        "",
        "| items | storage | artifact GiB | build s | start-up s | server private GiB | server PSS GiB | "
        "cold lookup p50 ms | page-cache warm s | prefault s | lookup p50 / p99 ms | index only p50 ms | binary search p50 ms | "
        "server ranker ms | search_rank p50 ms |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r['items']:,} | {r['embedding_dtype']} | {r['artifact_gib']:.2f} | {r['build_s']:.1f} | "
                     f"{r['startup_s']:.1f} | {r['anon_gib']:.2f} | {r['pss_gib']:.2f} | {r['cold_lookup_p50_ms']:.3f} | "
                     f"{r['warm_s']:.1f} | {r['prefault_s']:.2f} | {r['lookup_p50_ms']:.3f} / "
                     f"{r['lookup_p99_ms']:.3f} | {r['index_p50_ms']:.3f} | {r['binary_search_p50_ms']:.3f} | "
                     f"{r['served_lookup_ms']:.3f} | {r['search_rank_p50_ms']:.1f} |")
    lines += ["", "Lookup: 1000 candidates (2% unknown ids), `CatalogTables.candidate_rows` on the memory-mapped "
              "artifact. \"cold\": right after the build, when this machine has already paged part of the "
              "artifact out (its DAMON reclaim pages out memory idle for 60 s); then the artifact is read once "
              "(\"page-cache warm\") and mapped into the process (\"prefault\": what the ranker model does on a "
              "background thread when it opens a catalog), and everything after runs warm. \"index only\" is the id -> row step alone, \"binary search\" the same step "
              "by `searchsorted` over the sorted ids. \"server ranker\" is Triton's compute time per "
              "ranker request over the search_rank calls: the lookup plus scoring the 1000 rows and keeping the "
              "top K (reported, not judged: the target is the lookup). Build time includes "
              "writing the files back to disk. Server private memory is the anonymous memory of tritonserver "
              "and its stubs; PSS adds the catalog pages they have mapped, which are page cache (shared, "
              "reclaimable; the kernel maps up to 16 neighbouring cached pages on each fault, so PSS overstates "
              "what was read).", ""]
    if effect:
        by = effect["by_dtype"]
        lines += ["## Embedding storage precision on the real catalog", "",
                  f"Same ranker and queries; only the stored item embeddings differ. Agreement: top-10 overlap with "
                  f"FP32 storage over {effect['requests']} requests x {effect['candidates']} candidates.", "",
                  "| storage | bytes per item (d=384) | ranker test AUC | top-10 agreement | largest score difference |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {dtype} | {v['bytes_per_item']} | {v['auc']:.5f} | {v['top10_agreement']:.4f} | "
                  f"{v['max_score_diff']:.2e} |" for dtype, v in by.items()]
        lines.append("")
    lines += ["## Targets", ""] + [f"- {'PASS' if ok else 'FAIL'}: {name}: {value}" for name, ok, value in checks]
    return "\n".join(lines) + "\n"


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


def _mem_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024 / GIB
    return 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.catalog_scale", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100000,1000000,10000000", help="comma-separated item counts")
    p.add_argument("--dtype", choices=CatalogTables.EMBEDDING_DTYPES, default=ScaleSettings.embedding_dtype,
                   help="stored embedding precision")
    p.add_argument("--profile", default="default", help="whose built models serve the synthetic catalogs")
    p.add_argument("--served-calls", type=int, default=200)
    p.add_argument("--skip-storage-effect", action="store_true",
                   help="do not measure the ranking effect of FP16 and INT8 embedding storage")
    p.add_argument("--keep", action="store_true", help="keep the built artifacts (several GB at 10M items)")
    p.add_argument("--markdown", type=Path)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        sizes = tuple(int(s) for s in args.sizes.split(","))
        if not sizes or min(sizes) < 1:
            raise ValueError
    except ValueError:
        print(f"error: --sizes must be comma-separated positive integers, got {args.sizes!r}", file=sys.stderr)
        return 2
    from conversion.build_models import built_artifacts

    try:
        artifacts, _ = built_artifacts(args.profile)
    except (FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    settings = ScaleSettings(sizes=sizes, embedding_dtype=args.dtype, profile=args.profile,
                             served_calls=args.served_calls, keep=args.keep)
    work = build_root() / "catalog_scale"
    work.mkdir(parents=True, exist_ok=True)
    results = [measure_size(n, artifacts.catalog_dir, work, settings) for n in sizes]
    effect = None if args.skip_storage_effect else storage_effect(args.profile)
    checks = verdicts(results, ScaleTargets(), _mem_gib())
    command = "python -m loadtests.catalog_scale " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(results, effect, checks, command)
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"settings": asdict(settings), "results": results, "storage_effect": effect,
                                         "checks": checks}, indent=2))
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
