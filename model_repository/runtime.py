"""Runtime pieces that the served models use and that offline jobs must reproduce exactly.

The tokenizer model, the item-encoding job and ranker training all tokenize with
`BucketTokenizer` and encode with `encode_texts`; the feature-lookup model and ranker
training both read features through `CatalogTables`. One implementation each, so offline
and online features cannot drift apart.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from model_repository import spec

log = logging.getLogger(__name__)

# ---- file names shared by the stage folders and the rendered repository ------------------------
# The conversion stages write these names and the python-backend models read them from their
# version folder, so render copies files across without renaming.
TOKENIZER_FILE = "tokenizer.json"
ENCODER_FILE = "encoder.onnx"
RANKER_FILE = "ranker.onnx"
CATALOG_FOLDER = "catalog"


def served_catalog_dir(repository: Path | str) -> Path:
    """Where a rendered repository keeps the feature-lookup model's catalog artifact."""
    return Path(repository) / spec.FEATURE_LOOKUP / "1" / CATALOG_FOLDER


# ---- text ----------------------------------------------------------------------------------


class BucketTokenizer:
    """HF `tokenizers` with padding to the smallest fixed bucket that holds the longest text."""

    def __init__(self, tokenizer_json: Path | str, buckets: Sequence[int] = spec.SEQ_BUCKETS):
        from tokenizers import Tokenizer

        self.buckets = tuple(sorted(buckets))
        self._tok = Tokenizer.from_file(str(tokenizer_json))
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=self.buckets[-1])
        pad = self._tok.token_to_id("[PAD]")
        self.pad_id = 0 if pad is None else pad

    def bucket_for(self, length: int) -> int:
        for b in self.buckets:
            if length <= b:
                return b
        return self.buckets[-1]

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask, int64 [len(texts), bucket]."""
        encodings = self._tok.encode_batch(list(texts))
        width = self.bucket_for(max(len(e.ids) for e in encodings))
        ids = np.full((len(encodings), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        for row, e in enumerate(encodings):
            ids[row, : len(e.ids)] = e.ids
            mask[row, : len(e.ids)] = 1
        return ids, mask


def ort_session(onnx_path: Path | str, threads: int = 1, providers: Sequence[str] = ("CPUExecutionProvider",)):
    """An ONNX Runtime session; `providers` in priority order (offline jobs may pass CUDA/TensorRT)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    # Triton runs several model instances side by side; inter-op parallelism would oversubscribe.
    opts.inter_op_num_threads = 1
    # Five python-backend stubs share the cores; idle ORT threads that spin-wait for work would
    # steal them from whichever model is running.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(onnx_path), opts, providers=list(providers))


def encode_texts(tokenizer: BucketTokenizer, session, texts: Sequence[str], batch_size: int = 64,
                 progress: bool = False, desc: str = "encoding") -> np.ndarray:
    """Embeddings [len(texts), d] in input order; batches are formed by length to limit padding."""
    from tqdm import tqdm

    lengths = np.array([len(t) for t in texts])
    order = np.argsort(lengths, kind="stable")
    out: np.ndarray | None = None
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, mininterval=1.0):
        rows = order[start : start + batch_size]
        ids, mask = tokenizer.encode([texts[i] for i in rows])
        emb = session.run([spec.text_embedding(0).name],
                          {spec.INPUT_IDS.name: ids, spec.ATTENTION_MASK.name: mask})[0]
        if out is None:
            out = np.empty((len(texts), emb.shape[1]), dtype=np.float32)
        out[rows] = emb
    assert out is not None, "no texts to encode"
    return out


# ---- catalog tables ------------------------------------------------------------------------

USER_BUCKET_BITS = 13
N_USER_BUCKETS = 1 << USER_BUCKET_BITS
COLD_START_ROW = 0  # row 0 of every table: unknown item / default user


def user_bucket(user_ids: np.ndarray) -> np.ndarray:
    """Stable hash of user ids into 1..N_USER_BUCKETS (0 stays 'unknown').

    Fibonacci hashing: the top bits of id * 2^64/phi spread sequential ids evenly (the middle
    bits do not).
    """
    h = (np.asarray(user_ids, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(64 - USER_BUCKET_BITS)
    return h.astype(np.int64) + 1


@dataclass
class CatalogTables:
    """The catalog artifact: sorted id arrays plus feature tables whose row 0 is the cold-start row.

    Files are plain .npy so the serving side memory-maps them instead of copying.
    """

    item_ids: np.ndarray  # int64 [n] sorted
    item_embeddings: np.ndarray  # float32 [n + 1, d]
    item_features: np.ndarray  # int64 [n + 1, len(ITEM_FEATURE_COLUMNS)]
    user_ids: np.ndarray  # int64 [m] sorted
    user_features: np.ndarray  # int64 [m + 1, len(USER_FEATURE_COLUMNS)]

    FILES = ("item_ids", "item_embeddings", "item_features", "user_ids", "user_features")
    TITLES = "item_titles.json"
    META = "catalog_meta.json"

    @property
    def embedding_dim(self) -> int:
        return int(self.item_embeddings.shape[1])

    def save(self, folder: Path, titles: Sequence[str] | None = None, meta: dict | None = None) -> None:
        for name in self.FILES:
            np.save(folder / f"{name}.npy", np.ascontiguousarray(getattr(self, name)))
        if titles is not None:
            (folder / self.TITLES).write_text(json.dumps(list(titles)))
        (folder / self.META).write_text(json.dumps({
            "items": len(self.item_ids), "users": len(self.user_ids), "embedding_dim": self.embedding_dim,
            **(meta or {}),
        }, indent=2))

    @classmethod
    def load(cls, folder: Path | str, mmap: bool = True) -> "CatalogTables":
        folder = Path(folder)
        mode = "r" if mmap else None
        return cls(**{name: np.load(folder / f"{name}.npy", mmap_mode=mode) for name in cls.FILES})

    @staticmethod
    def load_titles(folder: Path | str) -> dict[int, str]:
        folder = Path(folder)
        ids = np.load(folder / "item_ids.npy")
        return dict(zip(ids.tolist(), json.loads((folder / CatalogTables.TITLES).read_text())))

    @staticmethod
    def _rows(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(sorted_ids, ids)
        pos_clipped = np.minimum(pos, len(sorted_ids) - 1)
        found = (pos < len(sorted_ids)) & (sorted_ids[pos_clipped] == ids)
        return np.where(found, pos_clipped + 1, COLD_START_ROW)

    def item_rows(self, item_ids: np.ndarray) -> np.ndarray:
        return self._rows(self.item_ids, np.asarray(item_ids, dtype=np.int64))

    def user_rows(self, user_ids: np.ndarray) -> np.ndarray:
        return self._rows(self.user_ids, np.asarray(user_ids, dtype=np.int64))
