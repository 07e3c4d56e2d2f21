"""Top-k selection: candidates ordered by predicted click probability (ties keep request order)."""
from __future__ import annotations

import numpy as np

from model_repository import spec
from model_repository.backends.common import BadRequest


def top_k_value(top_k: np.ndarray | None, n: int) -> int:
    """How many of `n` candidates to return: TOP_K when given (checked), else all of them."""
    if top_k is None:
        return n
    if top_k.size != 1:
        raise BadRequest(f"{spec.TOP_K.name} must hold one value, got {top_k.size}")
    k = int(top_k.reshape(-1)[0])
    if k < 1:
        raise BadRequest(f"{spec.TOP_K.name} must be >= 1, got {k}")
    return min(k, n)


def select_top_k(probs: np.ndarray, candidates: np.ndarray, top_k: np.ndarray | int | None
                 ) -> tuple[np.ndarray, np.ndarray]:
    k = top_k if isinstance(top_k, int) else top_k_value(top_k, len(candidates))
    order = top_k_order(probs.reshape(-1), k)
    return candidates[order].astype(np.int64), probs.reshape(-1)[order].astype(np.float32)


def top_k_order(p: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest of `p`, descending, ties in index order: the first k of a stable
    descending sort. Only the rows at or above the k-th largest value are sorted (10 of 1000 is a
    fifth of a full sort's time); NaNs, if any, fall back to the full sort, which puts them last."""
    negated = -p
    if k < len(p):
        kth = np.partition(negated, k - 1)[k - 1]
        contenders = np.flatnonzero(negated <= kth)  # ascending: ties stay in index order
        if len(contenders) >= k:
            return contenders[np.argsort(negated[contenders], kind="stable")[:k]]
    return np.argsort(negated, kind="stable")[:k]
