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

    def _pack(self, encodings, width: int) -> tuple[np.ndarray, np.ndarray]:
        ids = np.full((len(encodings), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        for row, e in enumerate(encodings):
            ids[row, : len(e.ids)] = e.ids
            mask[row, : len(e.ids)] = 1
        return ids, mask

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask, int64 [len(texts), bucket]."""
        encodings = self._tok.encode_batch(list(texts))
        return self._pack(encodings, self.bucket_for(max(len(e.ids) for e in encodings)))

    def encode_grouped(self, texts: Sequence[str], pad_to_bucket: bool = True
                       ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(rows, ids, mask) per sequence bucket present among `texts`, each text padded only to its
        own bucket: one long text must not make a batch of short queries pay for 128 positions.

        `pad_to_bucket=False` pads each group only to its longest text. For ONNX Runtime on CPU,
        where any length runs without a rebuild, that saves the padding's compute (16-17% of the
        served encoder's time on the seeded search traffic, embeddings equal within 3e-8: padded
        positions are masked out). Engines with fixed shapes (TensorRT profiles, CUDA graphs) need
        the bucket widths."""
        encodings = self._tok.encode_batch(list(texts))
        lengths = np.array([len(e.ids) for e in encodings])
        buckets = np.array([self.bucket_for(n) for n in lengths])
        groups = []
        for width in np.unique(buckets):
            rows = np.flatnonzero(buckets == width)
            pad = int(width) if pad_to_bucket else int(lengths[rows].max())
            groups.append((rows, *self._pack([encodings[r] for r in rows], pad)))
        return groups


def ort_session(onnx_path: Path | str | bytes, threads: int = 1, providers: Sequence[str] = ("CPUExecutionProvider",),
                disabled_optimizers: Sequence[str] = (), optimized_model_path: Path | str | None = None):
    """An ONNX Runtime session of a file (or a serialized model); `providers` in priority order
    (offline jobs may pass CUDA/TensorRT). `disabled_optimizers` names ORT graph rewrites to skip
    (spec.CPU_ENCODER_DISABLED_OPTIMIZERS says why the encoder may skip one); `optimized_model_path`
    saves the graph ORT runs, for inspection."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    # Triton runs several model instances side by side; inter-op parallelism would oversubscribe.
    opts.inter_op_num_threads = 1
    # Five python-backend stubs share the cores; idle ORT threads that spin-wait for work would
    # steal them from whichever model is running.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized_model_path is not None:
        opts.optimized_model_filepath = str(optimized_model_path)
    model = onnx_path if isinstance(onnx_path, bytes) else str(onnx_path)
    return ort.InferenceSession(model, opts, providers=list(providers), disabled_optimizers=list(disabled_optimizers))


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


class ItemIndex:
    """Item id -> table row in O(1): an open-addressing hash table (linear probing) over the ids.

    A sorted-id `searchsorted` costs log2(n) dependent reads per id (24 at 10M items, each a page
    of a memory-mapped file that may be cold); here an id costs one read of WINDOW adjacent keys
    (one cache line or two). Both arrays are .npy files the server memory-maps. The table is at
    most half full and probing does not wrap around (the arrays run on past the hashed range and
    end in empty slots), so one vectorised gather of a window per id resolves almost every id
    (993 of 1000 at 1M items); the few whose probe run is longer finish in a scalar loop.
    """

    EMPTY = -1  # ids are >= 0 (the ranker refuses negative ones)
    KEYS, ROWS = "item_index_keys.npy", "item_index_rows.npy"
    WINDOW = 8

    def __init__(self, keys: np.ndarray, rows: np.ndarray, bits: int, max_probe: int):
        from numpy.lib.stride_tricks import sliding_window_view

        self.keys, self.rows, self.bits, self.max_probe = keys, rows, int(bits), int(max_probe)
        self._windows = sliding_window_view(keys, self.WINDOW)  # a view: nothing is read here

    @staticmethod
    def _slots(ids: np.ndarray, bits: int) -> np.ndarray:
        # Fibonacci hashing, as user_bucket: the top bits spread sequential ids evenly.
        product = ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        return (product >> np.uint64(64 - bits)).astype(np.int64)

    @classmethod
    def build(cls, item_ids: np.ndarray) -> "ItemIndex":
        """Index of unique ids; the id at position i maps to row i + 1 (row 0 is the cold-start row)."""
        item_ids = np.asarray(item_ids, dtype=np.int64)
        bits = max(4, int(2 * max(len(item_ids), 1) - 1).bit_length())
        keys = np.full((1 << bits) + 2 * cls.WINDOW, cls.EMPTY, dtype=np.int64)
        rows = np.zeros(len(keys), dtype=np.int64 if len(item_ids) >= 2**31 else np.int32)
        pending = np.arange(len(item_ids))
        slots = cls._slots(item_ids, bits)
        probe = 0
        # All pending ids try their current slot at once; one claimant per free slot wins, the
        # others move one slot on. Rounds = the longest probe run, so the build is O(n * rounds).
        while len(pending):
            free = np.flatnonzero(keys[slots] == cls.EMPTY)
            _, first = np.unique(slots[free], return_index=True)
            won = free[first]
            keys[slots[won]] = item_ids[pending[won]]
            rows[slots[won]] = pending[won] + 1
            keep = np.ones(len(pending), dtype=bool)
            keep[won] = False
            pending, slots = pending[keep], slots[keep] + 1
            probe += 1
            if len(slots) and slots.max() + 2 * cls.WINDOW > len(keys):  # a run near the end: grow
                keys = np.concatenate([keys, np.full(cls.WINDOW * 8, cls.EMPTY, np.int64)])
                rows = np.concatenate([rows, np.zeros(cls.WINDOW * 8, rows.dtype)])
        # Every window starting at a hashed slot or inside a run must exist, and the arrays must
        # end in an empty slot so that a scalar probe always stops.
        used = np.flatnonzero(keys != cls.EMPTY)
        end = max(1 << bits, (int(used[-1]) + 1) if len(used) else 0) + cls.WINDOW
        return cls(keys[:end], rows[:end], bits, probe)

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Rows of `ids` (int64), COLD_START_ROW for ids not in the index."""
        flat = np.asarray(ids, dtype=np.int64).reshape(-1)
        starts = self._slots(flat, self.bits)
        found = self._windows[starts]
        hit = found == flat[:, None]
        at = hit.argmax(axis=1)
        got = hit[np.arange(flat.size), at]
        out = np.where(got, self.rows[starts + at], COLD_START_ROW).astype(np.int64)
        missed = np.flatnonzero(~got)
        if missed.size:
            # An empty slot in the window ends the probe run: that id is not in the table.
            run_on = missed[~(found[missed] == self.EMPTY).any(axis=1)]
            for i in run_on.tolist():
                out[i] = self._probe(int(flat[i]), int(starts[i]) + self.WINDOW)
        return out.reshape(np.shape(ids))

    def _probe(self, item_id: int, slot: int) -> int:
        while True:
            key = int(self.keys[slot])
            if key == item_id:
                return int(self.rows[slot])
            if key == self.EMPTY:
                return COLD_START_ROW
            slot += 1

    def save(self, folder: Path) -> dict:
        np.save(folder / self.KEYS, self.keys)
        np.save(folder / self.ROWS, self.rows)
        return {"item_index": {"bits": self.bits, "max_probe": self.max_probe}}

    @classmethod
    def load(cls, folder: Path, meta: dict, mmap: bool = True) -> "ItemIndex | None":
        """The saved index, or None for an artifact written before there was one."""
        info = meta.get("item_index")
        if info is None or not (folder / cls.KEYS).is_file():
            return None
        mode = "r" if mmap else None
        return cls(np.load(folder / cls.KEYS, mmap_mode=mode), np.load(folder / cls.ROWS, mmap_mode=mode),
                   info["bits"], info["max_probe"])


def stored_embeddings(block: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows of float embeddings in the catalog's storage precision: (rows, per-row scales or None).

    int8 is symmetric per row: a row's largest magnitude maps to 127, so a unit vector keeps about
    two and a half significant digits per element (docs/catalog.md measures the ranking effect).
    """
    if dtype != "int8":
        return block.astype(dtype), None
    scales = np.abs(block).max(axis=1) / 127.0
    safe = np.where(scales > 0, scales, 1.0)
    return np.rint(block / safe[:, None]).astype(np.int8), scales.astype(np.float32)


@dataclass
class CatalogTables:
    """The catalog artifact: sorted id arrays plus feature tables whose row 0 is the cold-start row.

    Files are plain .npy so the serving side memory-maps them instead of copying: start-up does not
    read the tables, and every model instance (and replica on the node) shares the page cache.
    Item embeddings are stored float32 or float16 (`embedding_rows` returns float32 either way).
    """

    item_ids: np.ndarray  # int64 [n] sorted
    item_embeddings: np.ndarray  # float32, float16 or int8 [n + 1, d]
    item_features: np.ndarray  # int64 [n + 1, len(ITEM_FEATURE_COLUMNS)]
    user_ids: np.ndarray  # int64 [m] sorted
    user_features: np.ndarray  # int64 [m + 1, len(USER_FEATURE_COLUMNS)]
    item_index: ItemIndex | None = None  # O(1) id -> row; None: binary search on item_ids
    item_embedding_scales: np.ndarray | None = None  # float32 [n + 1]: int8 rows times their scale

    FILES = ("item_ids", "item_embeddings", "item_features", "user_ids", "user_features")
    EMBEDDING_DTYPES = ("float32", "float16", "int8")
    SCALES = "item_embedding_scales"
    TITLES = "item_titles.json"
    META = "catalog_meta.json"

    @property
    def embedding_dim(self) -> int:
        return int(self.item_embeddings.shape[1])

    def save(self, folder: Path, titles: Sequence[str] | None = None, meta: dict | None = None) -> None:
        """Write every table (and the item index, built here) into `folder`.

        A table that already is a memmap of its own destination file (a large artifact filled in
        place, conversion.synthetic_catalog) is flushed, not rewritten."""
        folder = Path(folder)
        if self.item_embeddings.dtype.name not in self.EMBEDDING_DTYPES:
            raise ValueError(f"item_embeddings must be one of {self.EMBEDDING_DTYPES}, got {self.item_embeddings.dtype}")
        if (self.item_embeddings.dtype == np.int8) != (self.item_embedding_scales is not None):
            raise ValueError("int8 item_embeddings need item_embedding_scales (and only they do)")
        if self.item_embedding_scales is not None:
            np.save(folder / f"{self.SCALES}.npy", np.ascontiguousarray(self.item_embedding_scales, dtype=np.float32))
        for name in self.FILES:
            array, path = getattr(self, name), folder / f"{name}.npy"
            if isinstance(array, np.memmap) and array.filename and Path(array.filename).resolve() == path.resolve():
                array.flush()
            else:
                np.save(path, np.ascontiguousarray(array))
        index = self.item_index or ItemIndex.build(self.item_ids)
        index_meta = index.save(folder)
        if titles is not None:
            (folder / self.TITLES).write_text(json.dumps(list(titles)))
        (folder / self.META).write_text(json.dumps({
            "items": len(self.item_ids), "users": len(self.user_ids), "embedding_dim": self.embedding_dim,
            "embedding_dtype": self.item_embeddings.dtype.name, **index_meta, **(meta or {}),
        }, indent=2))

    @classmethod
    def load(cls, folder: Path | str, mmap: bool = True) -> "CatalogTables":
        folder = Path(folder)
        mode = "r" if mmap else None
        meta_path = folder / cls.META
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        tables = {name: np.load(folder / f"{name}.npy", mmap_mode=mode) for name in cls.FILES}
        scales = folder / f"{cls.SCALES}.npy"
        if scales.is_file():
            tables["item_embedding_scales"] = np.load(scales, mmap_mode=mode)
        return cls(**tables, item_index=ItemIndex.load(folder, meta, mmap))

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
        ids = np.asarray(item_ids, dtype=np.int64)
        if self.item_index is not None:
            return self.item_index.lookup(ids)
        return self._rows(self.item_ids, ids)

    def user_rows(self, user_ids: np.ndarray) -> np.ndarray:
        return self._rows(self.user_ids, np.asarray(user_ids, dtype=np.int64))

    def embedding_rows(self, rows: np.ndarray) -> np.ndarray:
        """float32 [len(rows), d], whatever the stored precision. For offline readers and references:
        the served ranker feeds rows as stored and widens them in its graph (backends/ranker_graph.py)."""
        if self.item_embedding_scales is not None:
            return np.multiply(self.item_embeddings[rows], self.item_embedding_scales[rows, None], dtype=np.float32)
        return np.asarray(self.item_embeddings[rows], dtype=np.float32)

    def prefault(self) -> float:
        """Map every page of the item tables into this process now; returns seconds.

        A memory-mapped page costs a page fault the first time a process touches it, even when the
        file is in the page cache: at 10M items that is most of a 1000-candidate lookup until
        the server has touched the whole table. Reading one byte per page maps it all (the kernel
        maps up to 16 neighbouring cached pages per fault); numpy releases the GIL while it reads,
        so the ranker does this on a background thread and serves meanwhile."""
        import time

        started = time.perf_counter()
        arrays = [self.item_embeddings, self.item_embedding_scales, self.item_features]
        if self.item_index is not None:
            arrays += [self.item_index.keys, self.item_index.rows]
        for array in arrays:
            if array is not None and array.size:
                np.asarray(array).reshape(-1).view(np.uint8)[::4096].sum()
        return time.perf_counter() - started

    def candidate_rows(self, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ranker graph inputs of one request's candidates: float32 embeddings
        [n, d] and item features [n, k], cold-start rows for unknown ids."""
        rows = self.item_rows(item_ids)
        return self.embedding_rows(rows), np.ascontiguousarray(self.item_features[rows])


# ---- catalog store: versions a running ranker can switch between --------------------
#
# <store>/versions/<name>/  one catalog artifact per version (a folder of CatalogTables files)
# <store>/CURRENT           the active version's name; replaced atomically (os.replace) to swap

CATALOG_VERSIONS = "versions"
CATALOG_CURRENT = "CURRENT"


def active_catalog(store: Path | str) -> Path:
    store = Path(store)
    name = (store / CATALOG_CURRENT).read_text().strip()
    return store / CATALOG_VERSIONS / name


def served_catalog_dir(repository: Path | str) -> Path:
    """The catalog artifact a rendered repository's ranker serves now (the store folder
    itself when there is no CURRENT: a repository not rendered yet, so that loading it fails
    naming that folder)."""
    store = Path(repository) / spec.CATALOG_MODEL / "1" / CATALOG_FOLDER
    return active_catalog(store) if (store / CATALOG_CURRENT).is_file() else store
