"""Generated text for distillation and calibration: broad-ish, never the evaluation sets.

The synthetic catalog writes 20 categories from one template, so a student distilled (or an INT8
graph calibrated) on it alone sees a few hundred word types. Pseudo-texts drawn from the
tokenizer's own wordpiece vocabulary cover the words any text can use; the FP32 teacher labels
them like any other text. They are seeded and deterministic, so a stage's settings hash describes
exactly the texts it used. `load_text_file` reads a user's own texts (`--distill-texts FILE`).
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np

_WORD_PIECE = re.compile(r"[a-z][a-z'-]*[a-z]|[0-9]+")


class TextFileError(ValueError):
    """A bad text file; the message is one line naming the file."""


def whole_words(tokenizer_json: Path | str) -> list[str]:
    """The vocabulary's whole-word entries (no '##' continuations, no [SPECIAL] or [unusedN] tokens,
    no single characters or punctuation), in id order."""
    vocab = json.loads(Path(tokenizer_json).read_text())["model"]["vocab"]
    return [w for w, _ in sorted(vocab.items(), key=lambda kv: kv[1])
            if len(w) >= 2 and _WORD_PIECE.fullmatch(w)]


def vocabulary_texts(tokenizer_json: Path | str, n: int, seed: int = 0, min_words: int = 2,
                     max_words: int = 10) -> list[str]:
    """n texts of min_words..max_words whole words drawn uniformly from the tokenizer's vocabulary
    (seeded: the same arguments give the same texts on any machine)."""
    if n <= 0:
        return []
    words = whole_words(tokenizer_json)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_words, max_words + 1, size=n)
    picks = rng.integers(0, len(words), size=int(lengths.sum()))
    out, at = [], 0
    for k in lengths:
        out.append(" ".join(words[i] for i in picks[at:at + k]))
        at += k
    return out


def read_utf8(path: Path, error: type[ValueError]) -> str:
    """A text file's contents; `error` (one line naming the file) when it cannot be read or is not UTF-8."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 (byte {e.start})") from None


def load_text_file(path: Path | str) -> tuple[str, ...]:
    """A user's texts: UTF-8, one per line; an optional 'query<TAB>' / 'title<TAB>' prefix is dropped
    (so an --eval-texts style file works too); blank lines are skipped; repeats kept once."""
    path = Path(path)
    text = read_utf8(path, TextFileError)
    texts = []
    for line in text.splitlines():
        kind, sep, rest = line.partition("\t")
        line = rest if sep and kind.strip() in ("query", "title") else line
        if line.strip():
            texts.append(line.strip())
    if not texts:
        raise TextFileError(f"{path}: no texts (one text per line)")
    return tuple(dict.fromkeys(texts))


def texts_sha256(texts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()
