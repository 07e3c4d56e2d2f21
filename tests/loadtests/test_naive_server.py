"""The naive baseline server (loadtests.naive_server): its KServe v2 tensor handling as units, and
the real process called through tritonclient over gRPC, side by side with the real Triton."""
from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from search_rank_client import InvalidRequest, SearchClient
from conversion.catalog_generator import Catalog
from conversion.export_encoder import ENCODER_ONNX, FIDELITY_TEXTS, TOKENIZER_JSON
from conversion.train_ranker import RANKER_FP32_ONNX
from loadtests.naive_server import (BadRequest, NaiveServerStartError, infer_response, main, read_inputs,
                                    run_naive_server)
from model_repository import spec
from model_repository.runtime import BucketTokenizer, CatalogTables, encode_texts, ort_session, served_catalog_dir

PROFILE = "ci"
SEARCH = spec.build_spec(384).ensemble(spec.SEARCH_RANK)
UNKNOWN_IDS = [10**15 + 1, 10**15 + 2]


def _tensors(**overrides) -> dict[str, tuple[str, np.ndarray] | None]:
    tensors = {
        spec.QUERY.name: (spec.QUERY.dtype, np.array([b"shoes"], dtype=np.object_)),
        spec.USER_ID.name: (spec.USER_ID.dtype, np.array([1], dtype=np.int64)),
        spec.CANDIDATE_IDS.name: (spec.CANDIDATE_IDS.dtype, np.array([1, 2, 3], dtype=np.int64)),
    }
    return tensors | overrides


def _request(**overrides) -> service_pb2.ModelInferRequest:
    """What tritonclient sends: one raw_input_contents entry per input."""
    request = service_pb2.ModelInferRequest(model_name=spec.SEARCH_RANK)
    for name, value in _tensors(**overrides).items():
        if value is None:
            continue
        dtype, array = value
        request.inputs.add(name=name, datatype=dtype, shape=list(array.shape))
        raw = serialize_byte_tensor(array) if dtype == spec.BYTES else array
        request.raw_input_contents.append(raw.item() if dtype == spec.BYTES and array.size else raw.tobytes())
    return request


def _infer_inputs(**overrides) -> list[grpcclient.InferInput]:
    inputs = []
    for name, value in _tensors(**overrides).items():
        if value is not None:
            inp = grpcclient.InferInput(name, list(value[1].shape), value[0])
            inp.set_data_from_numpy(value[1])
            inputs.append(inp)
    return inputs


# Malformed tensors, refused before any model runs; each must name its tensor.
BAD_TENSORS = {
    "candidates as INT32": (dict(CANDIDATE_IDS=(spec.INT32, np.array([1, 2], dtype=np.int32))), spec.CANDIDATE_IDS),
    "candidates 2-D": (dict(CANDIDATE_IDS=(spec.INT64, np.array([[1, 2], [3, 4]], dtype=np.int64))),
                       spec.CANDIDATE_IDS),
    "two queries": (dict(QUERY=(spec.BYTES, np.array([b"a", b"b"], dtype=np.object_))), spec.QUERY),
    "query as INT64": (dict(QUERY=(spec.INT64, np.array([1], dtype=np.int64))), spec.QUERY),
    "two user ids": (dict(USER_ID=(spec.INT64, np.array([1, 2], dtype=np.int64))), spec.USER_ID),
    "top_k as INT64": (dict(TOP_K=(spec.INT64, np.array([3], dtype=np.int64))), spec.TOP_K),
    "missing candidates": (dict(CANDIDATE_IDS=None), spec.CANDIDATE_IDS),
    "missing query": (dict(QUERY=None), spec.QUERY),
    "extra tensor": (dict(EXTRA=(spec.INT64, np.array([1], dtype=np.int64))), spec.Tensor("EXTRA", spec.INT64, (1,))),
}

