"""Catalog versions inside a model repository, and the swap to a new one without a restart.

The ranker model's version folder holds a catalog store (layout in
`model_repository.runtime`): one folder per catalog version and a CURRENT file naming the active
one. `swap` installs a new artifact beside the served one (hard links when on the same disk, so a
10M-item catalog installs in milliseconds), checks it, and replaces CURRENT atomically. Each
ranker instance notices the change before its next batch, opens the new tables
(memory-mapped: no copy, no pause) and answers from them from then on; requests already in a
batch finish on the old tables, which stay valid while mapped even once pruned.

Why not Triton's own model versions: the ensemble pins the ranker and model control is off by
default (docs/reliability.md), so a new version folder needs a reload of the whole model, its
Python stub and its config. A catalog is data, not a model: swapping a pointer is enough.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from model_repository import runtime, spec
from model_repository.runtime import CATALOG_CURRENT, CATALOG_VERSIONS, CatalogTables, active_catalog

log = logging.getLogger(__name__)


class CatalogSwapError(ValueError):
    """The new catalog cannot replace the served one (missing files, wrong embedding size)."""


def store_dir(repository: Path | str) -> Path:
    return Path(repository) / spec.CATALOG_MODEL / "1" / runtime.CATALOG_FOLDER


def place(src: Path, dst: Path) -> None:
    """Hard-link files when possible (large files, same disk), copy otherwise; never a symlink, so
    a repository copied into a container image stays whole. Stage bookkeeping is left behind."""
    if src.is_dir():
        dst.mkdir(parents=True, exist_ok=True)
        for child in src.iterdir():
            if child.name != "settings.json":
                place(child, dst / child.name)
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def check_catalog(folder: Path, embedding_dim: int | None = None) -> dict:
    """The artifact's meta, after checking it opens and fits the served ranker."""
    try:
        tables = CatalogTables.load(folder)
        meta = json.loads((folder / CatalogTables.META).read_text())
    except (OSError, ValueError, KeyError) as e:
        raise CatalogSwapError(f"{folder} is not a catalog artifact: {e}") from None
    if embedding_dim is not None and tables.embedding_dim != embedding_dim:
        raise CatalogSwapError(f"{folder} has {tables.embedding_dim}-dim embeddings; the served models "
                               f"expect {embedding_dim}")
    if len(tables.item_embeddings) != len(tables.item_ids) + 1:
        raise CatalogSwapError(f"{folder}: {len(tables.item_embeddings)} embedding rows for "
                               f"{len(tables.item_ids)} items (expected one more: the cold-start row)")
    return meta


def install(store: Path, artifact: Path, name: str | None = None) -> str:
    """Place `artifact` in the store as version `name` (default: its folder name); not yet active."""
    name = name or artifact.name
    if not name or "/" in name or name.startswith("."):
        raise CatalogSwapError(f"bad catalog version name {name!r}")
    target = store / CATALOG_VERSIONS / name
    if target.exists():
        return name
    tmp = target.with_name(f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        place(artifact, tmp)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return name


def activate(store: Path, name: str) -> None:
    """Make version `name` the served one: an atomic replace of CURRENT."""
    if not (store / CATALOG_VERSIONS / name).is_dir():
        raise CatalogSwapError(f"no catalog version {name!r} in {store}")
    tmp = store / f".{CATALOG_CURRENT}.tmp-{os.getpid()}"
    tmp.write_text(name + "\n")
    os.replace(tmp, store / CATALOG_CURRENT)


def create_store(store: Path, artifact: Path) -> str:
    """A new store serving `artifact` (used when a repository is rendered)."""
    (store / CATALOG_VERSIONS).mkdir(parents=True, exist_ok=True)
    name = install(store, artifact)
    activate(store, name)
    return name


def prune(store: Path, keep: int = 2) -> list[str]:
    """Delete all but the `keep` newest versions (never the active one); returns what was removed.
    Instances still mapping a removed version keep reading it until they switch: unlinked files
    live on while mapped."""
    current = active_catalog(store).name
    versions = sorted((p for p in (store / CATALOG_VERSIONS).iterdir() if p.is_dir() and not p.name.startswith(".")),
                      key=lambda p: p.stat().st_mtime, reverse=True)
    removed = [p.name for p in versions[keep:] if p.name != current]
    for name in removed:
        shutil.rmtree(store / CATALOG_VERSIONS / name)
    return removed


def swap(repository: Path | str, artifact: Path | str, name: str | None = None, keep: int = 2) -> str:
    """Install `artifact` into `repository` and serve it from the next batch on; returns its version name."""
    store, artifact = store_dir(repository), Path(artifact)
    if not (store / CATALOG_CURRENT).is_file():
        raise CatalogSwapError(f"{repository} has no catalog store (render it with model_repository.render)")
    served = CatalogTables.load(active_catalog(store))
    check_catalog(artifact, served.embedding_dim)
    name = install(store, artifact, name)
    activate(store, name)
    log.info("serving catalog %s", name)
    if keep:
        prune(store, keep)
    return name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model_repository.catalog_store",
                                description="Serve a new catalog artifact from a (running) repository without a restart.")
    p.add_argument("--repository", type=Path, required=True, help="rendered model repository")
    p.add_argument("--catalog", type=Path, required=True, help="catalog artifact folder to serve")
    p.add_argument("--name", help="version name (default: the artifact folder's name)")
    p.add_argument("--keep", type=int, default=2, help="versions kept in the store (0: keep all)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        name = swap(args.repository, args.catalog, args.name, args.keep)
    except (CatalogSwapError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
