"""DCN-v2 ranker building blocks: behaviour on known weights, hashing, pruning, table storage,
a tiny training run and ONNX export (no catalog build needed)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conversion.ranker_model import (COLD_START_BUCKET, DCNShape, DCNv2, FieldEmbedding, LowRankCross,
                                     SearchRanker, SearchRankerShape, attach_masks, compact_tables, count_units,
                                     hash_bucket, item_bucket, materialize, prunable_layers, prune_masks,
                                     taylor_importance)
from conversion.quantize import OrtInt8Settings, quantize_ort_int8
from conversion.train_ranker import (RANKER_INT8, ClickData, CompressionGateError, RankerSettings,
                                     check_compression_gate, choose, evaluate, export_ranker_onnx, fit, session_slates,
                                     slate_order_loss)
from model_repository import spec
from model_repository.runtime import CatalogTables, ort_session, user_bucket

pytestmark = pytest.mark.unit

SMALL = SearchRankerShape(embedding_dim=32, item_cardinalities=(5, 9, 4, 65), user_cardinalities=(17, 3),
                          sim_heads=5, proj_dim=4, emb_dim=3, dcn=DCNShape(cross_ranks=(6, 4), deep=(12, 8)))
LEAN = SearchRankerShape(embedding_dim=32, item_cardinalities=(5, 9, 4, 65), user_cardinalities=(17, 3),
                         sim_heads=6, emb_dim=3, dcn=DCNShape(cross_ranks=(4,), deep=(8,)))


def _inputs(n: int, shape: SearchRankerShape = SMALL, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(n, shape.embedding_dim, generator=g), dim=1)
    i = torch.nn.functional.normalize(torch.randn(n, shape.embedding_dim, generator=g), dim=1)
    item = torch.stack([torch.randint(0, c, (n,), generator=g) for c in shape.item_cardinalities], dim=1)
    user = torch.stack([torch.randint(0, c, (n,), generator=g) for c in shape.user_cardinalities], dim=1)
    return q, i, item, user


# ---- hashing -------------------------------------------------------------------------------


def test_hash_is_stable_bounded_and_the_served_user_hash():
    ids = np.array([1, 2, 3, 12345, 10**12, 2**62], dtype=np.int64)
    for bits in (1, 8, 13, 16, 24):
        h = hash_bucket(ids, bits)
        assert h.dtype == np.int64 and ((h >= 1) & (h <= 2**bits)).all()
    np.testing.assert_array_equal(hash_bucket(ids, 13), user_bucket(ids))  # one hash for every id feature
    # pinned: a changed hash would silently re-map every trained embedding row
    assert hash_bucket(np.array([1, 2, 12345]), 16).tolist() == [40504, 15471, 41261]
    np.testing.assert_array_equal(item_bucket(ids), hash_bucket(ids, 16))
    assert hash_bucket(7, 16).shape == () and int(hash_bucket(7, 16)) == int(hash_bucket(np.array([7]), 16)[0])


def test_hash_spreads_sequential_ids():
    counts = np.bincount(hash_bucket(np.arange(1, 65537), 8) - 1, minlength=256)
    assert counts.min() > 200 and counts.max() < 320  # 256 per bucket if perfectly even


def test_hash_rejects_negative_ids_and_bad_widths():
    with pytest.raises(ValueError):
        hash_bucket(np.array([-1]), 8)
    with pytest.raises(ValueError):
        hash_bucket(np.array([1]), 0)


def test_unknown_item_ids_get_the_cold_start_bucket():
    """Serving maps ids missing from the artifact to row 0, whose features (item bucket
    included) are all the cold-start code 0: the same row cold-start dropout trains on."""
    known = np.array([11, 42, 99], dtype=np.int64)
    features = np.zeros((4, len(spec.ITEM_FEATURE_COLUMNS)), dtype=np.int64)
    features[1:, -1] = item_bucket(known)
    tables = CatalogTables(item_ids=known, item_embeddings=np.zeros((4, 2), np.float32), item_features=features,
                           user_ids=np.array([5]), user_features=np.zeros((2, 2), np.int64))
    rows = tables.item_rows(np.array([42, 7, 10**15]))
    assert rows.tolist() == [2, 0, 0]
    assert (tables.item_features[rows[1:]] == COLD_START_BUCKET).all()
    assert tables.item_features[rows[0], -1] == item_bucket(np.array([42]))[0] != COLD_START_BUCKET


# ---- building blocks -------------------------------------------------------------------------


def test_cross_layer_is_x0_times_wx_plus_b_plus_x():
    torch.manual_seed(0)
    layer = LowRankCross(dim=5, rank=3)
    U, V, b = torch.randn(5, 3), torch.randn(3, 5), torch.randn(5)
    with torch.no_grad():
        layer.up.weight.copy_(U)
        layer.down.weight.copy_(V)
        layer.up.bias.copy_(b)
    x0, x = torch.randn(4, 5), torch.randn(4, 5)
    W = U @ V
    expected = x0 * (x @ W.T + b) + x
    torch.testing.assert_close(layer(x0, x), expected, rtol=1e-5, atol=1e-6)
    # a hand-computed row: W = I (full rank), b = 1 -> x0 * (x + 1) + x
    eye = LowRankCross(dim=2, rank=2)
    with torch.no_grad():
        eye.up.weight.copy_(torch.eye(2))
        eye.down.weight.copy_(torch.eye(2))
        eye.up.bias.fill_(1.0)
    torch.testing.assert_close(eye(torch.tensor([[2.0, 3.0]]), torch.tensor([[1.0, -1.0]])),
                               torch.tensor([[2.0 * 2 + 1, 3.0 * 0 - 1]]))


def test_field_embedding_is_one_table_per_field():
    emb = FieldEmbedding((3, 5, 2), dim=4)
    ids = torch.tensor([[0, 4, 1], [2, 0, 0]])
    out = emb(ids)
    assert out.shape == (2, 12)
    w = emb.table.weight
    torch.testing.assert_close(out[0], torch.cat([w[0], w[3 + 4], w[3 + 5 + 1]]))
    torch.testing.assert_close(out[1], torch.cat([w[2], w[3], w[8]]))


def test_dcn_body_shapes_and_zero_deep_tower():
    x0 = torch.randn(7, 10)
    assert DCNv2(10, DCNShape((4, 4), (8, 3)))(x0).shape == (7, 1)
    assert DCNv2(10, DCNShape((4,), ()))(x0).shape == (7, 1)


def test_search_ranker_scores_each_candidate_independently():
    model = SearchRanker(SMALL).eval()
    x = _inputs(9)
    with torch.no_grad():
        probs = model(*x)
        alone = torch.cat([model(*(t[k:k + 1] for t in x)) for k in range(9)])
    assert probs.shape == (9, 1) and ((probs > 0) & (probs < 1)).all()
    torch.testing.assert_close(probs, alone, rtol=0, atol=1e-6)
    assert SMALL.input_dim == 3 * 4 + 5 + 6 * 3


def test_search_ranker_uses_similarity_of_query_and_item():
    """Similarity head 0 starts as the cosine (full-width dot product of the normalised
    embeddings); every head is a weighted dot product (q * i) @ w."""
    model = SearchRanker(SMALL).eval()
    q, i, item, user = _inputs(3)
    feats = model.features(q, i, item, user)
    k = SMALL.proj_dim
    torch.testing.assert_close(feats[:, 3 * k], (q * i).sum(1))
    w = model.sims.linear.weight
    torch.testing.assert_close(feats[:, 3 * k + 2], (q * w[2] * i).sum(1))
    torch.testing.assert_close(feats[:, 2 * k:3 * k], model.proj.q(q) * model.proj.i(i))
    lean = SearchRanker(LEAN)
    assert lean.proj is None and LEAN.input_dim == 6 + 6 * 3
    assert lean(*_inputs(4, LEAN)).shape == (4, 1)


# ---- pruning ------------------------------------------------------------------------------------


def _loss_batches(x, n=3):
    y = (torch.arange(len(x[0])) % 2).float()
    return [lambda m: torch.nn.functional.binary_cross_entropy_with_logits(m.logits(*x).reshape(-1), y)] * n


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75])
def test_pruning_reaches_the_fraction_and_materialized_model_matches_masked(fraction):
    torch.manual_seed(1)
    model = attach_masks(SearchRanker(SMALL))
    x = _inputs(64)
    assert set(prunable_layers(model)) == {"sims", "proj", "body.cross.0", "body.cross.1", "body.deep.0", "body.deep.1"}
    importance = taylor_importance(model, _loss_batches(x))
    kept = prune_masks(model, importance, fraction)
    for name, layer in prunable_layers(model).items():
        full = layer.units
        assert kept[name] == full - min(round(fraction * full), full - 1)
        assert int(layer.mask.sum()) == kept[name]
    small = materialize(model)
    assert count_units(small) == sum(kept.values())
    assert small.shape.dcn == DCNShape(tuple(kept[f"body.cross.{k}"] for k in range(2)),
                                       tuple(kept[f"body.deep.{k}"] for k in range(2)))
    assert small.shape.proj_dim == kept["proj"] and small.proj.q.out_features == kept["proj"]
    assert small.shape.sim_heads == kept["sims"]
    assert small.body.input_dim == small.shape.input_dim < model.shape.input_dim
    assert all(layer.mask is None for layer in prunable_layers(small).values())
    with torch.no_grad():
        torch.testing.assert_close(small(*x), model.eval()(*x), rtol=0, atol=1e-6)
        # float64: equal to rounding of the last bit, i.e. the removed units contributed exactly 0
        torch.testing.assert_close(small.double()(*(t.double() if t.is_floating_point() else t for t in x)),
                                   model.double()(*(t.double() if t.is_floating_point() else t for t in x)),
                                   rtol=0, atol=1e-12)


def test_pruning_the_lean_shape_without_projections():
    torch.manual_seed(4)
    model = attach_masks(SearchRanker(LEAN))
    x = _inputs(32, LEAN)
    assert set(prunable_layers(model)) == {"sims", "body.cross.0", "body.deep.0"}
    prune_masks(model, taylor_importance(model, _loss_batches(x)), 0.5)
    small = materialize(model)
    assert small.shape.sim_heads == 3 and small.shape.dcn == DCNShape((2,), (4,))
    with torch.no_grad():
        torch.testing.assert_close(small(*x), model.eval()(*x), rtol=0, atol=1e-6)


def test_importance_ranks_dead_units_last_and_pruning_removes_them():
    torch.manual_seed(2)
    model = attach_masks(SearchRanker(SMALL))
    dead = [0, 5, 7]
    with torch.no_grad():  # these deep neurons never fire; the others always do
        model.body.deep[0].linear.bias.fill_(1.0)
        model.body.deep[0].linear.weight[dead] = 0.0
        model.body.deep[0].linear.bias[dead] = -1.0
    importance = taylor_importance(model, _loss_batches(_inputs(64)))
    assert (importance["body.deep.0"][dead] == 0).all()
    assert (np.delete(importance["body.deep.0"].numpy(), dead) > 0).all()
    prune_masks(model, importance, 0.25)  # 3 of 12
    assert sorted(torch.nonzero(model.body.deep[0].mask == 0).reshape(-1).tolist()) == dead


def test_pruning_keeps_one_unit_and_rejects_bad_fractions():
    model = attach_masks(SearchRanker(SMALL))
    importance = {n: torch.rand(layer.units) for n, layer in prunable_layers(model).items()}
    kept = prune_masks(model, importance, 0.99)
    assert all(k == 1 for k in kept.values())
    materialize(model)(*_inputs(2))
    with pytest.raises(ValueError):
        prune_masks(model, importance, 1.0)


# ---- table storage, export --------------------------------------------------------------------


def test_compact_tables_are_close_and_smaller():
    model = SearchRanker(SMALL).eval()
    x = _inputs(50)
    with torch.no_grad():
        ref = model(*x)
        w = model.fields.table.weight
        for dtype, tol in (("fp16", 1e-3), ("int8", 2e-2)):
            compact = compact_tables(model, dtype)
            torch.testing.assert_close(compact(*x), ref, rtol=0, atol=tol)
            rows = torch.arange(w.shape[0])
            err = (compact.fields.lookup(rows) - w).abs().max()
            assert err <= (w.abs().max() / 127 / 2 + 1e-6 if dtype == "int8" else 1e-3)
    assert compact_tables(model, "fp32") is not model
    with pytest.raises(ValueError):
        compact_tables(model, "int4")


@pytest.mark.parametrize("tables", ["fp32", "fp16", "int8"])
def test_onnx_export_matches_pytorch_with_dynamic_candidate_axis(tmp_path, tables):
    torch.manual_seed(3)
    model = compact_tables(SearchRanker(SMALL).eval(), tables)
    x = _inputs(40)
    report = export_ranker_onnx(model, tmp_path / "r.onnx", x)
    assert report["max_abs_diff"] <= 1e-5
    session = ort_session(tmp_path / "r.onnx")
    assert [i.name for i in session.get_inputs()] == [spec.query_embedding(0).name, spec.item_embedding(0).name,
                                                     spec.ITEM_FEATURES.name, spec.USER_FEATURES.name]
    big = _inputs(1500, seed=9)  # more rows than the export example
    got = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), big)})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(*big).numpy(), atol=1e-5)


def _scores_alone_and_together(path, x) -> tuple[np.ndarray, np.ndarray]:
    session = ort_session(path)
    names = [i.name for i in session.get_inputs()]
    together = session.run(None, {n: t.numpy() for n, t in zip(names, x)})[0]
    cuts = (0, 1, 7, 120, len(x[0]))
    alone = np.concatenate([session.run(None, {n: t[a:b].numpy() for n, t in zip(names, x)})[0]
                            for a, b in zip(cuts[:-1], cuts[1:])])
    return alone, together


def test_served_int8_scores_do_not_depend_on_the_other_candidates(tmp_path):
    """Triton merges candidate rows of concurrent requests into one ORT call, so a row's score
    must not depend on its batch. Static INT8 (fixed calibrated activation scales) holds that;
    dynamic INT8, which takes the activation range from the whole call, does not."""
    torch.manual_seed(0)
    model = SearchRanker(SMALL).eval()
    x = _inputs(300)
    export_ranker_onnx(model, tmp_path / "r.onnx", x)
    names = [spec.query_embedding(0).name, spec.item_embedding(0).name, spec.ITEM_FEATURES.name,
             spec.USER_FEATURES.name]
    calibration = [{n: t.numpy() for n, t in zip(names, _inputs(512, seed=3))}]
    assert RANKER_INT8.mode == "static"
    quantize_ort_int8(tmp_path / "r.onnx", tmp_path / "static.onnx", RANKER_INT8, calibration)
    alone, together = _scores_alone_and_together(tmp_path / "static.onnx", x)
    np.testing.assert_allclose(alone, together, rtol=0, atol=1e-6)
    with torch.no_grad():  # and it is still the model
        np.testing.assert_allclose(together, model(*x).numpy(), atol=0.02)
    dynamic = OrtInt8Settings(mode="dynamic", op_types=RANKER_INT8.op_types)
    quantize_ort_int8(tmp_path / "r.onnx", tmp_path / "dynamic.onnx", dynamic)
    alone, together = _scores_alone_and_together(tmp_path / "dynamic.onnx", x)
    assert np.abs(alone - together).max() > 1e-6  # the failure mode the static choice avoids


# ---- training and the gate ------------------------------------------------------------------


def _synthetic_clicks(n: int = 6000, seed: int = 0) -> tuple[ClickData, dict[str, np.ndarray]]:
    """Clicks that depend on query-item similarity, an item field and position."""
    rng = np.random.default_rng(seed)
    d = SMALL.embedding_dim
    q = rng.normal(size=(40, d)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    items = rng.normal(size=(200, d)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    item_emb = np.concatenate([np.zeros((1, d), np.float32), items])
    item_feat = np.stack([rng.integers(1, c, 201) for c in SMALL.item_cardinalities], 1)
    item_feat[0] = 0
    user_feat = np.stack([rng.integers(1, c, 31) for c in SMALL.user_cardinalities], 1)
    user_feat[0] = 0
    query, item_row, user_row = rng.integers(0, 40, n), rng.integers(1, 201, n), rng.integers(1, 31, n)
    position = rng.integers(0, 5, n)
    relevance = 4 * (q[query] * item_emb[item_row]).sum(1) + 0.8 * (item_feat[item_row, 0] == 2) - 0.5
    p = (1 / (1 + np.exp(-relevance))) * np.array([1.0, 0.8, 0.6, 0.5, 0.4])[position]
    click = (rng.random(n) < p).astype(np.float32)
    data = ClickData(query_emb=torch.from_numpy(q), item_emb=torch.from_numpy(item_emb),
                     item_feat=torch.from_numpy(item_feat), user_feat=torch.from_numpy(user_feat),
                     query=torch.from_numpy(query), item_row=torch.from_numpy(item_row),
                     user_row=torch.from_numpy(user_row), position=torch.from_numpy(position),
                     click=torch.from_numpy(click), p_true=p.astype(np.float32))
    order = rng.permutation(n)
    a, b = int(0.67 * n), int(0.83 * n)
    return data, {"train": order[:a], "val": order[a:b], "test": order[b:]}


def test_tiny_training_run_reduces_validation_logloss():
    data, splits = _synthetic_clicks()
    # no slates in this data: clicks only
    settings = RankerSettings(epochs=4, patience=2, batch_size=128, lr=5e-3, seed=0, evals_per_epoch=1,
                              lr_decay_epochs=0.0, slate_order_weight=0.0)
    torch.manual_seed(0)
    model = SearchRanker(SMALL)
    pos = torch.nn.Embedding(5, 1)
    torch.nn.init.zeros_(pos.weight)
    before = evaluate(model, pos, data, splits["val"])["logloss"]
    model, pos, metrics = fit(model, data, splits, settings, epochs=4, lr=5e-3, position_logit=pos, progress=False)
    after = metrics["val"]["logloss"]
    p, y = data.p_true[splits["val"]], data.click[splits["val"]].numpy()
    best_possible = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))  # the true P(click)'s logloss
    # training closes most of the gap between the untrained model and the true click model
    assert before - after > 0.5 * (before - best_possible)
    assert metrics["test"]["auc"] > 0.65
    # the position factor learned that lower slots are seen less
    factor = metrics["position_click_factor"]
    assert factor[0] > factor[4]


def test_slate_order_loss_prefers_the_logged_order():
    position = torch.tensor([[0, 1, 2], [2, 0, 1]])
    agrees = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0]])  # higher logit where shown higher
    t = torch.tensor(1.0)
    assert slate_order_loss(agrees, position, t) < slate_order_loss(-agrees, position, t)
    # one pair, margin 2: softplus(-2)
    torch.testing.assert_close(slate_order_loss(torch.tensor([[2.0, 0.0]]), torch.tensor([[0, 1]]), t),
                               torch.nn.functional.softplus(torch.tensor(-2.0)))


def test_session_slates_groups_rows_and_needs_equal_slates():
    data, _ = _synthetic_clicks(n=60)
    data.session = torch.arange(60) // 5
    slates = session_slates(data, np.arange(10, 40)[::-1].copy())
    assert slates.shape == (6, 5)
    assert all(len(set((data.session[row]).tolist())) == 1 for row in slates)
    data.session = torch.tensor([0] * 3 + [1] * 57)
    with pytest.raises(ValueError, match="slates of one size"):
        session_slates(data, np.arange(60))


def test_training_with_the_slate_order_loss_runs_on_whole_slates():
    data, splits = _synthetic_clicks()
    data.session = torch.arange(len(data.click)) // 5
    data.position = torch.arange(len(data.click)) % 5
    sessions = np.random.default_rng(0).permutation(len(data.click) // 5)
    rows = lambda s: (s[:, None] * 5 + np.arange(5)).reshape(-1)  # noqa: E731
    splits = {"train": rows(sessions[:800]), "val": rows(sessions[800:1000]), "test": rows(sessions[1000:])}
    settings = RankerSettings(epochs=1, batch_size=100, slate_order_weight=1.0, evals_per_epoch=2)
    torch.manual_seed(0)
    _, _, metrics = fit(SearchRanker(SMALL), data, splits, settings, epochs=1, lr=3e-3, progress=False)
    assert [h["epoch"] for h in metrics["history"]] == [0.5, 1.0]
    assert np.isfinite(metrics["val"]["logloss"])


def test_fit_keeps_its_start_when_no_epoch_improves():
    data, splits = _synthetic_clicks(n=3000)
    torch.manual_seed(0)
    model = SearchRanker(SMALL)
    pos = torch.nn.Embedding(5, 1)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    settings = RankerSettings(epochs=1, patience=0, batch_size=128, seed=0, slate_order_weight=0.0)
    model, _, _ = fit(model, data, splits, settings, epochs=1, lr=0.0, position_logit=pos, progress=False)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, start[k])


def test_compression_gate_raises_a_typed_error():
    check_compression_gate(0.80, 0.796, 0.005)
    with pytest.raises(CompressionGateError, match="0.0060 below FP32"):
        check_compression_gate(0.80, 0.794, 0.005, "pruned")


def test_choose_prefers_simplest_unless_clearly_faster():
    def cand(name, ms, ok=True):
        return {"name": name, "gate_passed": ok, "auc": 0.8, "latency_ms": {"1000": ms}}

    assert choose([cand("a", 1.0), cand("b", 0.95)], 0.10)["name"] == "a"
    assert choose([cand("a", 1.0), cand("b", 0.5)], 0.10)["name"] == "b"
    assert choose([cand("a", 1.0, ok=False), cand("b", 2.0)], 0.10)["name"] == "b"
    with pytest.raises(CompressionGateError, match="no compressed ranker passed"):
        choose([cand("a", 1.0, ok=False)], 0.10)


# ---- serving-side check ---------------------------------------------------------------------------


def test_served_ranker_refuses_an_onnx_file_that_disagrees_with_the_spec(tmp_path):
    import dataclasses
    import sys
    import types

    sys.modules.setdefault("triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    from model_repository.backends.ranker import check_ranker_graph

    model = SearchRanker(SMALL).eval()
    export_ranker_onnx(model, tmp_path / "r.onnx", _inputs(8))
    session = ort_session(tmp_path / "r.onnx")
    check_ranker_graph(session, SMALL.embedding_dim)
    with pytest.raises(ValueError, match="QUERY_EMBEDDING has per-candidate dims"):
        check_ranker_graph(session, SMALL.embedding_dim + 1)  # an encoder of another width
    # a ranker trained with one more item column than the spec's
    wider = dataclasses.replace(SMALL, item_cardinalities=SMALL.item_cardinalities + (7,))
    export_ranker_onnx(SearchRanker(wider).eval(), tmp_path / "w.onnx", _inputs(8, wider))
    with pytest.raises(ValueError, match="ITEM_FEATURES has per-candidate dims"):
        check_ranker_graph(ort_session(tmp_path / "w.onnx"), SMALL.embedding_dim)
