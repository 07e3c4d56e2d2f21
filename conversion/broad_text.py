"""Evaluation text from outside the catalog generator: the set the encoder's fidelity gate judges.

Pruning importance, distillation and INT8 calibration all read the synthetic catalog's titles
and queries, and the catalog's held-out split is drawn from the same 20 categories and one
title template, so it cannot show what compression loses on ordinary product text. The
bundled set (conversion/data/broad_eval_*.txt, 270 titles and 165 queries) was written by hand
for evaluation only; nothing in the build trains, prunes or calibrates on it.

A user's own file (`--eval-texts FILE`) holds one text per line, each line starting with its
kind and a tab, so queries and titles can live in one file exported from a log:

    query<TAB>waterproof hiking boots
    title<TAB>Trailmaster Mid GTX Hiking Boot, Men's, Brown

Fidelity is judged query -> title (each query's top-10 titles by cosine), so a file needs both.
"""
from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from conversion.generated_text import read_utf8

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"
BROAD_TITLES = DATA_DIR / "broad_eval_titles.txt"
BROAD_QUERIES = DATA_DIR / "broad_eval_queries.txt"
BROAD_PROVENANCE = ("written for evaluation only for this project; shares no templates with the catalog generator")
USER_PROVENANCE = "supplied by the user (--eval-texts); the report cannot vouch for what it shares with training text"
KINDS = ("query", "title")
# Top-10 neighbour overlap is trivially 1.0 when there are 10 titles or fewer; twice that keeps
# a neighbour list a real choice among candidates.
MIN_TITLES = 20
MIN_QUERIES = 1
_WORD = re.compile(r"[a-z0-9]+")


class EvalTextsError(ValueError):
    """A bad evaluation file; the message is one line naming the file."""


@dataclass(frozen=True)
class EvalTexts:
    queries: tuple[str, ...]
    titles: tuple[str, ...]
    source: str  # the file(s) read, for the report
    provenance: str

    @property
    def sha256(self) -> str:
        """Hash of the texts in the one-file format, so the same texts hash alike whichever way they were stored."""
        h = hashlib.sha256()
        for kind, texts in (("query", self.queries), ("title", self.titles)):
            for text in texts:
                h.update(f"{kind}\t{text}\n".encode("utf-8"))
        return h.hexdigest()

    def summary(self) -> dict:
        return {"source": self.source, "provenance": self.provenance, "sha256": self.sha256,
                "queries": len(self.queries), "titles": len(self.titles),
                "catalog_vocabulary_overlap": vocabulary_overlap(self.queries + self.titles)}


def _read_lines(path: Path) -> list[str]:
    lines = read_utf8(path, EvalTextsError).splitlines()
    if not lines:
        raise EvalTextsError(f"{path}: empty file")
    return lines


def _check_texts(path: Path, texts: list[tuple[int, str]], kind: str) -> tuple[str, ...]:
    """texts: (line number, text). Refuses blank lines and repeats, naming the first offender."""
    seen: dict[str, int] = {}
    for line_no, text in texts:
        if not text:
            raise EvalTextsError(f"{path}:{line_no}: empty {kind}")
        if text in seen:
            raise EvalTextsError(f"{path}:{line_no}: duplicate {kind} (first on line {seen[text]}): {text!r}")
        seen[text] = line_no
    return tuple(seen)


def _check_counts(source: str, queries: tuple[str, ...], titles: tuple[str, ...]) -> None:
    if len(queries) < MIN_QUERIES:
        raise EvalTextsError(f"{source}: no queries (lines starting 'query<TAB>')")
    if len(titles) < MIN_TITLES:
        raise EvalTextsError(f"{source}: {len(titles)} titles; at least {MIN_TITLES} are needed for top-10 neighbours")


def load_text_list(path: Path, kind: str) -> tuple[str, ...]:
    """One text per line, all of one kind (the bundled files' format)."""
    lines = _read_lines(path)
    return _check_texts(path, [(i, line.strip()) for i, line in enumerate(lines, 1)], kind)


