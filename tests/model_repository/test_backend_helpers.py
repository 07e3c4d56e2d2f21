"""Pure request-checking helpers of the python-backend models.

The backends import `triton_python_backend_utils`, which only exists inside Triton. The helpers
tested here never touch it, so an empty stand-in module is enough to import them.
"""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest

sys.modules.setdefault("triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))

from model_repository.backends.common import BadRequest, name_list  # noqa: E402
from model_repository.backends.candidates import validate_ids  # noqa: E402
from model_repository.backends.tokenizer import decode_text  # noqa: E402
from model_repository.backends.top_k import select_top_k  # noqa: E402

pytestmark = pytest.mark.unit

MAX = 1000  # DESIGN.md: 1 <= N <= 1000


def user(uid: int = 42) -> np.ndarray:
    return np.array([uid], dtype=np.int64)


def ids(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


# ---- validate_ids ---------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, MAX])
def test_validate_ids_accepts(n):
    validate_ids(user(), ids(np.arange(10, 10 + n)), MAX)


def test_validate_ids_accepts_user_zero_and_unknown_candidates():
    # Unknown ids are scored cold-start, not rejected; 0 is a valid (default) user.
    validate_ids(user(0), ids([0, 2**62, 7]), MAX)


@pytest.mark.parametrize("candidates", [
    pytest.param([], id="none"),
    pytest.param(np.arange(MAX + 1), id="1001"),
    pytest.param([5, -1, 7], id="negative"),
    pytest.param([5, 6, 5], id="duplicate"),
    pytest.param(np.arange(6).reshape(2, 3), id="2-D"),
])
def test_validate_ids_rejects_candidates(candidates):
    with pytest.raises(BadRequest, match="CANDIDATE_IDS"):
        validate_ids(user(), ids(candidates), MAX)


@pytest.mark.parametrize("uid", [
    pytest.param(ids([-3]), id="negative"),
    pytest.param(ids([1, 2]), id="two"),
    pytest.param(ids([]), id="none"),
])
def test_validate_ids_rejects_user(uid):
    with pytest.raises(BadRequest, match="USER_ID"):
        validate_ids(uid, ids([1, 2, 3]), MAX)


def test_validate_ids_messages_are_specific():
    with pytest.raises(BadRequest, match="duplicate") as dup:
        validate_ids(user(), ids([3, 9, 3]), MAX)
    assert "3" in str(dup.value)
    with pytest.raises(BadRequest, match="-4"):
        validate_ids(user(), ids([1, -4]), MAX)
    with pytest.raises(BadRequest, match="1001"):
        validate_ids(user(), ids(np.arange(MAX + 1)), MAX)


def test_bad_request_is_a_value_error():
    assert issubclass(BadRequest, ValueError)


# ---- select_top_k ---------------------------------------------------------------------------

def probs(values) -> np.ndarray:
    # The ranker hands top_k CLICK_PROB as [N, 1].
    return np.asarray(values, dtype=np.float32).reshape(-1, 1)


def k(value: int) -> np.ndarray:
    return np.array([value], dtype=np.int32)


def brute_force(p: np.ndarray, cand: np.ndarray, top: int | None):
    """Best first; among equal scores the earlier candidate in the request wins."""
    ranked = sorted(range(len(cand)), key=lambda i: (-float(p[i]), i))
    ranked = ranked if top is None else ranked[:top]
    return [int(cand[i]) for i in ranked], [float(p[i]) for i in ranked]


def test_top_k_orders_descending():
    out_ids, scores = select_top_k(probs([0.1, 0.7, 0.3, 0.9]), ids([11, 22, 33, 44]), k(3))
    assert out_ids.tolist() == [44, 22, 33]
    np.testing.assert_allclose(scores, [0.9, 0.7, 0.3], rtol=1e-6)
    assert out_ids.dtype == np.int64 and scores.dtype == np.float32
    assert out_ids.shape == scores.shape == (3,)


def test_top_k_ties_keep_request_order():
    out_ids, _ = select_top_k(probs([0.5, 0.2, 0.5, 0.5, 0.9]), ids([7, 3, 1, 9, 5]), None)
    assert out_ids.tolist() == [5, 7, 1, 9, 3]


def test_top_k_larger_than_n_returns_all():
    out_ids, scores = select_top_k(probs([0.2, 0.4]), ids([1, 2]), k(50))
    assert out_ids.tolist() == [2, 1] and len(scores) == 2


def test_top_k_absent_returns_all():
    out_ids, _ = select_top_k(probs([0.2, 0.4, 0.3]), ids([1, 2, 3]), None)
    assert out_ids.tolist() == [2, 3, 1]


@pytest.mark.parametrize("value", [0, -3])
def test_top_k_below_one_is_rejected(value):
    with pytest.raises(BadRequest, match="TOP_K"):
        select_top_k(probs([0.2, 0.4]), ids([1, 2]), k(value))


def test_top_k_with_several_values_is_rejected():
    with pytest.raises(BadRequest, match="TOP_K"):
        select_top_k(probs([0.2, 0.4]), ids([1, 2]), np.array([1, 2], dtype=np.int32))


@pytest.mark.parametrize("seed", range(5))
def test_top_k_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, MAX + 1))
    # Few distinct values, so ties are common.
    p = rng.integers(0, 20, n).astype(np.float32) / 20
    cand = rng.choice(10**7, n, replace=False).astype(np.int64)
    top = None if seed == 0 else int(rng.integers(1, n + 5))
    out_ids, scores = select_top_k(probs(p), cand, None if top is None else k(top))
    want_ids, want_scores = brute_force(p, cand, top)
    assert out_ids.tolist() == want_ids
    np.testing.assert_array_equal(scores, np.asarray(want_scores, dtype=np.float32))


