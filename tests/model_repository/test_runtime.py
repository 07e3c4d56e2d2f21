"""Runtime pieces shared by serving and offline jobs (model_repository.runtime)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer

from conversion.catalog_generator import Catalog
from conversion.ranker_model import item_bucket
from model_repository import spec
from model_repository.runtime import N_USER_BUCKETS, BucketTokenizer, CatalogTables, user_bucket

pytestmark = pytest.mark.unit


# ---- BucketTokenizer ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer_json(ci_models):
    return ci_models["encoder"] / "tokenizer.json"


@pytest.fixture(scope="module")
def bucket_tok(tokenizer_json) -> BucketTokenizer:
    return BucketTokenizer(tokenizer_json)


@pytest.fixture(scope="module")
def raw_tok(tokenizer_json) -> Tokenizer:
    """The plain HF tokenizer, no padding and no truncation: the independent token count."""
    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.no_padding()
    tok.no_truncation()
    return tok


def n_tokens(raw_tok: Tokenizer, text: str) -> int:
    return len(raw_tok.encode(text).ids)


SHORT = "trail running shoes"
MEDIUM = " ".join(["waterproof lightweight hiking boots in black leather"] * 5)  # ~40 tokens
LONG = " ".join(["insulated stainless steel water bottle for kids"] * 40)  # ~300 tokens


def test_test_texts_have_the_intended_lengths(raw_tok):
    assert n_tokens(raw_tok, SHORT) <= 8
    assert 32 < n_tokens(raw_tok, MEDIUM) <= 64
    assert n_tokens(raw_tok, LONG) > 128


@pytest.mark.parametrize("text, bucket", [(SHORT, 8), (MEDIUM, 64), (LONG, 128)])
def test_single_text_pads_to_its_bucket(bucket_tok, raw_tok, text, bucket):
    ids, mask = bucket_tok.encode([text])
    assert ids.shape == mask.shape == (1, bucket)
    assert ids.dtype == np.int64 and mask.dtype == np.int64
    n = min(n_tokens(raw_tok, text), 128)
    assert mask.sum() == n
    np.testing.assert_array_equal(mask[0], np.r_[np.ones(n), np.zeros(bucket - n)])
    assert (ids[0, n:] == raw_tok.token_to_id("[PAD]")).all()
    if n < 128:
        np.testing.assert_array_equal(ids[0, :n], raw_tok.encode(text).ids)


def test_truncated_text_keeps_special_tokens(bucket_tok, raw_tok):
    ids, _ = bucket_tok.encode([LONG])
    assert ids[0, 0] == raw_tok.token_to_id("[CLS]")
    assert ids[0, -1] == raw_tok.token_to_id("[SEP]")
    np.testing.assert_array_equal(ids[0, 1:127], raw_tok.encode(LONG).ids[1:127])


@pytest.mark.parametrize("words, bucket", [(14, 16), (15, 32), (30, 32), (31, 64)])
def test_bucket_boundaries(bucket_tok, raw_tok, words, bucket):
    # "shoe" is one word piece; [CLS] and [SEP] add two, so 14 words fill 16 exactly.
    text = " ".join(["shoe"] * words)
    assert n_tokens(raw_tok, text) == words + 2
    ids, _ = bucket_tok.encode([text])
    assert ids.shape[1] == bucket


def test_batch_pads_to_longest_texts_bucket(bucket_tok, raw_tok):
    texts = [SHORT, MEDIUM, "hat"]
    ids, mask = bucket_tok.encode(texts)
    assert ids.shape == (3, 64)
    np.testing.assert_array_equal(mask.sum(axis=1), [n_tokens(raw_tok, t) for t in texts])
    pad = raw_tok.token_to_id("[PAD]")
    for row, t in enumerate(texts):
        n = n_tokens(raw_tok, t)
        np.testing.assert_array_equal(ids[row, :n], raw_tok.encode(t).ids)
        assert (ids[row, n:] == pad).all()


def test_grouped_without_bucket_padding_pads_each_group_to_its_longest_text(bucket_tok, raw_tok):
    texts = [SHORT, MEDIUM, "hat", "red wool hat for winter"]
    counts = [n_tokens(raw_tok, t) for t in texts]
    groups = bucket_tok.encode_grouped(texts, pad_to_bucket=False)
    seen = []
    for rows, ids, mask in groups:
        assert ids.shape == mask.shape == (len(rows), max(counts[r] for r in rows))
        # still grouped by bucket: a short query never shares a group with the 40-token one
        assert len({bucket_tok.bucket_for(counts[r]) for r in rows}) == 1
        for k, r in enumerate(rows):
            np.testing.assert_array_equal(ids[k, :counts[r]], raw_tok.encode(texts[r]).ids)
            assert mask[k].sum() == counts[r]
        seen += rows.tolist()
    assert sorted(seen) == list(range(len(texts)))
    bucketed = bucket_tok.encode_grouped(texts)
    assert [ids.shape[1] for _, ids, _ in bucketed] == sorted({bucket_tok.bucket_for(c) for c in counts})


def test_embeddings_do_not_depend_on_how_far_texts_are_padded(ci_models, bucket_tok):
    """Padded positions are masked out, so trimming the padding (the CPU query encoder does) must not
    move an embedding; checked on the built INT8 encoder, where static activation scales apply."""
    session = ort.InferenceSession(str(ci_models["encoder"] / "encoder.onnx"), providers=["CPUExecutionProvider"])
    texts = [SHORT, MEDIUM, "hat", "stainless steel water bottle 750 ml", "red wool hat for winter"]

    def embed(groups):
        out = np.zeros((len(texts), session.get_outputs()[0].shape[-1]), np.float32)
        for rows, ids, mask in groups:
            out[rows] = session.run(None, {"INPUT_IDS": ids, "ATTENTION_MASK": mask})[0]
        return out

    np.testing.assert_allclose(embed(bucket_tok.encode_grouped(texts, pad_to_bucket=False)),
                               embed(bucket_tok.encode_grouped(texts)), atol=1e-5)


def test_the_encoder_session_can_skip_ort_rewrites_and_the_served_one_skips_none(
        ci_repository, ci_models, bucket_tok, tmp_path):
    """`ort_disabled_optimizers` (spec.CPU_ENCODER_DISABLED_OPTIMIZERS) is empty in the rendered
    config, so the served encoder is ONNX Runtime's default evaluation of its file, which the
    reference pipeline runs. Named, a rewrite must be gone from the graph ORT runs, and the INT8
    encoder must stay as faithful to the FP32 export: skipping SkipLayerNormFusion rounds some
    activations differently, so a text may move a little, but not away from FP32."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from model_repository.runtime import ort_session

    folder = Path(ci_repository) / spec.QUERY_ENCODER
    config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert "ort_disabled_optimizers" not in config.parameters and spec.CPU_ENCODER_DISABLED_OPTIMIZERS == ()
    encoder = folder / "1" / "encoder.onnx"
    skipping = ort_session(encoder, disabled_optimizers=["SkipLayerNormFusion"],
                           optimized_model_path=tmp_path / "skipping.onnx")
    default = ort_session(encoder, optimized_model_path=tmp_path / "default.onnx")
    fp32 = ort.InferenceSession(str(ci_models["encoder_fp32"] / "encoder.onnx"), providers=["CPUExecutionProvider"])

    def op_count(path, op):
        return sum(n.op_type == op for n in onnx.load(str(path)).graph.node)

    assert op_count(tmp_path / "default.onnx", "SkipLayerNormalization") > 0  # else the knob is moot
    assert op_count(tmp_path / "skipping.onnx", "SkipLayerNormalization") == 0
    texts = [SHORT, MEDIUM, "hat", "Laufschuhe für Damen – größe 40", "stainless steel water bottle 750 ml, " * 6]
    for rows, ids, mask in bucket_tok.encode_grouped(texts, pad_to_bucket=False):
        feeds = {"INPUT_IDS": ids, "ATTENTION_MASK": mask}
        a, b, ref = skipping.run(None, feeds)[0], default.run(None, feeds)[0], fp32.run(None, feeds)[0]
        assert ((a * b).sum(1) > 0.99).all()
        assert (a * ref).sum(1).mean() >= (b * ref).sum(1).mean() - 2e-3


