"""Criteo-style click logs: a streaming TSV loader and a CLI that trains the DCN-v2 ranker on them.

Format (the Criteo Display Advertising Challenge layout), one impression per line, tab-separated:

    label (0/1) <TAB> 13 integer features <TAB> 26 categorical features (hex strings)

Any feature may be empty (missing); the label may not. The file is read in chunks of
`chunk_rows` lines and never held whole, so it can be larger than memory. Integer features are
log-transformed (sign(x) * log(1 + |x|); missing -> 0); categoricals are parsed as hex numbers and
hashed into 2^bits buckets with the same function as the served item- and user-id features
(`conversion.ranker_model.hash_bucket`), missing -> the cold-start bucket 0. Train/validation/
test membership is a hash of the line number and a seed: deterministic, no shuffling pass, and
the same for every chunk size.

    python -m conversion.criteo --tsv day_0.tsv --epochs 2 --out build/criteo_metrics.json
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from conversion.ranker_model import CriteoRanker, CriteoRankerShape, DCNShape, hash_bucket

log = logging.getLogger(__name__)

N_DENSE = 13
N_CAT = 26
N_FIELDS = 1 + N_DENSE + N_CAT
SPLITS = ("train", "val", "test")


class CriteoFormatError(ValueError):
    """A line of the TSV does not follow the format; the message names file and line number."""


@dataclass(frozen=True)
class SplitRule:
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.1

    def __post_init__(self):
        if not (0 <= self.val_fraction and 0 <= self.test_fraction and self.val_fraction + self.test_fraction < 1):
            raise ValueError(f"split fractions must be >= 0 and sum to < 1, got val {self.val_fraction}, "
                             f"test {self.test_fraction}")


def split_codes(line_numbers: np.ndarray, rule: SplitRule) -> np.ndarray:
    """0 train, 1 val, 2 test per (1-based) line number: a hash of the line and the seed."""
    bits = 24
    u = (hash_bucket(np.asarray(line_numbers, dtype=np.int64) + (rule.seed << 40), bits) - 1) / float(1 << bits)
    return np.where(u < rule.test_fraction, 2, np.where(u < rule.test_fraction + rule.val_fraction, 1, 0)).astype(np.int8)


@dataclass
class CriteoChunk:
    line: np.ndarray  # int64 [n], 1-based line numbers in the file
    label: np.ndarray  # float32 [n]
    dense: np.ndarray  # float32 [n, 13], log-transformed, missing -> 0
    cats: np.ndarray  # int64 [n, 26], hashed buckets 1..2^bits, missing -> 0

    def __len__(self) -> int:
        return len(self.line)


def transform_dense(raw: np.ndarray) -> np.ndarray:
    """sign(x) * log1p(|x|) (counts span orders of magnitude; a few Criteo columns go negative);
    NaN (missing) -> 0."""
    out = np.sign(raw) * np.log1p(np.abs(raw))
    return np.nan_to_num(out, nan=0.0).astype(np.float32)


_INT = re.compile(r"-?[0-9]+")
_HEX = re.compile(r"[0-9a-fA-F]{1,16}")  # 16 hex digits = the 64 bits the hash takes


@dataclass
class _Rows:
    """Parsed rows waiting to become a chunk."""

    line: list[int] = field(default_factory=list)
    label: list[float] = field(default_factory=list)
    dense: list[list[float]] = field(default_factory=list)
    cats: list[list[int]] = field(default_factory=list)
    missing: list[list[bool]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.line)

    def chunk(self, hash_bits: int) -> CriteoChunk:
        missing = np.array(self.missing, dtype=bool).reshape(-1, N_CAT)
        hashed = hash_bucket(np.array(self.cats, dtype=np.uint64).reshape(-1, N_CAT), hash_bits)
        hashed[missing] = 0  # the cold-start bucket, as for unknown ids in serving
        return CriteoChunk(line=np.array(self.line, dtype=np.int64), label=np.array(self.label, dtype=np.float32),
                           dense=transform_dense(np.array(self.dense, dtype=np.float64).reshape(-1, N_DENSE)),
                           cats=hashed)


def _parse_into(rows: _Rows, line: str, lineno: int, path: Path) -> None:
    fields = line.rstrip("\r\n").split("\t")
    if len(fields) != N_FIELDS:
        raise CriteoFormatError(f"{path}:{lineno}: expected {N_FIELDS} tab-separated fields (label, {N_DENSE} "
                                f"integer, {N_CAT} categorical), got {len(fields)}")
    if fields[0] not in ("0", "1"):
        raise CriteoFormatError(f"{path}:{lineno}: label must be 0 or 1, got {fields[0]!r}")
    dense = []
    for j, x in enumerate(fields[1:1 + N_DENSE]):
        if x and not _INT.fullmatch(x):
            raise CriteoFormatError(f"{path}:{lineno}: integer feature I{j + 1} is not an integer: {x!r}")
        dense.append(float(x) if x else np.nan)
    cats, missing = [], []
    for j, x in enumerate(fields[1 + N_DENSE:]):
        if x and not _HEX.fullmatch(x):
            raise CriteoFormatError(f"{path}:{lineno}: categorical feature C{j + 1} is not a hex string of "
                                    f"1 to 16 digits: {x!r}")
        cats.append(int(x, 16) if x else 0)
        missing.append(not x)
    rows.line.append(lineno)
    rows.label.append(float(fields[0]))
    rows.dense.append(dense)
    rows.cats.append(cats)
    rows.missing.append(missing)


def iter_chunks(path: Path | str, chunk_rows: int = 65536, hash_bits: int = 16, split: str | None = None,
                rule: SplitRule = SplitRule()) -> Iterator[CriteoChunk]:
    """Parsed chunks of at most `chunk_rows` rows of one split (all rows if split is None).

    Every line is parsed and checked, whichever split is asked for, so a malformed line fails
    the first pass over the file (naming its line number), not whichever pass happens to read it.
    At most about two chunks of parsed rows are held at a time.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    path = Path(path)
    want = None if split is None else SPLITS.index(split)
    pending, kept = _Rows(), _Rows()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            _parse_into(pending, line, lineno, path)
            if len(pending) == chunk_rows:
                yield from _keep(pending, kept, want, rule, hash_bits, chunk_rows)
                pending = _Rows()
    yield from _keep(pending, kept, want, rule, hash_bits, chunk_rows)
    if len(kept):
        yield kept.chunk(hash_bits)


