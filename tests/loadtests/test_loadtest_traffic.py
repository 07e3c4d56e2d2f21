"""The seeded request mix (loadtests.traffic) on a small synthetic catalog artifact."""
from __future__ import annotations

import numpy as np
import pytest

from conversion.catalog_generator import CATEGORIES, COLORS
from loadtests import traffic
from model_repository import spec
from model_repository.runtime import CatalogTables

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> traffic.CatalogData:
    rng = np.random.default_rng(0)
    n, m = 1500, 300
    names = list(CATEGORIES)
    cat = rng.integers(1, len(names) + 1, n)
    titles = [f"Brand{int(c) % 5} {CATEGORIES[names[c - 1]][1][0]} {COLORS[i % len(COLORS)]} {names[c - 1]} {i}".title()
              for i, c in enumerate(cat)]
    item_ids = np.sort(rng.choice(10**6, n, replace=False) + 1).astype(np.int64)
    tables = CatalogTables(
        item_ids=item_ids, item_embeddings=np.zeros((n + 1, 4), np.float32),
        item_features=np.vstack([[0, 0, 0], np.column_stack([cat, np.ones(n), np.ones(n)])]).astype(np.int64),
        user_ids=np.sort(rng.choice(10**5, m, replace=False) + 1).astype(np.int64),
        user_features=np.zeros((m + 1, 2), np.int64))
    folder = tmp_path_factory.mktemp("catalog")
    tables.save(folder, titles=titles)
    return traffic.CatalogData.load(folder)


def test_same_seed_same_traffic_other_seed_other_traffic(catalog):
    a = traffic.RequestStream(catalog, seed=7).take(300)
    b = traffic.RequestStream(catalog, seed=7).take(300)
    c = traffic.RequestStream(catalog, seed=8).take(300)
    assert [r.key() for r in a] == [r.key() for r in b]
    assert traffic.fingerprint(a) == traffic.fingerprint(b) != traffic.fingerprint(c)


def test_requests_are_valid_for_the_contract(catalog):
    known = set(catalog.item_ids.tolist())
    unknown_seen = 0
    for r in traffic.RequestStream(catalog, seed=1).take(600):
        assert r.name in traffic.REQUEST_NAMES
        if isinstance(r, traffic.EmbedRequest):
            assert r.text.strip()
            continue
        ids = r.candidate_ids
        assert ids.dtype == np.int64 and 50 <= len(ids) <= spec.MAX_CANDIDATES
        assert len(np.unique(ids)) == len(ids), "duplicate ids would be rejected as INVALID_ARGUMENT"
        assert np.all(ids > 0) and r.user_id > 0
        assert r.name == traffic.size_class_name(len(ids))
        assert r.query.strip() and len(r.query.encode()) <= spec.MAX_QUERY_BYTES
        assert r.top_k is None or r.top_k >= 1
        unknown_seen += sum(int(i) not in known for i in ids)
    assert unknown_seen > 0, "some cold-start ids should be in the mix"


def test_mix_matches_the_settings(catalog):
    s = traffic.TrafficSettings()
    reqs = traffic.RequestStream(catalog, s, seed=3).take(4000)
    shares = traffic.describe(reqs)
    assert shares[traffic.TEXT_EMBED_NAME] == pytest.approx(s.embed_share, abs=0.03)
    rank = [r for r in reqs if isinstance(r, traffic.RankRequest)]
    sizes = np.array([len(r.candidate_ids) for r in rank])
    assert np.mean(sizes <= 100) == pytest.approx(0.40, abs=0.04)
    assert np.mean(sizes == 1000) == pytest.approx(0.075, abs=0.02)
    assert sizes.min() >= 50 and sizes.max() == 1000
    new_users = np.mean([r.user_id > catalog.user_ids.max() for r in rank])
    assert new_users == pytest.approx(1 - s.returning_user_share, abs=0.04)
    # returning users repeat (Zipf): the most frequent one is seen many times
    ids, counts = np.unique([r.user_id for r in rank if r.user_id <= catalog.user_ids.max()], return_counts=True)
    assert counts.max() >= 20
    # query texts vary in length from one word to a pasted paragraph, and popular ones repeat
    words = np.array([len(r.query.split()) for r in rank])
    assert words.min() == 1 and words.max() >= 40
    queries, qcounts = np.unique([r.query for r in rank], return_counts=True)
    assert qcounts.max() >= 20 and len(queries) > 500


def test_candidates_mostly_come_from_the_query_category(catalog):
    cat_of = dict(zip(catalog.item_ids.tolist(), catalog.item_category.tolist()))
    names = list(CATEGORIES)
    shares = []
    for r in traffic.RequestStream(catalog, seed=5).take(300):
        if not isinstance(r, traffic.RankRequest) or len(r.query.split()) > 6:
            continue
        noun_cats = [i + 1 for i, n in enumerate(names) if r.query.endswith(n)]
        if len(noun_cats) != 1:
            continue
        in_cat = np.mean([cat_of.get(int(i)) == noun_cats[0] for i in r.candidate_ids])
        shares.append(in_cat)
    # a category holds ~1/20 of this catalog, so random candidates would give ~5%
    assert len(shares) > 50 and np.median(shares) > 0.3


def test_size_classes():
    assert traffic.size_class_name(1) == traffic.size_class_name(100) == "search_rank_100"
    assert traffic.size_class_name(101) == "search_rank_250"
    assert traffic.size_class_name(501) == traffic.size_class_name(1000) == "search_rank_1000"
    with pytest.raises(ValueError):
        traffic.size_class_name(1001)


def test_missing_catalog_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="--catalog"):
        traffic.CatalogData.load(tmp_path)