def test_pad_id_is_the_vocabularys_pad(bucket_tok, raw_tok):
    assert bucket_tok.pad_id == raw_tok.token_to_id("[PAD]")


# ---- CatalogTables --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tables(ci_models) -> CatalogTables:
    return CatalogTables.load(ci_models["catalog_artifact"])


@pytest.fixture(scope="module")
def catalog(ci_models) -> Catalog:
    return Catalog.load(ci_models["catalog"])


def test_table_shapes(tables, catalog):
    n, m = len(catalog.item_ids), len(catalog.user_ids)
    assert tables.item_ids.shape == (n,) and tables.user_ids.shape == (m,)
    assert tables.item_embeddings.shape == (n + 1, 384)
    assert tables.item_features.shape == (n + 1, len(spec.ITEM_FEATURE_COLUMNS)) and tables.user_features.shape == (m + 1, 2)
    assert tables.item_embeddings.dtype == np.float32
    assert tables.embedding_dim == 384


def test_ids_sorted_unique_and_complete(tables, catalog):
    for ids, source in ((tables.item_ids, catalog.item_ids), (tables.user_ids, catalog.user_ids)):
        assert (np.diff(ids) > 0).all()
        assert set(ids.tolist()) == set(source.tolist())


def test_cold_start_row_is_zero_and_others_unit_norm(tables):
    assert not tables.item_embeddings[0].any()
    assert not tables.item_features[0].any() and not tables.user_features[0].any()
    norms = np.linalg.norm(tables.item_embeddings[1:], axis=1)
    assert np.abs(norms - 1.0).max() < 1e-4