# Well-formed tensors with values the contract refuses (checked by the backends' own functions).
BAD_VALUES = {
    "no candidates": (dict(candidate_ids=np.array([], dtype=np.int64)), spec.CANDIDATE_IDS),
    "too many candidates": (dict(candidate_ids=np.arange(1, spec.MAX_CANDIDATES + 2)), spec.CANDIDATE_IDS),
    "duplicate candidates": (dict(candidate_ids=[5, 6, 5]), spec.CANDIDATE_IDS),
    "top_k zero": (dict(top_k=0), spec.TOP_K),
    "query too long": (dict(query=b"a" * (spec.MAX_QUERY_BYTES + 1)), spec.QUERY),
    "query not UTF-8": (dict(query=b"caf\xe9"), spec.QUERY),
}


# ---- units ----------------------------------------------------------------------------------

@pytest.mark.unit
def test_read_inputs_decodes_raw_contents():
    top_k = np.array([2], dtype=np.int32)
    x = read_inputs(SEARCH, _request(TOP_K=(spec.TOP_K.dtype, top_k)))
    assert x[spec.QUERY.name].tolist() == [b"shoes"]
    assert x[spec.CANDIDATE_IDS.name].dtype == np.int64 and x[spec.CANDIDATE_IDS.name].tolist() == [1, 2, 3]
    assert x[spec.USER_ID.name].tolist() == [1] and x[spec.TOP_K.name].tolist() == [2]
    assert spec.TOP_K.name not in read_inputs(SEARCH, _request())  # optional


@pytest.mark.unit
@pytest.mark.parametrize("case", list(BAD_TENSORS))
def test_read_inputs_refuses_malformed_tensors_naming_them(case):
    overrides, tensor = BAD_TENSORS[case]
    with pytest.raises(BadRequest, match=tensor.name):
        read_inputs(SEARCH, _request(**overrides))


@pytest.mark.unit
def test_read_inputs_refuses_contents_that_do_not_fit_the_shape():
    request = _request()
    request.raw_input_contents[2] = request.raw_input_contents[2][:-1]  # candidates: 23 bytes for 3 INT64
    with pytest.raises(BadRequest, match=spec.CANDIDATE_IDS.name):
        read_inputs(SEARCH, request)
    request = _request()
    request.raw_input_contents[0] = b"\xff\x00\x00\x00ab"  # a BYTES length beyond the buffer
    with pytest.raises(BadRequest, match=spec.QUERY.name):
        read_inputs(SEARCH, request)
    request = _request()
    del request.raw_input_contents[:]  # typed `contents` instead of raw: not supported
    with pytest.raises(BadRequest, match="raw_input_contents"):
        read_inputs(SEARCH, request)


@pytest.mark.unit
def test_infer_response_round_trips_through_tritonclient():
    ids, scores = np.array([7, 3], dtype=np.int64), np.array([0.9, 0.1], dtype=np.float32)
    outputs = {spec.ITEM_IDS.name: ids, spec.SCORES.name: scores}
    request = _request()
    request.id = "r-1"
    result = grpcclient.InferResult(infer_response(SEARCH, request, outputs))
    np.testing.assert_array_equal(result.as_numpy(spec.ITEM_IDS.name), ids)
    np.testing.assert_array_equal(result.as_numpy(spec.SCORES.name), scores)
    assert result.as_numpy(spec.SCORES.name).dtype == np.float32 and result.get_response().id == "r-1"
    request.outputs.add(name=spec.SCORES.name)
    assert [o.name for o in infer_response(SEARCH, request, outputs).outputs] == [spec.SCORES.name]
    request.outputs.add(name="NOPE")
    with pytest.raises(BadRequest, match="NOPE"):
        infer_response(SEARCH, request, outputs)


