"""The seeded request mix: search_rank and text_embed requests generated from the catalog artifact.

Everything is drawn from one `numpy.random.Generator` in a fixed order, so the k-th request of a
stream depends only on the seed and the catalog: two runs with the same seed send the same
requests (only which Locust user sends the k-th one, and when, differs).

What makes it realistic (the choices are documented in loadtests/README.md):
- queries are built from the catalog's own vocabulary (category nouns, attributes, colours,
  brand names from item titles) in four shapes, from a one-word head query to a pasted
  paragraph, so every tokenizer sequence bucket (16/32/64/128) is exercised; popular queries
  repeat (Zipf over a pool), the rest are fresh;
- candidate sets come from "retrieval": mostly items of the query's category, the rest from
  anywhere, a few ids the catalog artifact does not know (cold start); sizes follow a
  distribution heavy at 50..250 with a tail up to the contract's cap, and a spike exactly at
  the cap because retrieval truncates at its budget;
- most users return (Zipf over the catalog's users, so some are heavy users), some are new
  (ids the artifact does not know: the server falls back to the default user);
- a share of requests are text_embed calls, on queries and on item titles.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

import numpy as np

from conversion.catalog_generator import CATEGORIES, COLORS
from model_repository import spec
from model_repository.runtime import CatalogTables

log = logging.getLogger(__name__)

TEXT_EMBED_NAME = spec.TEXT_EMBED
# search_rank requests are reported per candidate-count class, named after the class's upper
# bound: search_rank_100 is 1..100 candidates, search_rank_1000 is 501..1000.
SIZE_CLASSES = (100, 250, 500, spec.MAX_CANDIDATES)

_CATEGORY_NAMES = tuple(CATEGORIES)  # catalog category code c is _CATEGORY_NAMES[c - 1]
_LEADS = ("looking for", "need", "best", "cheap", "i want", "gift idea:", "recommend a", "where to buy")
_WHO = ("for men", "for women", "for kids", "for my dad", "for travel", "for the office", "for running",
        "for winter", "for a small apartment")
_FILLER = ("with good reviews", "that lasts", "fast shipping", "easy to clean", "not too heavy",
           "comparable to the popular ones", "in stock", "on sale this week")


def size_class_name(n_candidates: int) -> str:
    for bound in SIZE_CLASSES:
        if n_candidates <= bound:
            return f"{spec.SEARCH_RANK}_{bound}"
    raise ValueError(f"{n_candidates} candidates exceed the contract's maximum of {spec.MAX_CANDIDATES}")


REQUEST_NAMES = tuple(f"{spec.SEARCH_RANK}_{b}" for b in SIZE_CLASSES) + (TEXT_EMBED_NAME,)


@dataclass(frozen=True)
class TrafficSettings:
    embed_share: float = 0.15
    # (lowest, highest, weight) of candidate-set sizes; within a range sizes are uniform.
    size_mix: tuple[tuple[int, int, float], ...] = (
        (50, 100, 0.40), (101, 250, 0.30), (251, 500, 0.15), (501, 999, 0.075), (1000, 1000, 0.075))
    in_category_share: float = 0.7
    unknown_item_share: float = 0.01
    returning_user_share: float = 0.8
    repeat_query_share: float = 0.6
    query_pool_size: int = 500
    # query shapes: head (1-3 words), specific (brand/attribute/colour), natural sentence, pasted paragraph
    query_shape_weights: tuple[float, float, float, float] = (0.35, 0.40, 0.20, 0.05)
    top_k_choices: tuple[int | None, ...] = (None, 10, 20, 50, 100)
    top_k_weights: tuple[float, ...] = (0.2, 0.2, 0.3, 0.2, 0.1)
    embed_title_share: float = 0.5


@dataclass(frozen=True)
class RankRequest:
    name: str
    query: str
    user_id: int
    candidate_ids: np.ndarray  # int64, unique
    top_k: int | None

    def key(self) -> tuple:
        return (self.name, self.query, self.user_id, self.candidate_ids.tobytes(), self.top_k)


@dataclass(frozen=True)
class EmbedRequest:
    name: str
    text: str

    def key(self) -> tuple:
        return (self.name, self.text)


Request = Union[RankRequest, EmbedRequest]


@dataclass
class CatalogData:
    """What the generator needs from the catalog artifact the server feature-looks-up from."""

    item_ids: np.ndarray  # int64 [n]
    item_category: np.ndarray  # int64 [n], catalog codes 1..C
    titles: list[str]  # [n] or empty when the artifact has no titles
    user_ids: np.ndarray  # int64 [m]

    @classmethod
    def load(cls, folder: Path | str) -> "CatalogData":
        folder = Path(folder)
        if not (folder / "item_ids.npy").is_file():
            raise FileNotFoundError(f"{folder} is not a catalog artifact (no item_ids.npy); pass --catalog "
                                    "or --repository of the rendered model repository the server serves")
        tables = CatalogTables.load(folder, mmap=False)
        col = spec.ITEM_FEATURE_COLUMNS.index("category")
        titles_file = folder / CatalogTables.TITLES
        titles = json.loads(titles_file.read_text()) if titles_file.is_file() else []
        # Row 0 of the feature tables is the cold-start row; item i is row i + 1.
        return cls(item_ids=np.asarray(tables.item_ids, dtype=np.int64),
                   item_category=np.asarray(tables.item_features[1:, col], dtype=np.int64),
                   titles=list(titles), user_ids=np.asarray(tables.user_ids, dtype=np.int64))


def _zipf_weights(n: int, exponent: float = 1.0) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** exponent
    return w / w.sum()


class RequestStream:
    """Infinite, deterministic iterator of requests for one seed."""

    def __init__(self, catalog: CatalogData, settings: TrafficSettings = TrafficSettings(), seed: int = 0):
        if len(catalog.item_ids) == 0:
            raise ValueError("the catalog has no items")
        self.catalog = catalog
        self.settings = settings
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self._by_category = {int(c): np.flatnonzero(catalog.item_category == c)
                             for c in np.unique(catalog.item_category)}
        self._categories = np.array(sorted(c for c in self._by_category if 1 <= c <= len(_CATEGORY_NAMES)))
        if len(self._categories) == 0:  # a catalog not made by the generator: queries without a category link
            self._categories = np.array(sorted(self._by_category))
        self._brands = self._brands_by_category()
        self._max_item_id = int(catalog.item_ids.max())
        self._max_user_id = int(catalog.user_ids.max()) if len(catalog.user_ids) else 0
        # Heavy users: a seeded permutation of the known users, weighted by Zipf rank.
        self._user_order = self.rng.permutation(catalog.user_ids) if len(catalog.user_ids) else catalog.user_ids
        self._user_weights = _zipf_weights(len(self._user_order), 0.8) if len(self._user_order) else None
        self._pool = [self._new_query() for _ in range(settings.query_pool_size)]
        self._pool_weights = _zipf_weights(len(self._pool), 1.0)
        lows, highs, weights = map(np.array, zip(*settings.size_mix))
        if lows.min() < 1 or highs.max() > spec.MAX_CANDIDATES or np.any(lows > highs):
            raise ValueError(f"size_mix must lie within 1..{spec.MAX_CANDIDATES}: {settings.size_mix}")
        self._size_lows, self._size_highs, self._size_p = lows, highs, weights / weights.sum()
        self._top_k_p = np.array(settings.top_k_weights) / np.sum(settings.top_k_weights)

    def __iter__(self) -> Iterator[Request]:
        return self

    def __next__(self) -> Request:
        s = self.settings
        if self.rng.random() < s.embed_share:
            if self.catalog.titles and self.rng.random() < s.embed_title_share:
                text = self.catalog.titles[int(self.rng.integers(len(self.catalog.titles)))]
            else:
                text = self._query()[0]
            return EmbedRequest(TEXT_EMBED_NAME, text)
        query, category = self._query()
        n = self._size()
        top_k = s.top_k_choices[int(self.rng.choice(len(s.top_k_choices), p=self._top_k_p))]
        return RankRequest(size_class_name(n), query, self._user(), self._candidates(category, n), top_k)

    def take(self, n: int) -> list[Request]:
        return [next(self) for _ in range(n)]

    # ---- pieces, each drawn from self.rng in a fixed order
    def _size(self) -> int:
        i = int(self.rng.choice(len(self._size_p), p=self._size_p))
        return int(self.rng.integers(self._size_lows[i], self._size_highs[i] + 1))

    def _user(self) -> int:
        if self._user_weights is not None and self.rng.random() < self.settings.returning_user_share:
            return int(self._user_order[self.rng.choice(len(self._user_order), p=self._user_weights)])
        # A new user: an id above every known one, so the server falls back to the default user.
        return self._max_user_id + 1 + int(self.rng.integers(1, 10**9))

    def _query(self) -> tuple[str, int]:
        if self.rng.random() < self.settings.repeat_query_share:
            return self._pool[int(self.rng.choice(len(self._pool), p=self._pool_weights))]
        return self._new_query()

    def _new_query(self) -> tuple[str, int]:
        rng = self.rng
        category = int(self._categories[rng.integers(len(self._categories))])
        noun, attrs = self._vocab(category)
        attr = attrs[rng.integers(len(attrs))] if attrs else ""
        color = COLORS[rng.integers(len(COLORS))]
        brands = self._brands.get(category) or [""]
        brand = brands[rng.integers(len(brands))]
        shape = int(rng.choice(4, p=np.array(self.settings.query_shape_weights) / sum(self.settings.query_shape_weights)))
        if shape == 0:  # head query
            words = [[noun], [color, noun], [attr, noun]][rng.integers(3)]
        elif shape == 1:  # specific
            words = [w for w, keep in zip((brand, attr, color, noun), rng.random(4) < (0.6, 0.7, 0.5, 1.0)) if keep]
        elif shape == 2:  # natural sentence
            words = [_LEADS[rng.integers(len(_LEADS))], "a", attr, color, noun, _WHO[rng.integers(len(_WHO))],
                     f"under ${int(rng.integers(2, 40)) * 10}", _FILLER[rng.integers(len(_FILLER))]]
        else:  # pasted paragraph (a product description copied into the search box): the 128 bucket
            parts = []
            for _ in range(int(rng.integers(6, 10))):
                parts += [brand, attr, color, noun, _WHO[rng.integers(len(_WHO))], _FILLER[rng.integers(len(_FILLER))]]
            words = parts
        text = " ".join(w for w in words if w).lower() or noun
        return text, category

    def _vocab(self, category: int) -> tuple[str, tuple[str, ...]]:
        if 1 <= category <= len(_CATEGORY_NAMES):
            noun = _CATEGORY_NAMES[category - 1]
            return noun, CATEGORIES[noun][1]
        return "item", ()

    def _brands_by_category(self) -> dict[int, list[str]]:
        if not self.catalog.titles:
            return {}
        out: dict[int, set[str]] = {}
        for cat, title in zip(self.catalog.item_category.tolist(), self.catalog.titles):
            out.setdefault(int(cat), set()).add(title.split(" ", 1)[0].lower())
        return {c: sorted(b) for c, b in out.items()}

    def _candidates(self, category: int, n: int) -> np.ndarray:
        rng, items = self.rng, self.catalog.item_ids
        n_unknown = int(rng.binomial(n, self.settings.unknown_item_share))
        n_known = min(n - n_unknown, len(items))
        n_unknown = n - n_known
        same = self._by_category.get(category, np.empty(0, dtype=np.int64))
        n_in = min(int(rng.binomial(n_known, self.settings.in_category_share)), len(same))
        rows_in = rng.choice(same, n_in, replace=False) if n_in else np.empty(0, dtype=np.int64)
        # The rest from the whole catalog, excluding rows already taken (ids must be unique).
        mask = np.ones(len(items), dtype=bool)
        mask[rows_in] = False
        rest = np.flatnonzero(mask)
        rows_out = rng.choice(rest, n_known - n_in, replace=False)
        ids = np.concatenate([items[rows_in], items[rows_out]])
        if n_unknown:  # retrieval knows them, the catalog artifact does not: cold-start features
            ids = np.concatenate([ids, self._max_item_id + 1 + rng.choice(10**9, n_unknown, replace=False)])
        rng.shuffle(ids)
        return ids.astype(np.int64)


def fingerprint(requests: list[Request]) -> str:
    """A short hash of a request sequence, to check that two runs sent the same traffic."""
    h = hashlib.sha256()
    for r in requests:
        h.update(repr(r.key()).encode())
    return h.hexdigest()[:16]


def describe(requests: list[Request]) -> dict[str, float]:
    """Share of each request name in a sample of the stream."""
    names = [r.name for r in requests]
    return {n: names.count(n) / len(names) for n in REQUEST_NAMES}
