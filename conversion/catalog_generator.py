"""Stage 02: a deterministic synthetic e-commerce catalog, users and click logs.

Clicks are drawn from a known ground-truth model, so a trained ranker's AUC can be put next to
the best AUC any model could reach on the same logs:

    P(click) = position_bias[position] * sigmoid(relevance(query, user, item))

relevance rewards category match, attribute and brand match between query and title, the
user's segment and personal category taste, favourite brands, price fit and a latent item
quality that no feature shows directly.

Categorical codes start at 1; 0 is reserved everywhere for "unknown" (cold-start items,
default user), so serving and training treat unknown ids identically.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from conversion import stages

log = logging.getLogger(__name__)

# category noun -> (typical price in USD, attribute words that may appear in titles and queries)
CATEGORIES: dict[str, tuple[float, tuple[str, ...]]] = {
    "running shoes": (90, ("trail", "lightweight", "waterproof", "cushioned", "wide")),
    "hiking boots": (140, ("waterproof", "leather", "insulated", "ankle", "lightweight")),
    "rain jacket": (110, ("waterproof", "packable", "hooded", "breathable", "insulated")),
    "yoga mat": (35, ("non-slip", "extra thick", "foldable", "eco", "travel")),
    "backpack": (70, ("laptop", "waterproof", "travel", "rolling", "anti-theft")),
    "headphones": (120, ("wireless", "noise cancelling", "over-ear", "bluetooth", "kids")),
    "wireless earbuds": (80, ("noise cancelling", "sport", "waterproof", "bluetooth", "long battery")),
    "smartphone case": (20, ("shockproof", "leather", "clear", "wallet", "magnetic")),
    "usb-c charger": (30, ("fast", "65w", "dual port", "travel", "gan")),
    "laptop stand": (40, ("adjustable", "aluminum", "foldable", "ergonomic", "portable")),
    "mechanical keyboard": (95, ("wireless", "rgb", "compact", "hot-swap", "quiet")),
    "gaming mouse": (55, ("wireless", "rgb", "lightweight", "ergonomic", "programmable")),
    "coffee maker": (85, ("programmable", "single serve", "stainless steel", "thermal", "compact")),
    "frying pan": (45, ("non-stick", "cast iron", "stainless steel", "induction", "ceramic")),
    "chef knife": (60, ("japanese", "stainless steel", "forged", "8 inch", "ceramic")),
    "desk lamp": (35, ("led", "dimmable", "clamp", "wireless charging", "eye-care")),
    "office chair": (180, ("ergonomic", "mesh", "leather", "high back", "lumbar support")),
    "water bottle": (25, ("insulated", "stainless steel", "leakproof", "kids", "32 oz")),
    "sunglasses": (75, ("polarized", "aviator", "sport", "uv400", "round")),
    "wrist watch": (160, ("automatic", "chronograph", "smart", "waterproof", "leather")),
}
COLORS = ("black", "white", "red", "blue", "green", "grey", "pink", "navy", "beige", "yellow")
BRAND_PREFIXES = ("nor", "vex", "alto", "kai", "lum", "zen", "tor", "mira", "quo", "bel", "ryn", "sol", "pax", "oda")
BRAND_SUFFIXES = ("ra", "tek", "lo", "via", "dex", "ion", "ka", "mo", "sun", "vo", "rix", "na", "ta", "gen")
N_PRICE_BUCKETS = 5
POSITION_BIAS = np.array([1.0, 0.82, 0.7, 0.61, 0.54, 0.49, 0.45, 0.42, 0.40, 0.38, 0.36, 0.35])


@dataclass(frozen=True)
class CatalogSettings:
    seed: int = 7
    n_items: int = 20_000
    n_users: int = 5_000
    n_sessions: int = 40_000
    slate_size: int = 10
    n_segments: int = 8
    brands_per_category: int = 8


@dataclass
class Catalog:
    """Everything the generator produces; arrays are row-aligned within each table."""

    # items
    item_ids: np.ndarray  # int64, unique, not contiguous (a real catalog's ids are not row numbers)
    titles: list[str]
    category: np.ndarray  # int64 codes 1..C
    brand: np.ndarray  # int64 codes 1..B
    price_bucket: np.ndarray  # int64 codes 1..N_PRICE_BUCKETS
    price: np.ndarray  # float32 USD
    quality: np.ndarray  # float32 latent, never a feature
    # users
    user_ids: np.ndarray  # int64
    segment: np.ndarray  # int64 codes 1..S
    # sessions: one query by one user, one slate shown
    queries: list[str]  # distinct query strings
    session_user: np.ndarray  # int64 row into users
    session_query: np.ndarray  # int64 row into queries
    # impressions: session_row, item row, position, click and the true probabilities
    imp_session: np.ndarray
    imp_item: np.ndarray
    imp_position: np.ndarray
    imp_click: np.ndarray  # int8
    imp_p_click: np.ndarray  # float32, ground truth P(click) including position bias
    category_names: list[str]
    brand_names: list[str]

    ARRAYS = ("item_ids", "category", "brand", "price_bucket", "price", "quality", "user_ids", "segment",
              "session_user", "session_query", "imp_session", "imp_item", "imp_position", "imp_click",
              "imp_p_click")
    LISTS = ("titles", "queries", "category_names", "brand_names")

    def save(self, folder: Path) -> None:
        np.savez(folder / "catalog.npz", **{k: getattr(self, k) for k in self.ARRAYS})
        (folder / "catalog_text.json").write_text(json.dumps({k: getattr(self, k) for k in self.LISTS}))

    @classmethod
    def load(cls, folder: Path) -> "Catalog":
        with np.load(folder / "catalog.npz") as z:
            arrays = {k: z[k] for k in cls.ARRAYS}
        lists = json.loads((folder / "catalog_text.json").read_text())
        return cls(**arrays, **lists)

    def split(self, seed: int, fractions: tuple[float, float] = (0.8, 0.1)) -> dict[str, np.ndarray]:
        """Impression row indices per split; whole sessions stay together so no query leaks."""
        n_sessions = len(self.session_user)
        order = np.random.default_rng(seed + 1).permutation(n_sessions)
        n_train, n_val = int(fractions[0] * n_sessions), int(fractions[1] * n_sessions)
        which = np.empty(n_sessions, dtype=np.int8)
        which[order[:n_train]], which[order[n_train:n_train + n_val]], which[order[n_train + n_val:]] = 0, 1, 2
        session_split = which[self.imp_session]
        return {name: np.flatnonzero(session_split == code) for code, name in enumerate(("train", "val", "test"))}


def _brand_names(rng: np.random.Generator, n: int) -> list[str]:
    pool = [(a + b).capitalize() for a in BRAND_PREFIXES for b in BRAND_SUFFIXES]
    if n > len(pool):
        raise ValueError(f"at most {len(pool)} brands can be named, asked for {n}")
    return [pool[i] for i in rng.choice(len(pool), n, replace=False)]


def generate(settings: CatalogSettings, progress: bool = True) -> Catalog:
    if not 1 <= settings.slate_size <= len(POSITION_BIAS):
        raise ValueError(f"slate_size must be between 1 and {len(POSITION_BIAS)}, got {settings.slate_size}")
    rng = np.random.default_rng(settings.seed)
    cat_names = list(CATEGORIES)
    n_cat = len(cat_names)
    n_brand = n_cat * settings.brands_per_category
    brand_names = _brand_names(rng, n_brand)
    # brand b (0-based) sells in category b // brands_per_category; codes are 1-based
    brand_tier = rng.normal(0.0, 0.35, n_brand)  # premium brands cost more

    # ---- items
    n = settings.n_items
    item_cat = rng.integers(0, n_cat, n)
    item_brand = item_cat * settings.brands_per_category + rng.integers(0, settings.brands_per_category, n)
    base_price = np.array([CATEGORIES[c][0] for c in cat_names])[item_cat]
    price = (base_price * np.exp(brand_tier[item_brand] + rng.normal(0, 0.35, n))).astype(np.float32)
    # bucket edges relative to the category's typical price, so every category spans all buckets
    rel_price = np.log(price / base_price)
    price_bucket = np.digitize(rel_price, [-0.45, -0.15, 0.15, 0.45]) + 1
    quality = rng.normal(0, 1, n).astype(np.float32)
    item_color = rng.integers(0, len(COLORS), n)
    item_attr = rng.integers(0, 5, n)
    titles = []
    for i in range(n):
        noun = cat_names[item_cat[i]]
        attr = CATEGORIES[noun][1][item_attr[i]]
        model_no = rng.integers(100, 999)
        titles.append(f"{brand_names[item_brand[i]]} {attr} {COLORS[item_color[i]]} {noun} {model_no}".title()
                      .replace(" Usb-C ", " USB-C "))
    item_ids = np.sort(rng.choice(10 * n + 1_000_000, n, replace=False) + 1).astype(np.int64)
    perm = rng.permutation(n)  # ids sorted, but rows in random order relative to generation
    item_ids = item_ids[perm]

    # ---- users: segment-level tastes plus personal ones
    s = settings.n_segments
    seg_cat_pref = rng.dirichlet(np.full(n_cat, 0.4), s)
    seg_price_pref = rng.normal(0, 0.9, s)  # preferred log relative price
    n_users = settings.n_users
    user_seg = rng.integers(0, s, n_users)
    user_cat_pref = 0.7 * seg_cat_pref[user_seg] + 0.3 * rng.dirichlet(np.full(n_cat, 0.3), n_users)
    user_fav_brands = rng.integers(0, n_brand, (n_users, 3))
    user_ids = np.sort(rng.choice(50 * n_users + 100_000, n_users, replace=False) + 1).astype(np.int64)

    # ---- sessions and impressions
    items_by_cat = [np.flatnonzero(item_cat == c) for c in range(n_cat)]
    queries: dict[str, int] = {}
    q_cat, q_color, q_attr, q_brand = [], [], [], []
    sess_user = rng.integers(0, n_users, settings.n_sessions)
    k = settings.slate_size
    imp_item = np.empty((settings.n_sessions, k), dtype=np.int64)
    sess_query = np.empty(settings.n_sessions, dtype=np.int64)
    for j in tqdm(range(settings.n_sessions), desc="sessions", disable=not progress, mininterval=1.0):
        u = sess_user[j]
        c = rng.choice(n_cat, p=user_cat_pref[u])
        noun = cat_names[c]
        color = rng.integers(0, len(COLORS)) if rng.random() < 0.4 else -1
        attr = rng.integers(0, 5) if rng.random() < 0.4 else -1
        brand = c * settings.brands_per_category + rng.integers(0, settings.brands_per_category) \
            if rng.random() < 0.25 else -1
        words = ([brand_names[brand]] if brand >= 0 else []) + \
                ([CATEGORIES[noun][1][attr]] if attr >= 0 else []) + \
                ([COLORS[color]] if color >= 0 else []) + [noun]
        text = " ".join(words).lower()
        if text not in queries:
            queries[text] = len(queries)
            q_cat.append(c), q_color.append(color), q_attr.append(attr), q_brand.append(brand)
        sess_query[j] = queries[text]
        # retrieval: mostly the query's category, some drift into other categories
        n_in = rng.binomial(k, 0.7)
        same = rng.choice(items_by_cat[c], n_in, replace=len(items_by_cat[c]) < n_in)
        other = rng.integers(0, n, k - n_in)
        imp_item[j] = np.concatenate([same, other])
    q_cat, q_color, q_attr, q_brand = map(np.array, (q_cat, q_color, q_attr, q_brand))

    # ground-truth relevance, vectorised over impressions
    qi = np.repeat(sess_query, k)
    ui = np.repeat(sess_user, k)
    it = imp_item.reshape(-1)
    cat_match = item_cat[it] == q_cat[qi]
    color_match = (q_color[qi] >= 0) & (item_color[it] == q_color[qi])
    attr_match = (q_attr[qi] >= 0) & (item_attr[it] == q_attr[qi]) & cat_match
    brand_match = (q_brand[qi] >= 0) & (item_brand[it] == q_brand[qi])
    fav_brand = (user_fav_brands[ui] == item_brand[it][:, None]).any(axis=1)
    taste = np.log(user_cat_pref[ui, item_cat[it]] * n_cat + 1e-3)
    price_fit = -np.abs(rel_price[it] - seg_price_pref[user_seg[ui]])
    relevance = (-2.2 + 2.6 * cat_match + 0.9 * color_match + 0.9 * attr_match + 1.2 * brand_match
                 + 0.8 * fav_brand + 0.35 * taste + 0.6 * price_fit + 0.35 * quality[it])
    p_rel = 1.0 / (1.0 + np.exp(-relevance))
    # the retrieval order shown to users is a noisy version of relevance (so position and
    # relevance are confounded, as in real logs)
    shown = (relevance + rng.normal(0, 1.5, relevance.shape)).reshape(-1, k)
    order = np.argsort(-shown, axis=1, kind="stable")
    position = np.empty_like(order)
    np.put_along_axis(position, order, np.arange(k)[None, :].repeat(len(order), 0), axis=1)
    position = position.reshape(-1)
    p_click = POSITION_BIAS[position] * p_rel
    click = (rng.random(p_click.shape) < p_click).astype(np.int8)

    return Catalog(
        item_ids=item_ids, titles=titles, category=(item_cat + 1).astype(np.int64),
        brand=(item_brand + 1).astype(np.int64), price_bucket=price_bucket.astype(np.int64),
        price=price, quality=quality,
        user_ids=user_ids, segment=(user_seg + 1).astype(np.int64),
        queries=list(queries), session_user=sess_user.astype(np.int64), session_query=sess_query,
        imp_session=np.repeat(np.arange(settings.n_sessions), k), imp_item=it, imp_position=position.astype(np.int64),
        imp_click=click, imp_p_click=p_click.astype(np.float32),
        category_names=cat_names, brand_names=brand_names,
    )


def build_catalog(settings: CatalogSettings, out_dir: Path | None = None, force: bool = False) -> Path:
    folder = out_dir or stages.stage_dir("02-catalog", settings)
    if stages.is_complete(folder) and not force:
        log.info("catalog up to date: %s", folder)
        return folder
    catalog = generate(settings)
    with stages.atomic_stage(folder, settings) as tmp:
        catalog.save(tmp)
        summary = {
            "items": len(catalog.item_ids), "users": len(catalog.user_ids), "sessions": len(catalog.session_user),
            "impressions": len(catalog.imp_click), "distinct_queries": len(catalog.queries),
            "click_rate": float(catalog.imp_click.mean()),
        }
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("catalog: %s", summary)
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m conversion.catalog_generator", description=__doc__.splitlines()[0])
    d = CatalogSettings()
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--items", type=int, default=d.n_items)
    p.add_argument("--users", type=int, default=d.n_users)
    p.add_argument("--sessions", type=int, default=d.n_sessions)
    p.add_argument("--out", type=Path, help="output folder (default: build/artifacts/02-catalog-<hash>)")
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for flag, value, low in (("--items", args.items, 100), ("--users", args.users, 10), ("--sessions", args.sessions, 100)):
        if value < low:
            print(f"error: {flag} must be >= {low}, got {value}", file=sys.stderr)
            return 2
    settings = CatalogSettings(seed=args.seed, n_items=args.items, n_users=args.users, n_sessions=args.sessions)
    print(build_catalog(settings, args.out, args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
