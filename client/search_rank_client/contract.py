"""The serving contract that callers depend on (DESIGN.md), owned here.

The server's pipeline spec (`model_repository.spec`) imports these names instead of spelling
them again, so a service that installs only this package and the server that renders its
configs cannot disagree on a tensor name, a dtype or a limit.
"""
from __future__ import annotations

from dataclasses import dataclass

# Triton data types as the KServe protocol spells them (tritonclient uses these strings).
BYTES, INT32, INT64, FP32 = "BYTES", "INT32", "INT64", "FP32"


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    # Per-request dims; a batching model's batch axis is not included (Triton convention).
    dims: tuple[int, ...]
    optional: bool = False


# ---- limits ----------------------------------------------------------------------------------
MAX_CANDIDATES = 1000
# Longer queries are rejected rather than silently truncated at the byte level.
MAX_QUERY_BYTES = 2048

# ---- the two public ensembles -----------------------------------------------------------------
SEARCH_RANK = "search_rank"
TEXT_EMBED = "text_embed"

QUERY = Tensor("QUERY", BYTES, (1,))
USER_ID = Tensor("USER_ID", INT64, (1,))
CANDIDATE_IDS = Tensor("CANDIDATE_IDS", INT64, (-1,))
TOP_K = Tensor("TOP_K", INT32, (1,), optional=True)
ITEM_IDS = Tensor("ITEM_IDS", INT64, (-1,))
SCORES = Tensor("SCORES", FP32, (-1,))
TEXT = Tensor("TEXT", BYTES, (1,))


def text_embedding(dim: int) -> Tensor:
    """text_embed's output; `dim` is the served encoder's width (-1 where the caller need not know it)."""
    return Tensor("EMBEDDING", FP32, (dim,))


# What Triton answers (UNAVAILABLE / HTTP 503) when a model's queue policy refuses a request. A busy
# or CPU-starved server refuses even a lone request this way when its trip through the ensemble runs
# past the queue timeout; it is retryable (RetryPolicy retries UNAVAILABLE).
ADMISSION_REFUSAL = "Request timeout expired"
