"""The baseline ranker: AUC against the ground truth, ONNX fidelity, cold start, CLI errors."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch
from sklearn.metrics import roc_auc_score

from conversion.build_models import profile_settings
from conversion.catalog_generator import POSITION_BIAS, Catalog
from conversion.stages import REPO_ROOT
from conversion.train_ranker import METRICS_JSON, RANKER_ONNX, load_ranker
from model_repository import spec
from model_repository.runtime import CatalogTables


pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def test_split(ci_models):
    """Test impressions joined with features by an independent path (dict lookups, the ONNX encoder
    via its own session), plus the ONNX ranker's scores for them."""
    from tokenizers import Tokenizer

    catalog = Catalog.load(ci_models["catalog"])
    idx = catalog.split(profile_settings("ci").artifact.catalog.seed)["test"]
    tables = CatalogTables.load(ci_models["catalog_artifact"], mmap=False)
    item_row = {int(i): r + 1 for r, i in enumerate(tables.item_ids)}
    user_row = {int(u): r + 1 for r, u in enumerate(tables.user_ids)}
    tok = Tokenizer.from_file(str(ci_models["encoder"] / "tokenizer.json"))
    enc = ort.InferenceSession(str(ci_models["encoder"] / "encoder.onnx"), providers=["CPUExecutionProvider"])
    queries = np.unique(catalog.session_query[catalog.imp_session[idx]])
    q_emb = {}
    for q in queries:
        ids = np.array([tok.encode(catalog.queries[q]).ids], dtype=np.int64)
        q_emb[q] = enc.run(None, {spec.INPUT_IDS.name: ids, spec.ATTENTION_MASK.name: np.ones_like(ids)})[0][0]
    rows = np.array([item_row[int(catalog.item_ids[i])] for i in catalog.imp_item[idx]])
    urows = np.array([user_row[int(catalog.user_ids[catalog.session_user[s]])] for s in catalog.imp_session[idx]])
    feeds = {
        spec.query_embedding(0).name: np.stack([q_emb[q] for q in catalog.session_query[catalog.imp_session[idx]]]),
        spec.item_embedding(0).name: tables.item_embeddings[rows],
        spec.ITEM_FEATURES.name: tables.item_features[rows],
        spec.USER_FEATURES.name: tables.user_features[urows],
    }
    ranker = ort.InferenceSession(str(ci_models["ranker"] / RANKER_ONNX), providers=["CPUExecutionProvider"])
    scores = ranker.run(None, feeds)[0].reshape(-1)
    return {"catalog": catalog, "idx": idx, "feeds": feeds, "scores": scores}


def test_ranker_auc_well_above_chance_and_near_ground_truth(test_split, ci_models):
    c, idx, scores = test_split["catalog"], test_split["idx"], test_split["scores"]
    clicks = c.imp_click[idx]
    # The served score is P(click | seen); compare it with the ground truth's own
    # position-free relevance, so both sides see the same position noise.
    p_rel = c.imp_p_click[idx] / POSITION_BIAS[c.imp_position[idx]]
    ranker_auc = roc_auc_score(clicks, scores)
    truth_auc = roc_auc_score(clicks, p_rel)
    reported = json.loads((ci_models["ranker"] / METRICS_JSON).read_text())["test"]
    print(f"\nranker AUC (served score) {ranker_auc:.4f} vs ground-truth relevance AUC {truth_auc:.4f}; "
          f"position-aware: ranker {reported['auc']:.4f} vs ground truth {reported['ground_truth_auc']:.4f}")
    assert ranker_auc > 0.65
    assert ranker_auc >= truth_auc - 0.05
    assert reported["auc"] >= reported["ground_truth_auc"] - 0.05
    assert reported["auc"] <= reported["ground_truth_auc"] + 0.01  # nothing beats the true model by much


def test_ranker_onnx_matches_pytorch(test_split, ci_models):
    model = load_ranker(ci_models["ranker"])
    feeds = {k: v[:500] for k, v in test_split["feeds"].items()}
    with torch.no_grad():
        expected = model(*(torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values())).numpy().reshape(-1)
    np.testing.assert_allclose(test_split["scores"][:500], expected, atol=1e-5)


def test_onnx_ranker_has_spec_names_and_dynamic_candidate_axis(ci_models):
    import onnx

    graph = onnx.load(str(ci_models["ranker"] / RANKER_ONNX)).graph
    assert [i.name for i in graph.input] == [spec.query_embedding(0).name, spec.item_embedding(0).name,
                                            spec.ITEM_FEATURES.name, spec.USER_FEATURES.name]
    assert [o.name for o in graph.output] == [spec.CLICK_PROB.name]
    for t in [*graph.input, *graph.output]:
        assert t.type.tensor_type.shape.dim[0].dim_param, f"{t.name}: candidate axis must be dynamic"


def test_cold_start_rows_are_scored_sensibly(test_split, ci_models):
    """Unknown items and users (row 0) get finite probabilities, and a known matching item beats
    an unknown one on average (the model learned cold start from dropout, not as a winner)."""
    feeds = {k: np.ascontiguousarray(v[:2000]) for k, v in test_split["feeds"].items()}
    cold = dict(feeds)
    cold[spec.item_embedding(0).name] = np.zeros_like(feeds[spec.item_embedding(0).name])
    cold[spec.ITEM_FEATURES.name] = np.zeros_like(feeds[spec.ITEM_FEATURES.name])
    cold[spec.USER_FEATURES.name] = np.zeros_like(feeds[spec.USER_FEATURES.name])
    ranker = ort.InferenceSession(str(ci_models["ranker"] / RANKER_ONNX), providers=["CPUExecutionProvider"])
    cold_scores = ranker.run(None, cold)[0].reshape(-1)
    assert np.isfinite(cold_scores).all() and ((cold_scores > 0) & (cold_scores < 1)).all()
    c, idx = test_split["catalog"], test_split["idx"][:2000]
    relevant = c.imp_p_click[idx] / POSITION_BIAS[c.imp_position[idx]] > 0.5
    assert test_split["scores"][:2000][relevant].mean() > cold_scores[relevant].mean()


def test_cli_rejects_bad_epochs():
    result = subprocess.run([sys.executable, "-m", "conversion.train_ranker", "--epochs", "0"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--epochs" in lines[0]
