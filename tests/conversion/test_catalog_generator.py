"""Stage 02: the synthetic catalog and click logs (conversion.catalog_generator)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from conversion import catalog_generator as cg
from conversion.catalog_generator import Catalog, CatalogSettings, generate

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parents[2]
SMALL = CatalogSettings(n_items=500, n_users=100, n_sessions=400)


def assert_catalogs_equal(a: Catalog, b: Catalog) -> None:
    for name in Catalog.ARRAYS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        np.testing.assert_array_equal(x, y, err_msg=name)
    for name in Catalog.LISTS:
        assert getattr(a, name) == getattr(b, name), name


@pytest.fixture(scope="module")
def small() -> Catalog:
    return generate(SMALL, progress=False)


@pytest.fixture(scope="module")
def large() -> Catalog:
    # Enough impressions (50k) for AUC and per-position click rates to be stable.
    return generate(CatalogSettings(n_items=3000, n_users=1000, n_sessions=5000), progress=False)


# ---- determinism ------------------------------------------------------------------------------

def test_same_seed_gives_identical_catalog(small):
    assert_catalogs_equal(small, generate(SMALL, progress=False))


def test_different_seed_gives_different_catalog(small):
    other = generate(CatalogSettings(seed=SMALL.seed + 1, n_items=500, n_users=100, n_sessions=400),
                     progress=False)
    assert not np.array_equal(small.item_ids, other.item_ids)
    assert small.titles != other.titles
    assert not np.array_equal(small.imp_click, other.imp_click)


# ---- structure --------------------------------------------------------------------------------

def test_table_sizes(small):
    n, m, s, k = SMALL.n_items, SMALL.n_users, SMALL.n_sessions, SMALL.slate_size
    for name in ("item_ids", "category", "brand", "price_bucket", "price", "quality"):
        assert len(getattr(small, name)) == n, name
    assert len(small.titles) == n
    assert len(small.user_ids) == len(small.segment) == m
    assert len(small.session_user) == len(small.session_query) == s
    for name in ("imp_session", "imp_item", "imp_position", "imp_click", "imp_p_click"):
        assert len(getattr(small, name)) == s * k, name


def test_ids_unique_and_positive(small):
    assert len(np.unique(small.item_ids)) == len(small.item_ids)
    assert len(np.unique(small.user_ids)) == len(small.user_ids)
    assert small.item_ids.dtype == np.int64 and small.user_ids.dtype == np.int64
    assert small.item_ids.min() >= 1 and small.user_ids.min() >= 1


def test_categorical_codes_start_at_one(small):
    n_cat = len(cg.CATEGORIES)
    n_brand = n_cat * SMALL.brands_per_category
    assert small.category.min() >= 1 and small.category.max() <= n_cat
    assert small.brand.min() >= 1 and small.brand.max() <= n_brand
    assert small.segment.min() >= 1 and small.segment.max() <= SMALL.n_segments
    assert small.price_bucket.min() >= 1 and small.price_bucket.max() <= cg.N_PRICE_BUCKETS
    # With 500 items every bucket should actually occur (edges are +-0.15/0.45 around the typical price).
    assert set(np.unique(small.price_bucket)) == set(range(1, cg.N_PRICE_BUCKETS + 1))
    assert len(small.category_names) == n_cat and len(small.brand_names) == n_brand
    assert len(set(small.brand_names)) == n_brand


def test_brand_belongs_to_item_category(small):
    # Documented in the generator: brand b (0-based) sells in category b // brands_per_category.
    np.testing.assert_array_equal((small.brand - 1) // SMALL.brands_per_category, small.category - 1)


def test_titles_name_brand_and_category(small):
    for title, cat, brand in zip(small.titles, small.category, small.brand):
        lower = title.lower()
        assert small.brand_names[brand - 1].lower() in lower, title
        assert small.category_names[cat - 1] in lower, title


def test_impressions_reference_valid_rows(small):
    assert small.imp_item.min() >= 0 and small.imp_item.max() < SMALL.n_items
    assert small.session_user.min() >= 0 and small.session_user.max() < SMALL.n_users
    assert small.session_query.min() >= 0 and small.session_query.max() < len(small.queries)
    assert len(set(small.queries)) == len(small.queries)
    assert set(np.unique(small.imp_click)) <= {0, 1}


def test_p_click_is_a_probability_bounded_by_position_bias(small):
    p = small.imp_p_click
    assert np.all((p > 0) & (p < 1))
    # P(click) = position_bias[pos] * sigmoid(...) so it never exceeds the position's bias.
    assert np.all(p <= cg.POSITION_BIAS[small.imp_position] + 1e-6)


def test_each_position_shown_once_per_session(small):
    k = SMALL.slate_size
    positions = small.imp_position.reshape(SMALL.n_sessions, k)
    np.testing.assert_array_equal(np.sort(positions, axis=1), np.tile(np.arange(k), (SMALL.n_sessions, 1)))
    np.testing.assert_array_equal(small.imp_session.reshape(SMALL.n_sessions, k)[:, 0], np.arange(SMALL.n_sessions))


def test_click_rate_is_plausible(small):
    assert 0.05 < small.imp_click.mean() < 0.6


# ---- the ground truth is informative ---------------------------------------------------------

def test_ground_truth_predicts_clicks(large):
    assert roc_auc_score(large.imp_click, large.imp_p_click) > 0.7


def test_clicks_are_drawn_from_ground_truth(large):
    # 50k Bernoulli draws: the observed rate is within ~0.002 (1 sd) of the mean probability.
    assert abs(large.imp_click.mean() - large.imp_p_click.mean()) < 0.01


def test_position_bias_is_visible(large):
    last = large.imp_position.max()
    assert last == 9
    rate = [large.imp_click[large.imp_position == pos].mean() for pos in (0, last)]
    assert rate[0] > rate[1]


# ---- split ------------------------------------------------------------------------------------

def test_split_partitions_impressions_by_session(small):
    parts = small.split(seed=3)
    assert set(parts) == {"train", "val", "test"}
    all_rows = np.concatenate(list(parts.values()))
    assert len(all_rows) == len(small.imp_click)
    np.testing.assert_array_equal(np.sort(all_rows), np.arange(len(small.imp_click)))
    sessions = {name: set(small.imp_session[rows].tolist()) for name, rows in parts.items()}
    assert not sessions["train"] & sessions["val"]
    assert not sessions["train"] & sessions["test"]
    assert not sessions["val"] & sessions["test"]
    # default fractions 0.8 / 0.1 / rest of 400 sessions
    assert [len(sessions[n]) for n in ("train", "val", "test")] == [320, 40, 40]


def test_split_is_deterministic(small):
    a, b, c = small.split(seed=3), small.split(seed=3), small.split(seed=4)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a["test"], c["test"])


# ---- persistence and CLI ----------------------------------------------------------------------

def test_save_load_round_trip(small, tmp_path):
    small.save(tmp_path)
    assert_catalogs_equal(small, Catalog.load(tmp_path))


def test_cli_rejects_too_few_items():
    proc = subprocess.run([sys.executable, "-m", "conversion.catalog_generator", "--items", "5"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "--items" in lines[0] and "Traceback" not in proc.stderr
    assert proc.stdout == ""
