"""The large-catalog serving side without a server: the O(1) item index, memory-mapped and FP16
tables, synthetic artifacts, the catalog store and the feature_lookup's reload rule."""
from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

sys.modules.setdefault("triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))

from conversion.synthetic_catalog import SyntheticCatalogSettings, build_synthetic_catalog  # noqa: E402
from model_repository import catalog_store  # noqa: E402
from model_repository.backends.candidates import CatalogReloader  # noqa: E402
from model_repository.runtime import (COLD_START_ROW, CatalogTables, ItemIndex, active_catalog,  # noqa: E402
                                      served_catalog_dir, stored_embeddings)

pytestmark = pytest.mark.unit


def binary_search_rows(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The reference: position in the sorted id table + 1, or the cold-start row."""
    pos = np.searchsorted(sorted_ids, ids)
    known = (pos < len(sorted_ids)) & (sorted_ids[np.minimum(pos, len(sorted_ids) - 1)] == ids)
    return np.where(known, pos + 1, COLD_START_ROW)


# ---- ItemIndex ------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 7, 1000, 200_000])
def test_index_agrees_with_binary_search_on_known_and_unknown_ids(n):
    rng = np.random.default_rng(n)
    ids = np.unique(rng.integers(0, 2**62, n))
    index = ItemIndex.build(ids)
    query = np.concatenate([rng.choice(ids, min(n, 1000), replace=False), rng.integers(0, 2**62, 300),
                            ids[: min(n, 20)] + 1, [0]])
    np.testing.assert_array_equal(index.lookup(query), binary_search_rows(ids, query))


def test_index_with_long_probe_runs_uses_the_scalar_tail():
    """Ids chosen to hash to a handful of slots make runs far longer than the vectorised window."""
    probe = ItemIndex.build(np.arange(2**15))  # the same size: the same number of hash bits
    slots = ItemIndex._slots(np.arange(1, 2**18), probe.bits)
    crowded = np.arange(1, 2**18)[np.isin(slots, [3, 4, 5])][:60]
    ids = np.sort(np.concatenate([crowded, np.arange(10**9, 10**9 + 2**15 - 60)]))
    index = ItemIndex.build(ids)
    assert index.bits == probe.bits and index.max_probe > 2 * ItemIndex.WINDOW
    query = np.concatenate([crowded, crowded + 2**20, [10**9 + 5]])
    np.testing.assert_array_equal(index.lookup(query), binary_search_rows(ids, query))


def test_index_of_an_empty_catalog_knows_nothing():
    index = ItemIndex.build(np.array([], dtype=np.int64))
    np.testing.assert_array_equal(index.lookup(np.array([0, 5, 2**40])), COLD_START_ROW)


def test_index_is_at_most_half_full():
    index = ItemIndex.build(np.arange(0, 3000 * 7, 7))
    assert (index.keys != ItemIndex.EMPTY).sum() == 3000
    assert 2 ** index.bits >= 2 * 3000


# ---- tables: memory-mapped, FP16, saved index ------------------------------------------------

@pytest.fixture(scope="module")
def template(ci_models) -> Path:
    return ci_models["catalog_artifact"]


@pytest.fixture(scope="module")
def synthetic(template, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "catalog"
    build_synthetic_catalog(out, template, SyntheticCatalogSettings(items=50_000, chunk_rows=7_000), progress=False)
    return out


def test_served_artifact_has_an_index_and_mmapped_lookup_equals_in_memory(template):
    mapped, loaded = CatalogTables.load(template, mmap=True), CatalogTables.load(template, mmap=False)
    assert isinstance(mapped.item_embeddings, np.memmap) and isinstance(mapped.item_index.keys, np.memmap)
    assert not isinstance(loaded.item_embeddings, np.memmap)
    rng = np.random.default_rng(3)
    query = np.concatenate([rng.choice(loaded.item_ids, 900, replace=False), int(loaded.item_ids.max()) + 1 + np.arange(100)])
    rows = mapped.item_rows(query)
    np.testing.assert_array_equal(rows, loaded.item_rows(query))
    np.testing.assert_array_equal(rows, binary_search_rows(np.asarray(loaded.item_ids), query))
    assert (rows[900:] == COLD_START_ROW).all()
    np.testing.assert_array_equal(mapped.embedding_rows(rows), loaded.embedding_rows(rows))
    np.testing.assert_array_equal(mapped.item_features[rows], loaded.item_features[rows])


def test_artifact_without_an_index_falls_back_to_binary_search(template, tmp_path):
    catalog_store.place(template, tmp_path / "old")
    for name in (ItemIndex.KEYS, ItemIndex.ROWS):
        (tmp_path / "old" / name).unlink()
    old = CatalogTables.load(tmp_path / "old")
    assert old.item_index is None
    query = np.asarray(old.item_ids[:50])
    np.testing.assert_array_equal(old.item_rows(query), np.arange(1, 51))


def test_fp16_embeddings_come_back_as_float32_within_half_precision(template, tmp_path):
    tables = CatalogTables.load(template, mmap=False)
    half = CatalogTables(tables.item_ids, tables.item_embeddings.astype(np.float16), tables.item_features,
                         tables.user_ids, tables.user_features)
    half.save(tmp_path)
    assert json.loads((tmp_path / CatalogTables.META).read_text())["embedding_dtype"] == "float16"
    reloaded = CatalogTables.load(tmp_path)
    assert reloaded.item_embeddings.dtype == np.float16
    rows = np.arange(len(tables.item_ids) + 1)
    got = reloaded.embedding_rows(rows)
    assert got.dtype == np.float32
    # unit vectors: float16 keeps 11 significant bits
    assert np.abs(got - tables.item_embeddings).max() < 2e-3


def test_int8_embeddings_come_back_within_half_a_step_of_their_row_scale(template, tmp_path):
    tables = CatalogTables.load(template, mmap=False)
    stored, scales = stored_embeddings(tables.item_embeddings, "int8")
    assert stored.dtype == np.int8 and scales[0] == 0  # the all-zero cold-start row stays zero
    CatalogTables(tables.item_ids, stored, tables.item_features, tables.user_ids, tables.user_features,
                  item_embedding_scales=scales).save(tmp_path)
    reloaded = CatalogTables.load(tmp_path)
    assert reloaded.item_embeddings.dtype == np.int8 and reloaded.item_embedding_scales.shape == (len(stored),)
    got = reloaded.embedding_rows(np.arange(len(stored)))
    assert got.dtype == np.float32 and not got[0].any()
    step = np.abs(tables.item_embeddings).max(axis=1) / 127
    assert (np.abs(got - tables.item_embeddings) <= step[:, None] / 2 + 1e-7).all()
    # each row's largest element is exact up to float rounding
    assert np.abs(np.abs(got[1:]).max(axis=1) - np.abs(tables.item_embeddings[1:]).max(axis=1)).max() < 1e-6
    with pytest.raises(ValueError, match="scales"):
        CatalogTables(tables.item_ids, stored, tables.item_features, tables.user_ids,
                      tables.user_features).save(tmp_path)


def test_unsupported_embedding_dtype_is_refused(tmp_path):
    tables = CatalogTables(np.array([1]), np.zeros((2, 4), np.float64), np.zeros((2, 4), np.int64),
                           np.array([1]), np.zeros((2, 2), np.int64))
    with pytest.raises(ValueError, match="item_embeddings"):
        tables.save(tmp_path)


def test_synthetic_catalog_is_complete_and_valid(synthetic, template):
    tables, source = CatalogTables.load(synthetic), CatalogTables.load(template)
    n = 50_000
    assert tables.item_ids.shape == (n,) and (np.diff(tables.item_ids) > 0).all()
    assert tables.item_embeddings.shape == (n + 1, source.embedding_dim)
    assert tables.item_embeddings.dtype == np.float16
    assert not np.asarray(tables.item_embeddings[0]).any()
    norms = np.linalg.norm(tables.embedding_rows(np.arange(1, n + 1)), axis=1)
    assert np.abs(norms - 1).max() < 3e-3
    # every feature code is one the ranker has an embedding row for
    for col in range(source.item_features.shape[1] - 1):
        assert set(np.unique(tables.item_features[1:, col])) <= set(np.unique(source.item_features[1:, col]))
    from conversion.ranker_model import item_bucket
    np.testing.assert_array_equal(tables.item_features[1:, -1], item_bucket(tables.item_ids))
    np.testing.assert_array_equal(tables.item_rows(tables.item_ids[::997]), np.arange(1, n + 1)[::997])
    assert not [p for p in synthetic.parent.iterdir() if ".tmp-" in p.name]


# ---- catalog store ---------------------------------------------------------------------------

@pytest.fixture()
def repository(template, tmp_path) -> Path:
    repo = tmp_path / "repo"
    catalog_store.create_store(catalog_store.store_dir(repo), template)
    return repo


def test_render_layout_serves_the_artifact_through_current(repository, template):
    assert served_catalog_dir(repository).name == template.name
    assert not (served_catalog_dir(repository) / "settings.json").exists()


def test_swap_activates_the_new_version_and_prunes_old_ones(repository, synthetic, template, tmp_path):
    store = catalog_store.store_dir(repository)
    assert catalog_store.swap(repository, synthetic, name="v2") == "v2"
    assert served_catalog_dir(repository) == store / "versions" / "v2"
    # hard links: installing a large catalog copies nothing
    assert (store / "versions" / "v2" / "item_embeddings.npy").stat().st_ino == (synthetic / "item_embeddings.npy").stat().st_ino
    catalog_store.swap(repository, template, name="v3", keep=2)
    catalog_store.swap(repository, synthetic, name="v4", keep=2)
    assert sorted(p.name for p in (store / "versions").iterdir()) == ["v3", "v4"]
    assert active_catalog(store).name == "v4"


def test_swap_refuses_a_catalog_the_ranker_cannot_take(repository, template, tmp_path):
    tables = CatalogTables.load(template, mmap=False)
    narrow = CatalogTables(tables.item_ids, tables.item_embeddings[:, :8], tables.item_features,
                           tables.user_ids, tables.user_features)
    (tmp_path / "narrow").mkdir()
    narrow.save(tmp_path / "narrow")
    with pytest.raises(catalog_store.CatalogSwapError, match="8-dim"):
        catalog_store.swap(repository, tmp_path / "narrow")
    (tmp_path / "empty").mkdir()
    with pytest.raises(catalog_store.CatalogSwapError, match="not a catalog artifact"):
        catalog_store.swap(repository, tmp_path / "empty")
    assert served_catalog_dir(repository).name == template.name  # still serving the old one


def test_swap_cli_reports_bad_input_in_one_line(repository, tmp_path):
    r = subprocess.run([sys.executable, "-m", "model_repository.catalog_store", "--repository", str(repository),
                        "--catalog", str(tmp_path / "missing")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and "not a catalog artifact" in r.stderr and r.stderr.count("\n") == 1
    r = subprocess.run([sys.executable, "-m", "model_repository.catalog_store", "--repository", str(tmp_path),
                        "--catalog", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no catalog store" in r.stderr


# ---- feature_lookup's reload rule -------------------------------------------------------------

class Log:
    def __init__(self):
        self.errors, self.infos = [], []

    def log_error(self, msg):
        self.errors.append(msg)

    def log_info(self, msg):
        self.infos.append(msg)


def test_reloader_switches_on_a_new_current_and_keeps_serving_through_a_bad_one(repository, synthetic, template):
    store = catalog_store.store_dir(repository)
    log = Log()
    reloader = CatalogReloader(store, CatalogTables.load(template).embedding_dim, log)
    before = reloader.tables
    reloader.refresh()
    assert reloader.tables is before  # nothing changed: nothing reopened
    catalog_store.swap(repository, synthetic, name="v2")
    reloader.refresh()
    assert reloader.version == "v2" and len(reloader.tables.item_ids) == 50_000
    # a version that disappeared under CURRENT (or fails to open) is logged; v2 keeps serving
    broken = store / "versions" / "broken"
    broken.mkdir()
    catalog_store.activate(store, "broken")
    reloader.refresh()
    assert reloader.version == "v2" and log.errors and "broken" in log.errors[-1]