def load_eval_file(path: Path, provenance: str = "") -> EvalTexts:
    """A user's file: one text per line, each starting 'query<TAB>' or 'title<TAB>'."""
    by_kind: dict[str, list[tuple[int, str]]] = {k: [] for k in KINDS}
    for i, line in enumerate(_read_lines(path), 1):
        kind, sep, text = line.partition("\t")
        if not sep or kind.strip() not in KINDS:
            raise EvalTextsError(f"{path}:{i}: line must start with 'query<TAB>' or 'title<TAB>', got {line[:40]!r}")
        by_kind[kind.strip()].append((i, text.strip()))
    queries = _check_texts(path, by_kind["query"], "query")
    titles = _check_texts(path, by_kind["title"], "title")
    _check_counts(str(path), queries, titles)
    return EvalTexts(queries, titles, source=str(path), provenance=provenance or USER_PROVENANCE)


def load_broad_texts() -> EvalTexts:
    """The bundled set, checked like a user's file."""
    queries, titles = load_text_list(BROAD_QUERIES, "query"), load_text_list(BROAD_TITLES, "title")
    source = f"{BROAD_QUERIES.relative_to(DATA_DIR.parent.parent)}, {BROAD_TITLES.relative_to(DATA_DIR.parent.parent)}"
    _check_counts(source, queries, titles)
    return EvalTexts(queries, titles, source=source, provenance=BROAD_PROVENANCE)


def load_eval_texts(path: Path | None = None) -> EvalTexts:
    texts = load_broad_texts() if path is None else load_eval_file(path)
    log.info("eval texts: %d queries, %d titles from %s (sha256 %s)", len(texts.queries), len(texts.titles),
             texts.source, texts.sha256[:12])
    return texts


# ---- how different is the source? -------------------------------------------------------------------


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def catalog_vocabulary() -> frozenset[str]:
    """Every word the catalog generator can write into a title or query.

    Taken from the generator's own tables rather than one built catalog, so it is the largest
    vocabulary any catalog setting can have (every brand name the pool allows, every model
    number 100-998): the overlap it gives is an upper bound, never flattering to the eval set.
    """
    from conversion import catalog_generator as cg

    vocab: set[str] = set()
    for noun, (_, attrs) in cg.CATEGORIES.items():
        vocab.update(words(noun))
        for attr in attrs:
            vocab.update(words(attr))
    for color in cg.COLORS:
        vocab.update(words(color))
    vocab.update(a + b for a in cg.BRAND_PREFIXES for b in cg.BRAND_SUFFIXES)
    vocab.update(str(n) for n in range(100, 999))  # model numbers
    return frozenset(vocab)


def vocabulary_overlap(texts: Sequence[str], vocab: frozenset[str] | None = None, examples: int = 15) -> dict:
    """Share of the texts' word types (and running words) that the catalog generator also writes."""
    vocab = catalog_vocabulary() if vocab is None else vocab
    counts = Counter(w for t in texts for w in words(t))
    shared = {w: n for w, n in counts.items() if w in vocab}
    total = sum(counts.values())
    return {"word_types": len(counts), "shared_types": len(shared),
            "share_of_types": len(shared) / len(counts) if counts else 0.0,
            "share_of_running_words": sum(shared.values()) / total if total else 0.0,
            "catalog_vocabulary_size": len(vocab),
            "most_common_shared": [w for w, _ in Counter(shared).most_common(examples)],
            "texts_naming_a_catalog_category": catalog_category_hits(texts)}


def catalog_category_hits(texts: Iterable[str]) -> list[str]:
    """Texts that name one of the generator's 20 category nouns: the few places the sets meet."""
    from conversion.catalog_generator import CATEGORIES

    nouns = [words(n) for n in CATEGORIES]
    hits = []
    for text in texts:
        ws = words(text)
        if any(ws[i:i + len(n)] == n for n in nouns for i in range(len(ws))):
            hits.append(text)
    return hits