@pytest.mark.unit
@pytest.mark.parametrize("argv, message", [
    (["--threads", "0"], "--threads must be >= 1"),
    (["--workers", "-1"], "--workers must be >= 1"),
    (["--port", "70000"], "--port must be in 0..65535"),
    (["--profile", "huge"], "invalid choice"),
])
def test_cli_refuses_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("python -m loadtests.naive_server: error:") and message in err[-1]


@pytest.mark.unit
def test_launcher_fails_fast_with_the_servers_stderr():
    with pytest.raises(NaiveServerStartError, match="invalid choice"):
        with run_naive_server("no-such-profile", startup_timeout_s=60):
            pass


# ---- the real server ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def naive(ci_models):
    with run_naive_server(PROFILE) as server:
        yield server


@pytest.fixture()
def naive_client(naive):
    with SearchClient(naive.grpc_url, timeout_s=30.0) as c:
        c.wait_ready(timeout_s=30)
        yield c


@pytest.fixture(scope="module")
def served_tables(ci_repository) -> CatalogTables:
    return CatalogTables.load(served_catalog_dir(ci_repository))


@pytest.mark.server
def test_rank_returns_the_candidates_sorted_with_top_k(naive_client, served_tables):
    assert naive_client.is_live() and naive_client.is_ready()
    ids = [int(i) for i in served_tables.item_ids[::50]] + UNKNOWN_IDS
    user = int(served_tables.user_ids[7])
    ranked = naive_client.rank("waterproof hiking boots", user, ids)
    assert sorted(r.item_id for r in ranked) == sorted(ids)
    scores = np.array([r.score for r in ranked])
    assert np.all(np.diff(scores) <= 0) and np.all((scores > 0) & (scores < 1))
    assert naive_client.rank("waterproof hiking boots", user, ids, top_k=5) == ranked[:5]
    assert naive_client.rank("waterproof hiking boots", user, ids, top_k=len(ids) + 10) == ranked
    assert len(naive_client.rank("boots", 10**12, UNKNOWN_IDS, top_k=1)) == 1  # unknown user and items


@pytest.mark.server
def test_embeddings_and_scores_match_the_fp32_onnx_exports(naive_client, ci_models, served_tables):
    """The eager PyTorch path equals the FP32 ONNX encoder and ranker (run in ONNX Runtime) up to
    numerical noise: same tokenizer and truncation, pooling, features and ranker weights."""
    fp32 = ci_models["encoder_fp32"]
    texts = [FIDELITY_TEXTS[i] for i in (0, 3, 11, 17, 22)] + [FIDELITY_TEXTS[-1]]  # multibyte, emoji, truncated
    want = encode_texts(BucketTokenizer(fp32 / TOKENIZER_JSON), ort_session(fp32 / ENCODER_ONNX), texts)
    got = np.stack([naive_client.embed(t) for t in texts])
    assert got.shape == want.shape
    cosine = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cosine.min() >= 0.9999, dict(zip(texts, cosine))

    ids = np.concatenate([served_tables.item_ids[:200], UNKNOWN_IDS])
    user = int(served_tables.user_ids[3])
    ranked = naive_client.rank(texts[1], user, ids)
    rows, user_row = served_tables.item_rows(ids), served_tables.user_rows(np.array([user]))
    ranker = ort_session(ci_models["ranker"] / RANKER_FP32_ONNX)
    probs = ranker.run([spec.CLICK_PROB.name], {
        spec.query_embedding(0).name: np.repeat(want[1:2], len(ids), axis=0),
        spec.item_embedding(0).name: served_tables.item_embeddings[rows],
        spec.ITEM_FEATURES.name: served_tables.item_features[rows],
        spec.USER_FEATURES.name: np.repeat(served_tables.user_features[user_row], len(ids), axis=0),
    })[0].reshape(-1)
    expected = dict(zip(ids.tolist(), probs.tolist()))
    np.testing.assert_allclose([r.score for r in ranked], [expected[r.item_id] for r in ranked], atol=1e-4)


