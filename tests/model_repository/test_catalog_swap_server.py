"""Large catalogs and catalog swaps on the real tritonserver: a 1M-item artifact starts and serves
correct rankings, and a new catalog version is picked up under load without a restart and
without a failed request."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from search_rank_client import RetryPolicy, SearchClient, SearchError
from conversion.catalog_generator import Catalog
from conversion.reference_pipeline import ReferencePipeline
from conversion.synthetic_catalog import SyntheticCatalogSettings, build_synthetic_catalog
from model_repository import catalog_store
from model_repository.spec import ADMISSION_REFUSAL  # the queue policy's answer, not a swap failure
from model_repository.render import Artifacts, render_cpu_repository
from model_repository.runtime import CatalogTables
from model_repository.triton_server import run_triton_server

pytestmark = [pytest.mark.server, pytest.mark.reliability]

TOL = 1e-3  # as tests/client/test_search_rank_server.py: static INT8 encoder, float reassociation


@pytest.fixture(scope="module")
def reference(ci_models) -> ReferencePipeline:
    """Its item table is replaced per test (expected_ranking), so it is not shared."""
    return ReferencePipeline(ci_models["encoder"], ci_models["catalog_artifact"], ci_models["ranker"])


@pytest.fixture(scope="module")
def catalog(ci_models) -> Catalog:
    return Catalog.load(ci_models["catalog"])


def expected_ranking(reference: ReferencePipeline, tables: CatalogTables, query: str, user: int,
                     ids: np.ndarray) -> dict[int, float]:
    """Reference scores with item rows found by binary search over the sorted ids (not the
    served hash index)."""
    pos = np.searchsorted(tables.item_ids, ids)
    known = (pos < len(tables.item_ids)) & (np.asarray(tables.item_ids)[np.minimum(pos, len(tables.item_ids) - 1)] == ids)
    scales = tables.item_embedding_scales  # int8 rows: each times its own scale
    reference.items = {int(i): (np.asarray(tables.item_embeddings[p + 1], dtype=np.float32)
                                * (1.0 if scales is None else scales[p + 1]), tables.item_features[p + 1])
                       for i, p, k in zip(ids, pos, known) if k}
    return dict(reference.rank(query, user, ids))


def assert_matches(served, want: dict[int, float]) -> None:
    assert len(served) == len(want)
    for r in served:
        assert abs(want[r.item_id] - r.score) <= TOL, (r.item_id, r.score, want[r.item_id])


def test_a_million_item_catalog_starts_and_serves(ci_models, ci_pipeline, reference, catalog, tmp_path):
    big = tmp_path / "catalog-1m"
    facts = build_synthetic_catalog(big, ci_models["catalog_artifact"], SyntheticCatalogSettings(items=1_000_000),
                                    progress=False)
    tables = CatalogTables.load(big)
    repo = render_cpu_repository(ci_pipeline, Artifacts(encoder_dir=ci_models["encoder"], catalog_dir=big,
                                                        ranker_dir=ci_models["ranker"]), tmp_path / "repo")
    rng = np.random.default_rng(5)
    started = time.monotonic()
    with run_triton_server(repo) as server, SearchClient(server.grpc_url, timeout_s=30) as client:
        startup_s = time.monotonic() - started
        for _ in range(4):
            ids = rng.choice(tables.item_ids, 1000, replace=False)
            ids[:25] = rng.choice(10**12, 25, replace=False) + 10**12  # unknown: cold start
            query = catalog.queries[rng.integers(len(catalog.queries))]
            user = int(rng.choice(catalog.user_ids))
            assert_matches(client.rank(query, user, ids), expected_ranking(reference, tables, query, user, ids))
    print(f"\n1M items ({facts['bytes'] / 2**30:.2f} GiB, built in {facts['build_s']:.1f} s): ready in {startup_s:.1f} s")


def test_an_int8_catalog_serves_the_rankings_of_its_widened_rows(ci_models, ci_pipeline, reference, catalog,
                                                                 tmp_path):
    """The ranker gathers int8 rows as stored and widens them inside its graph (scale per row)."""
    small = tmp_path / "catalog-int8"
    build_synthetic_catalog(small, ci_models["catalog_artifact"],
                            SyntheticCatalogSettings(items=50_000, embedding_dtype="int8"), progress=False)
    tables = CatalogTables.load(small)
    assert tables.item_embeddings.dtype == np.int8
    repo = render_cpu_repository(ci_pipeline, Artifacts(encoder_dir=ci_models["encoder"], catalog_dir=small,
                                                        ranker_dir=ci_models["ranker"]), tmp_path / "repo")
    rng = np.random.default_rng(6)
    with run_triton_server(repo) as server, SearchClient(server.grpc_url, timeout_s=30) as client:
        for n in (1000, 7, 300):
            ids = rng.choice(tables.item_ids, n, replace=False)
            ids[:2] = rng.choice(10**12, 2, replace=False) + 10**12  # unknown: cold start
            query = catalog.queries[rng.integers(len(catalog.queries))]
            user = int(rng.choice(catalog.user_ids))
            assert_matches(client.rank(query, user, ids), expected_ranking(reference, tables, query, user, ids))


def shuffled_copy(src, dst) -> None:
    """The same items with each other's embeddings: every ranking changes, ids and features do not."""
    tables = CatalogTables.load(src, mmap=False)
    emb = tables.item_embeddings.copy()
    emb[1:] = emb[1:][np.random.default_rng(0).permutation(len(emb) - 1)]
    dst.mkdir()
    CatalogTables(tables.item_ids, emb, tables.item_features, tables.user_ids, tables.user_features).save(dst)


