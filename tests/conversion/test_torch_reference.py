"""conversion/torch_reference.py against the ONNX FP32 pipeline of the CI profile's build."""
from __future__ import annotations

import numpy as np
import pytest

from conversion.catalog_generator import Catalog
from conversion.export_encoder import ENCODER_ONNX, TOKENIZER_JSON
from conversion.torch_reference import reference, reference_top_k
from conversion.train_ranker import RANKER_FP32_ONNX
from model_repository.runtime import BucketTokenizer, encode_texts, ort_session

pytestmark = pytest.mark.unit


def test_reference_top_k_agrees_with_the_onnx_fp32_pipeline(ci_models):
    """The same FP32 pipeline through the other path: the stage-01 ONNX export (bucketed, batched, ORT) for
    query and titles, and the ranker stage's FP32 ONNX export. Both are FP32, so the rankings must agree
    up to float rounding: scores within 1e-4, and the top-10 lists equal except where two scores tie
    within that rounding."""
    ref = reference("ci")
    catalog = Catalog.load(ci_models["catalog"])
    rng = np.random.default_rng(0)
    tok = BucketTokenizer(ci_models["encoder_fp32"] / TOKENIZER_JSON)
    encoder = ort_session(ci_models["encoder_fp32"] / ENCODER_ONNX)
    ranker = ort_session(ci_models["ranker"] / RANKER_FP32_ONNX)
    names = [i.name for i in ranker.get_inputs()]
    title_of = dict(zip(catalog.item_ids.tolist(), catalog.titles))
    queries = list(dict.fromkeys(catalog.queries))[:8]
    agree = []
    for n, query in enumerate(queries):
        ids = rng.choice(catalog.item_ids, 60, replace=False).tolist() + [10**12 + n]  # one id the catalog lacks
        user = int(catalog.user_ids[n]) if n % 2 else -5  # a known and an unknown user
        q = encode_texts(tok, encoder, [query])
        titles = [title_of[i] for i in ids[:-1]]
        items = np.concatenate([encode_texts(tok, encoder, titles), np.zeros((1, q.shape[1]), np.float32)])
        item_features, _, _ = ref._feature_tables(catalog, np.asarray(ids, np.int64))
        user_row = ref.user_row.get(user, ref.default_user)
        feeds = dict(zip(names, (np.repeat(q, len(ids), 0), items.astype(np.float32),
                                 item_features[1:].astype(np.int64),
                                 np.repeat(np.asarray(user_row, np.int64)[None], len(ids), 0))))
        onnx_scores = ranker.run(None, feeds)[0].reshape(-1)
        torch_scores = ref.scores(query, user, ids)
        assert np.abs(onnx_scores - torch_scores).max() < 1e-4
        top = reference_top_k("ci", query, user, ids, k=10)
        onnx_top = [ids[i] for i in np.argsort(-onnx_scores, kind="stable")[:10]]
        assert len(top) == 10 and set(top) <= set(ids)
        agree.append(len(set(top) & set(onnx_top)) / 10)
    assert np.mean(agree) >= 0.99, agree
