"""A request's ids checked, and the catalog tables the ranker reads candidate rows from.

The tables come from the catalog store in the ranker's version folder
(model_repository.catalog_store): before each batch the ranker stats the store's CURRENT file and,
when it was replaced, opens the version it names and serves from it. A version that cannot be
opened is logged and the old one keeps serving: a bad upload must not fail requests.
"""
from __future__ import annotations

import os
import threading

import numpy as np

from model_repository import spec
from model_repository.backends.common import BadRequest
from model_repository import runtime
from model_repository.runtime import CatalogTables


def validate_ids(user_id: np.ndarray, candidates: np.ndarray, max_candidates: int) -> None:
    if user_id.size != 1:
        raise BadRequest(f"{spec.USER_ID.name} must hold exactly one id, got {user_id.size}")
    if int(user_id.reshape(-1)[0]) < 0:
        raise BadRequest(f"{spec.USER_ID.name} must be >= 0, got {int(user_id.reshape(-1)[0])}")
    name = spec.CANDIDATE_IDS.name
    if candidates.ndim != 1:
        raise BadRequest(f"{name} must be 1-D [N], got shape {list(candidates.shape)}")
    n = len(candidates)
    if n == 0 or n > max_candidates:
        raise BadRequest(f"{name} has {n} ids; between 1 and {max_candidates} are accepted")
    negative = np.flatnonzero(candidates < 0)
    if len(negative):
        i = int(negative[0])
        raise BadRequest(f"{name} must be >= 0; index {i} is {int(candidates[i])}")
    ordered = np.sort(candidates)  # a sort and one comparison: np.unique's counts cost half as much again
    repeats = ordered[1:] == ordered[:-1]
    if repeats.any():
        dup = np.unique(ordered[1:][repeats])
        raise BadRequest(f"{name} contains duplicate ids ({len(dup)} repeated, e.g. {int(dup[0])})")


class CatalogReloader:
    """The tables of the store's active version, reopened when CURRENT is replaced."""

    def __init__(self, store, embedding_dim: int, log):
        self.pointer = store / runtime.CATALOG_CURRENT
        self.store, self.embedding_dim, self.log = store, embedding_dim, log
        self.version, self.tables, self._stamp = None, None, None
        self.refresh(required=True)

    def refresh(self, required: bool = False) -> None:
        st = os.stat(self.pointer)
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        folder = runtime.active_catalog(self.store)
        try:
            # Memory-mapped: instances share the page cache instead of each holding a copy, and
            # opening a 10M-item catalog reads only its headers.
            tables = CatalogTables.load(folder, mmap=True)
            if tables.embedding_dim != self.embedding_dim:
                raise ValueError(f"{tables.embedding_dim}-dim embeddings, the ranker takes {self.embedding_dim}")
        except (OSError, ValueError, KeyError) as e:
            if required:
                raise
            self.log.log_error(f"catalog {folder.name} not served, keeping {self.version}: {e}")
            return
        self.version, self.tables = folder.name, tables
        self.log.log_info(f"serving catalog {folder.name} ({len(tables.item_ids)} items)")
        threading.Thread(target=self._prefault, args=(tables, folder.name), daemon=True).start()

    def _prefault(self, tables, name: str) -> None:
        try:
            self.log.log_info(f"catalog {name}: every page mapped in {tables.prefault():.2f} s")
        except Exception as e:  # a failed warm-up only costs speed, never requests
            self.log.log_error(f"catalog {name}: prefault failed: {e}")
