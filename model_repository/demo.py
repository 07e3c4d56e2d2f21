"""`make demo`: start Triton on the rendered repository, rank sample queries, print them, stop."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from search_rank_client import SearchClient
from model_repository.paths import build_root
from model_repository.runtime import CatalogTables, served_catalog_dir
from model_repository.triton_server import TritonStartError, run_triton_server

SAMPLE_QUERIES = (
    ("waterproof hiking boots", 0),
    ("noise cancelling headphones", 1),
    ("cast iron frying pan", 2),
    ("red running shoes", 3),
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model_repository.demo", description=__doc__)
    p.add_argument("--repository", type=Path, default=build_root() / "model_repository")
    p.add_argument("--candidates", type=int, default=200, help="candidates per query, drawn from the catalog")
    p.add_argument("--top-k", type=int, default=5)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    catalog_dir = served_catalog_dir(args.repository)
    if not catalog_dir.is_dir():
        print(f"error: no rendered repository at {args.repository} (run `make models`)", file=sys.stderr)
        return 2
    titles = CatalogTables.load_titles(catalog_dir)
    tables = CatalogTables.load(catalog_dir)
    rng = np.random.default_rng(0)
    try:
        with run_triton_server(args.repository) as server, SearchClient(server.grpc_url) as client:
            print(f"\ntritonserver ready on {server.grpc_url}; ranking {args.candidates} random catalog items per query\n")
            for query, user_row in SAMPLE_QUERIES:
                user_id = int(tables.user_ids[user_row])
                candidates = rng.choice(tables.item_ids, size=args.candidates, replace=False)
                ranked = client.rank(query, user_id, candidates, top_k=args.top_k)
                print(f'query "{query}"  (user {user_id})')
                for pos, item in enumerate(ranked, 1):
                    print(f"  {pos}. {item.score:.3f}  {item.item_id:>8}  {titles.get(item.item_id, '<cold start>')}")
                print()
    except TritonStartError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("tritonserver stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