def test_item_rows_find_generator_features(tables, catalog):
    assert spec.ITEM_FEATURE_COLUMNS == ("category", "brand", "price_bucket", "item_bucket")
    truth = {int(i): (int(c), int(b), int(p), int(h)) for i, c, b, p, h in
             zip(catalog.item_ids, catalog.category, catalog.brand, catalog.price_bucket, item_bucket(catalog.item_ids))}
    rng = np.random.default_rng(0)
    sample = rng.choice(catalog.item_ids, 200, replace=False)
    rows = tables.item_rows(sample)
    assert (rows >= 1).all()
    for item_id, row in zip(sample.tolist(), rows.tolist()):
        assert tuple(tables.item_features[row].tolist()) == truth[item_id]


def test_user_rows_find_generator_features(tables, catalog):
    segment = dict(zip(catalog.user_ids.tolist(), catalog.segment.tolist()))
    sample = np.random.default_rng(1).choice(catalog.user_ids, 100, replace=False)
    rows = tables.user_rows(sample)
    assert (rows >= 1).all()
    for user_id, row in zip(sample.tolist(), rows.tolist()):
        bucket, seg = tables.user_features[row].tolist()
        assert seg == segment[user_id]
        assert 1 <= bucket <= N_USER_BUCKETS


def test_unknown_ids_get_cold_start_row(tables):
    items = tables.item_ids
    known = set(items.tolist())
    gap = next(i for i in range(int(items[0]), int(items[-1])) if i not in known)
    unknown = np.array([0, int(items.max()) + 1, int(items.min()) - 1, gap, 2**62], dtype=np.int64)
    np.testing.assert_array_equal(tables.item_rows(unknown), 0)
    users = tables.user_ids
    np.testing.assert_array_equal(tables.user_rows(np.array([0, int(users.max()) + 1], dtype=np.int64)), 0)


def test_item_rows_on_a_full_request(tables):
    rng = np.random.default_rng(2)
    ids = np.concatenate([rng.choice(tables.item_ids, 900, replace=False),
                          int(tables.item_ids.max()) + 1 + np.arange(100)])
    rows = tables.item_rows(ids)
    assert rows.shape == (1000,) and np.issubdtype(rows.dtype, np.integer)
    assert (rows[:900] >= 1).all() and (rows[900:] == 0).all()
    # Known ids come back to themselves through the sorted id table.
    np.testing.assert_array_equal(tables.item_ids[rows[:900] - 1], ids[:900])


def test_user_bucket_range_and_spread():
    # Sparse random ids, as the generator (and most id schemes) produce them.
    ids = np.random.default_rng(3).choice(10**9, 20_000, replace=False).astype(np.int64) + 1
    buckets = user_bucket(ids)
    assert buckets.dtype == np.int64 and buckets.shape == ids.shape
    assert buckets.min() >= 1 and buckets.max() <= N_USER_BUCKETS
    # A uniform hash of 20k ids fills about 8192 * (1 - e^-2.44) ~ 7490 buckets.
    assert len(np.unique(buckets)) > 7300
    # Element-wise and stable: order and call do not matter.
    np.testing.assert_array_equal(user_bucket(ids[::-1]), buckets[::-1])
    np.testing.assert_array_equal(user_bucket(ids[:5].tolist()), buckets[:5])


# ---- stored item embeddings equal the served encoder on the title --------------------------

def test_item_embeddings_match_encoder_on_titles(ci_models, tables, catalog):
    folder = ci_models["catalog_artifact"]
    titles = json.loads((folder / CatalogTables.TITLES).read_text())
    assert len(titles) == len(tables.item_ids)
    by_id = dict(zip(catalog.item_ids.tolist(), catalog.titles))
    assert [by_id[i] for i in tables.item_ids[:50].tolist()] == titles[:50]

    tok = Tokenizer.from_file(str(ci_models["encoder"] / "tokenizer.json"))
    tok.no_padding()
    session = ort.InferenceSession(str(ci_models["encoder"] / "encoder.onnx"), providers=["CPUExecutionProvider"])
    for row in (0, 1, 17, len(titles) // 2, len(titles) - 1):
        enc = tok.encode(titles[row])
        feeds = {"INPUT_IDS": np.array([enc.ids], dtype=np.int64),
                 "ATTENTION_MASK": np.array([enc.attention_mask], dtype=np.int64)}
        expected = session.run(["EMBEDDING"], feeds)[0][0]
        stored = np.asarray(tables.item_embeddings[row + 1])
        cosine = float(expected @ stored / (np.linalg.norm(expected) * np.linalg.norm(stored)))
        assert cosine >= 0.99999, (row, titles[row], cosine)