@pytest.mark.server
def test_ranking_agrees_with_triton(naive_client, search_client, ci_models, served_tables):
    """Triton serves the pruned INT8 encoder and the compressed ranker, so rankings are close, not equal."""
    catalog = Catalog.load(ci_models["catalog"])
    rng = np.random.default_rng(5)
    overlaps = []
    for query in rng.choice(catalog.queries, size=4, replace=False):
        ids = rng.choice(served_tables.item_ids, size=200, replace=False)
        user = int(rng.choice(served_tables.user_ids))
        naive_top = {r.item_id for r in naive_client.rank(query, user, ids, top_k=10)}
        triton_top = {r.item_id for r in search_client.rank(query, user, ids, top_k=10)}
        overlaps.append(len(naive_top & triton_top) / 10)
    assert min(overlaps) >= 0.6, overlaps


@pytest.mark.server
@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_values_are_invalid_argument_like_triton(naive_client, search_client, case):
    overrides, tensor = BAD_VALUES[case]
    call = dict(query="shoes", user_id=1, candidate_ids=[1, 2, 3], top_k=None) | overrides
    for client in (naive_client, search_client):
        with pytest.raises(InvalidRequest) as err:
            client.rank(**call)
        assert tensor.name in err.value.message, (client.url, err.value.message)
    assert len(naive_client.rank("shoes", 1, [1, 2, 3], top_k=2)) == 2


@pytest.mark.server
@pytest.mark.parametrize("case", list(BAD_TENSORS))
def test_malformed_tensors_are_invalid_argument_like_triton(naive, triton, case):
    overrides, tensor = BAD_TENSORS[case]
    for url in (naive.grpc_url, triton.grpc_url):
        with grpcclient.InferenceServerClient(url) as raw:
            with pytest.raises(InferenceServerException) as err:
                raw.infer(spec.SEARCH_RANK, _infer_inputs(**overrides), client_timeout=30)
        assert "INVALID_ARGUMENT" in str(err.value.status()) and tensor.name in err.value.message(), url


@pytest.mark.server
def test_unknown_model_is_refused_as_by_triton(naive, triton):
    statuses = []
    for url in (naive.grpc_url, triton.grpc_url):
        with grpcclient.InferenceServerClient(url) as raw:
            assert not raw.is_model_ready("no_such_model")
            with pytest.raises(InferenceServerException) as err:
                raw.infer("no_such_model", _infer_inputs(), client_timeout=30)
        statuses.append(str(err.value.status()))
        assert "no_such_model" in err.value.message()
    assert statuses[0] == statuses[1]


@pytest.mark.server
def test_metadata_and_config_answer_as_triton_does(naive, triton):
    # perf_analyzer reads both before it sends anything (`make bench` runs it against each service);
    # the naive service calls itself one python model, so perf_analyzer looks for no composing models.
    answers = []
    for url in (naive.grpc_url, triton.grpc_url):
        with grpcclient.InferenceServerClient(url) as raw:
            meta = raw.get_model_metadata(spec.SEARCH_RANK, as_json=True)
            config = raw.get_model_config(spec.SEARCH_RANK, as_json=True)["config"]
            answers.append(({t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"] + meta["outputs"]},
                             config.get("max_batch_size", 0), [t["name"] for t in config["input"]]))
            with pytest.raises(InferenceServerException):
                raw.get_model_metadata("no_such_model")
    assert answers[0] == answers[1]
    assert answers[0][0][spec.CANDIDATE_IDS.name] == ("INT64", ["-1"])


@pytest.mark.server
def test_pinned_server_stops_cleanly_on_sigterm():
    with run_naive_server(PROFILE, cpus=(0,), threads=1) as server:
        assert os.sched_getaffinity(server.process.pid) == {0}
        with SearchClient(server.grpc_url, timeout_s=30.0) as c:
            assert len(c.rank("shoes", 1, [1, 2, 3])) == 3
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
