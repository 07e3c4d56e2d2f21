"""Synthetic catalog artifacts of any size, for measuring the serving side at 10^5..10^7 items.

Embeddings are random unit vectors (encoding speed is measured separately, with real titles, by
loadtests.bench_item_encoding); item features are rows drawn from a real artifact (the template)
so every code is inside the ranker's embedding tables, and the item-id hash feature is computed
for the synthetic ids; users are the template's. The embedding table is filled in chunks straight
into its memory-mapped .npy file, so a 10M x 384 table never sits in memory, and the folder
appears only once complete. Nothing of this size is committed: build it where you measure.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from conversion.stages import atomic_folder
from model_repository.runtime import CatalogTables, stored_embeddings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyntheticCatalogSettings:
    items: int
    embedding_dtype: str = "float16"
    seed: int = 0
    chunk_rows: int = 500_000
    max_id_gap: int = 16  # ids are sparse (gaps 1..max_id_gap), as real catalogs' are

    def __post_init__(self):
        if self.items < 1:
            raise ValueError(f"items must be >= 1, got {self.items}")
        if self.embedding_dtype not in CatalogTables.EMBEDDING_DTYPES:
            raise ValueError(f"embedding_dtype must be one of {CatalogTables.EMBEDDING_DTYPES}")


def build_synthetic_catalog(out: Path, template: Path, settings: SyntheticCatalogSettings,
                            progress: bool = True) -> dict:
    """Write the artifact to `out` (replacing it); returns build facts (seconds, bytes)."""
    from conversion.ranker_model import item_bucket

    started = time.perf_counter()
    out = Path(out)
    with atomic_folder(out) as tmp:
        source = CatalogTables.load(template)
        rng = np.random.default_rng(settings.seed)
        n, d = settings.items, source.embedding_dim
        item_ids = np.cumsum(rng.integers(1, settings.max_id_gap + 1, n, dtype=np.int64))
        features = np.zeros((n + 1, source.item_features.shape[1]), dtype=np.int64)
        features[1:] = np.asarray(source.item_features)[rng.integers(1, len(source.item_features), n)]
        features[1:, -1] = item_bucket(item_ids)  # spec.ITEM_FEATURE_COLUMNS ends with item_bucket
        emb = np.lib.format.open_memmap(tmp / "item_embeddings.npy", mode="w+",
                                        dtype=settings.embedding_dtype, shape=(n + 1, d))
        emb[0] = 0  # the cold-start row
        scales = np.zeros(n + 1, dtype=np.float32) if settings.embedding_dtype == "int8" else None
        for start in tqdm(range(0, n, settings.chunk_rows), desc="synthetic embeddings", disable=not progress,
                          mininterval=1.0):
            rows = min(settings.chunk_rows, n - start)
            block = rng.standard_normal((rows, d), dtype=np.float32)
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            stored, block_scales = stored_embeddings(block, settings.embedding_dtype)
            emb[1 + start: 1 + start + rows] = stored
            if scales is not None:
                scales[1 + start: 1 + start + rows] = block_scales
        tables = CatalogTables(item_ids=item_ids, item_embeddings=emb, item_features=features,
                               user_ids=np.asarray(source.user_ids), user_features=np.asarray(source.user_features),
                               item_embedding_scales=scales)
        tables.save(tmp, meta={"synthetic": True, "seed": settings.seed, "template": str(template)})
        del emb, tables
    size = sum(p.stat().st_size for p in out.iterdir())
    return {"items": settings.items, "build_s": time.perf_counter() - started, "bytes": size,
            "embedding_dtype": settings.embedding_dtype}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m conversion.synthetic_catalog", description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, required=True, help="number of items")
    p.add_argument("--template", type=Path, required=True,
                   help="a real catalog artifact whose feature rows and users are reused")
    p.add_argument("--out", type=Path, required=True, help="artifact folder to write")
    p.add_argument("--dtype", choices=CatalogTables.EMBEDDING_DTYPES, default="float16",
                   help="stored embedding precision")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = SyntheticCatalogSettings(items=args.items, embedding_dtype=args.dtype, seed=args.seed)
        if not (args.template / "item_ids.npy").is_file():
            raise ValueError(f"--template {args.template} is not a catalog artifact (no item_ids.npy)")
        facts = build_synthetic_catalog(args.out, args.template, settings)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {facts['items']} items, {facts['bytes'] / 2**30:.2f} GiB, {facts['build_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