def _keep(pending: _Rows, kept: _Rows, want: int | None, rule: SplitRule, hash_bits: int,
          chunk_rows: int) -> Iterator[CriteoChunk]:
    """Move the rows of `pending` that belong to split `want` into `kept`; yield full chunks."""
    if not len(pending):
        return
    codes = split_codes(np.array(pending.line), rule)
    for r, code in enumerate(codes):
        if want is not None and code != want:
            continue
        kept.line.append(pending.line[r])
        kept.label.append(pending.label[r])
        kept.dense.append(pending.dense[r])
        kept.cats.append(pending.cats[r])
        kept.missing.append(pending.missing[r])
        if len(kept) == chunk_rows:
            yield kept.chunk(hash_bits)
            for store in (kept.line, kept.label, kept.dense, kept.cats, kept.missing):
                store.clear()


# ---- training -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CriteoTrainSettings:
    hash_bits: int = 16
    emb_dim: int = 8
    cross_ranks: tuple[int, ...] = (16, 16)
    deep: tuple[int, ...] = (64, 32)
    epochs: int = 3
    patience: int = 1
    batch_size: int = 2048
    lr: float = 2e-3
    chunk_rows: int = 65536
    seed: int = 0
    split: SplitRule = field(default_factory=SplitRule)


def criteo_shape(settings: CriteoTrainSettings) -> CriteoRankerShape:
    return CriteoRankerShape(n_dense=N_DENSE, cat_cardinalities=((1 << settings.hash_bits) + 1,) * N_CAT,
                             emb_dim=settings.emb_dim, dcn=DCNShape(settings.cross_ranks, settings.deep))


def _logloss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-(y * np.log(p) + (1 - y) * np.log1p(-p)).mean())


@torch.no_grad()
def evaluate(model: CriteoRanker, path: Path, split: str, settings: CriteoTrainSettings) -> dict:
    """Streams one split through the model; predictions (one float per row) are kept for the AUC."""
    from sklearn.metrics import roc_auc_score

    model.eval()
    probs, labels = [], []
    for chunk in iter_chunks(path, settings.chunk_rows, settings.hash_bits, split, settings.split):
        probs.append(model(torch.from_numpy(chunk.dense), torch.from_numpy(chunk.cats)).numpy().reshape(-1))
        labels.append(chunk.label)
    if not probs:
        return {"rows": 0, "logloss": None, "auc": None}
    p, y = np.concatenate(probs), np.concatenate(labels)
    auc = float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else None  # undefined with one class
    return {"rows": int(len(y)), "logloss": _logloss(p, y), "auc": auc, "click_rate": float(y.mean())}