# ---- decode_text ----------------------------------------------------------------------------

LABEL = "QUERY/TEXT"


@pytest.mark.parametrize("raw", [
    pytest.param(b"", id="empty"),
    pytest.param(b"   \t\n ", id="whitespace"),
    pytest.param(b"\xff\xfe shoes", id="invalid-utf8"),
    pytest.param("caf\u00e9".encode("utf-8")[:-1], id="truncated-multibyte"),
    pytest.param(b"a" * 2049, id="too-long"),
    pytest.param("shoes", id="str-not-bytes"),
])
def test_decode_text_rejects(raw):
    with pytest.raises(BadRequest) as err:
        decode_text(raw, LABEL, 2048)
    assert LABEL in str(err.value)


def test_decode_text_limit_is_in_bytes_not_characters():
    text = "\u00e9" * 1024  # 1024 characters, 2048 bytes
    assert decode_text(text.encode("utf-8"), LABEL, 2048) == text
    with pytest.raises(BadRequest, match="2050"):
        decode_text(("\u00e9" * 1025).encode("utf-8"), LABEL, 2048)


@pytest.mark.parametrize("text", [
    "running shoes",
    "chaussures de course l\u00e9g\u00e8res",
    "\u30e9\u30f3\u30cb\u30f3\u30b0\u30b7\u30e5\u30fc\u30ba",
    "shoes \U0001F45F\U0001F3C3\u200d\u2640\ufe0f",
    "a\x00b",
    "  padded  ",
])
def test_decode_text_round_trips(text):
    assert decode_text(text.encode("utf-8"), LABEL, 2048) == text
    assert decode_text(bytearray(text.encode("utf-8")), LABEL, 2048) == text


@pytest.mark.parametrize("seed", range(20))
def test_top_k_with_nans_and_ties_matches_a_full_stable_sort(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(1, 60))
    p = (rng.integers(0, 4, n) / 4).astype(np.float32)
    p[rng.random(n) < 0.2] = np.nan
    top = int(rng.integers(1, n + 2))
    out_ids, _ = select_top_k(probs(p), np.arange(n, dtype=np.int64), k(top))
    assert out_ids.tolist() == np.argsort(-p, kind="stable")[:min(top, n)].tolist()


def test_validate_ids_names_how_many_ids_repeat():
    with pytest.raises(BadRequest, match=r"2 repeated, e.g. 5"):
        validate_ids(user(), ids([9, 5, 7, 5, 9, 5]), MAX)


# ---- config parameters ----------------------------------------------------------------------

@pytest.mark.parametrize("param, names", [("", []), ("SkipLayerNormFusion", ["SkipLayerNormFusion"]),
                                          (" A, B ,,", ["A", "B"])])
def test_name_list_reads_comma_separated_parameters(param, names):
    assert name_list(param) == names