def test_catalog_swap_under_load_loses_no_request(ci_models, ci_repository, reference, catalog, tmp_path):
    repo = tmp_path / "repo"
    catalog_store.place(ci_repository, repo)
    new = tmp_path / "catalog-v2"
    shuffled_copy(ci_models["catalog_artifact"], new)
    old_tables, new_tables = CatalogTables.load(ci_models["catalog_artifact"]), CatalogTables.load(new)
    rng = np.random.default_rng(9)
    requests = []
    for _ in range(6):
        ids = rng.choice(catalog.item_ids, 100, replace=False)
        query, user = catalog.queries[rng.integers(len(catalog.queries))], int(rng.choice(catalog.user_ids))
        requests.append((query, user, ids, expected_ranking(reference, old_tables, query, user, ids),
                         expected_ranking(reference, new_tables, query, user, ids)))

    log: list[tuple[float, str]] = []  # (answered at, "old" | "new" | error)
    stop = threading.Event()

    def caller(seed: int):
        pick = np.random.default_rng(seed)
        # No retries: every failure during the swap is seen.
        with SearchClient(server.grpc_url, timeout_s=10, retry=RetryPolicy(max_attempts=1)) as client:
            while not stop.is_set():
                query, user, ids, old, new = requests[pick.integers(len(requests))]
                try:
                    served = client.rank(query, user, ids)
                except SearchError as e:
                    log.append((time.monotonic(), f"{e.code}: {e}"))
                    continue
                got = {r.item_id: r.score for r in served}
                version = ("old" if all(abs(old[i] - s) <= TOL for i, s in got.items()) else
                           "new" if all(abs(new[i] - s) <= TOL for i, s in got.items()) else "mixed")
                log.append((time.monotonic(), version))

    with run_triton_server(repo) as server:
        threads = [threading.Thread(target=caller, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        time.sleep(2.0)
        swapped_at = time.monotonic()
        catalog_store.swap(repo, new, name="v2")
        time.sleep(3.0)
        stop.set()
        for t in threads:
            t.join(timeout=30)
        assert server.dead_stubs() == set()

    outcomes = [v for _, v in log]
    errors = [v for v in outcomes if v not in ("old", "new")]
    refusals = [v for v in errors if ADMISSION_REFUSAL in v]
    assert not [v for v in errors if v not in refusals], errors[:5]
    assert len(refusals) <= max(1, len(log) // 100), refusals[:3]
    before = [v for t, v in log if t < swapped_at and v in ("old", "new")]
    after = [v for t, v in log if t > swapped_at + 1.0 and v in ("old", "new")]
    assert before and set(before) == {"old"}
    assert after and set(after) == {"new"}
    # once a caller saw the new catalog it never sees the old one again (one instance, one switch)
    first_new = min(t for t, v in log if v == "new")
    assert not [t for t, v in log if v == "old" and t > first_new + 0.5]
    print(f"\ncatalog swap under load: {len(log)} calls, {outcomes.count('old')} old, {outcomes.count('new')} new, "
          f"{len(refusals)} admission refusals, 0 failed; new catalog served "
          f"{first_new - swapped_at:.3f} s after the swap")