def train_criteo(path: Path | str, settings: CriteoTrainSettings = CriteoTrainSettings(),
                 progress: bool = True) -> tuple[CriteoRanker, dict]:
    """Train on the train split, streamed chunk by chunk (rows shuffled within a chunk), early
    stopping on validation logloss; returns the best model and val/test metrics."""
    path = Path(path)
    torch.manual_seed(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    # sparse gradients: a step touches only the rows of its batch, not 26 x 2^bits rows
    model = CriteoRanker(criteo_shape(settings), sparse=True)
    table = model.fields.table.weight
    dense_params = [p for p in model.parameters() if p is not table]
    optimizers = [torch.optim.Adam(dense_params, lr=settings.lr), torch.optim.SparseAdam([table], lr=settings.lr)]
    best, best_state, bad, history = float("inf"), None, 0, []
    for epoch in range(settings.epochs):
        model.train()
        rows = 0
        chunks = iter_chunks(path, settings.chunk_rows, settings.hash_bits, "train", settings.split)
        for chunk in tqdm(chunks, desc=f"criteo epoch {epoch + 1}", unit="chunk", disable=not progress):
            perm = torch.randperm(len(chunk), generator=gen)
            dense, cats, label = (torch.from_numpy(a)[perm] for a in (chunk.dense, chunk.cats, chunk.label))
            for s in range(0, len(chunk), settings.batch_size):
                logits = model.logits(dense[s:s + settings.batch_size], cats[s:s + settings.batch_size]).reshape(-1)
                loss = nn.functional.binary_cross_entropy_with_logits(logits, label[s:s + settings.batch_size])
                for opt in optimizers:
                    opt.zero_grad()
                loss.backward()
                for opt in optimizers:
                    opt.step()
            rows += len(chunk)
        if rows == 0:
            raise CriteoFormatError(f"{path}: no training rows (empty file, or every line fell into val/test)")
        val = evaluate(model, path, "val", settings)
        history.append({"epoch": epoch + 1, "train_rows": rows, **val})
        log.info("criteo epoch %d: %d train rows, val logloss %s auc %s", epoch + 1, rows, val["logloss"], val["auc"])
        if val["logloss"] is None:  # no validation rows: keep the last epoch
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
            continue
        if val["logloss"] < best - 1e-5:
            best, bad = val["logloss"], 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad > settings.patience:
                break
    assert best_state is not None
    model.load_state_dict(best_state)
    metrics = {"history": history, "val": evaluate(model, path, "val", settings),
               "test": evaluate(model, path, "test", settings)}
    return model.eval(), metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m conversion.criteo", description=__doc__.splitlines()[0])
    d = CriteoTrainSettings()
    p.add_argument("--tsv", type=Path, required=True, help="Criteo-style TSV (label, 13 integer, 26 hex categorical)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--hash-bits", type=int, default=d.hash_bits, help="2^bits buckets per categorical field")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--chunk-rows", type=int, default=d.chunk_rows, help="lines parsed and held at a time")
    p.add_argument("--val-fraction", type=float, default=d.split.val_fraction)
    p.add_argument("--test-fraction", type=float, default=d.split.test_fraction)
    p.add_argument("--split-seed", type=int, default=d.split.seed)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", type=Path, help="write the metrics JSON here too")
    p.add_argument("--save-model", type=Path, help="write the trained PyTorch weights here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for flag, value, low in (("--epochs", args.epochs, 1), ("--batch-size", args.batch_size, 1),
                             ("--chunk-rows", args.chunk_rows, 1), ("--hash-bits", args.hash_bits, 1)):
        if value < low:
            print(f"error: {flag} must be >= {low}, got {value}", file=sys.stderr)
            return 2
    if args.hash_bits > 24:
        print(f"error: --hash-bits must be <= 24 (26 tables of 2^bits rows), got {args.hash_bits}", file=sys.stderr)
        return 2
    if not args.tsv.is_file():
        print(f"error: --tsv {args.tsv}: no such file", file=sys.stderr)
        return 2
    try:
        settings = CriteoTrainSettings(
            hash_bits=args.hash_bits, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            chunk_rows=args.chunk_rows, seed=args.seed,
            split=SplitRule(seed=args.split_seed, val_fraction=args.val_fraction, test_fraction=args.test_fraction))
        model, metrics = train_criteo(args.tsv, settings)
    except (CriteoFormatError, ValueError, UnicodeDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = {"tsv": str(args.tsv), "settings": asdict(settings), **metrics}
    # written beside the target and renamed into place: an interrupted run leaves no half file
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2))
        tmp.replace(args.out)
    if args.save_model:
        tmp = args.save_model.with_name(args.save_model.name + ".tmp")
        torch.save({"shape": asdict(model.shape), "state_dict": model.state_dict()}, tmp)
        tmp.replace(args.save_model)
    print(json.dumps({k: report[k] for k in ("val", "test")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
