"""The request form of the ranker graph (model_repository/backends/ranker_graph.py): its structure,
and its scores against the exported per-row graph run by ONNX Runtime on the same rows."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from model_repository import runtime, spec
from model_repository.backends.ranker_graph import (ITEM, QUERY, SCALE, RequestGraphError, RequestSessions,
                                                    check_request_graph, request_graph, sample_row_feeds)
from model_repository.runtime import ort_session

pytestmark = pytest.mark.unit

D = 6


def toy_ranker(similarity_heads: bool, weight_scale: float = 1.0) -> onnx.ModelProto:
    """A per-row graph with the exported ranker's inputs: with `similarity_heads`, (q * i) @ W as the
    ranker model exports it; without, q and i added, which no rewrite may assume anything about."""
    rng = np.random.default_rng(0)
    w = (weight_scale * rng.normal(size=(D, 3))).astype(np.float32)
    f = rng.normal(size=(2, 3)).astype(np.float32)
    nodes = [helper.make_node("Mul" if similarity_heads else "Add", [QUERY, ITEM], ["qi"]),
             helper.make_node("MatMul", ["qi", "w"], ["sims"]),
             helper.make_node("Concat", [spec.ITEM_FEATURES.name, spec.USER_FEATURES.name], ["cat"], axis=1),
             helper.make_node("Cast", ["cat"], ["catf"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["catf", "f"], ["feat"]),
             helper.make_node("Add", ["sims", "feat"], ["logit3"]),
             helper.make_node("ReduceSum", ["logit3", "axes"], ["logit"], keepdims=1),
             helper.make_node("Sigmoid", ["logit"], [spec.CLICK_PROB.name])]
    graph = helper.make_graph(
        nodes, "toy",
        [helper.make_tensor_value_info(QUERY, TensorProto.FLOAT, ["candidates", D]),
         helper.make_tensor_value_info(ITEM, TensorProto.FLOAT, ["candidates", D]),
         helper.make_tensor_value_info(spec.ITEM_FEATURES.name, TensorProto.INT64, ["candidates", 1]),
         helper.make_tensor_value_info(spec.USER_FEATURES.name, TensorProto.INT64, ["candidates", 1])],
        [helper.make_tensor_value_info(spec.CLICK_PROB.name, TensorProto.FLOAT, ["candidates", 1])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(f, "f"),
         numpy_helper.from_array(np.array([1], np.int64), "axes")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def session(model: onnx.ModelProto):
    return ort_session(model.SerializeToString())


def row_feeds(counts, seed=1):
    rng = np.random.default_rng(seed)
    n = sum(counts)
    return {QUERY: np.repeat(rng.normal(size=(len(counts), D)).astype(np.float32), counts, axis=0),
            ITEM: rng.normal(size=(n, D)).astype(np.float32),
            spec.ITEM_FEATURES.name: rng.integers(0, 5, (n, 1)),
            spec.USER_FEATURES.name: rng.integers(0, 5, (n, 1))}


@pytest.mark.parametrize("storage", ["float32", "float16", "int8"])
@pytest.mark.parametrize("similarity_heads", [True, False])
def test_request_form_scores_the_rows_the_exported_graph_scores(similarity_heads, storage):
    model = toy_ranker(similarity_heads)
    form, rewritten = request_graph(model, storage)
    assert rewritten == similarity_heads
    counts = [4, 1, 7, 2]
    assert check_request_graph(session(model), session(form), row_feeds(counts), counts, storage) <= 1e-6


@pytest.mark.parametrize("storage", ["float16", "int8"])
def test_compact_rows_are_widened_inside_the_graph(storage):
    form, _ = request_graph(toy_ranker(True), storage)
    types = {i.name: i.type.tensor_type.elem_type for i in form.graph.input}
    assert types[ITEM] == {"float16": TensorProto.FLOAT16, "int8": TensorProto.INT8}[storage]
    assert (SCALE in types) == (storage == "int8")
    assert [n.op_type for n in form.graph.node if ITEM in n.input] == ["Cast"]


def test_an_unknown_storage_is_refused():
    with pytest.raises(RequestGraphError, match="bfloat16"):
        request_graph(toy_ranker(True), "bfloat16")


def test_the_rewrite_leaves_no_per_row_query():
    form, _ = request_graph(toy_ranker(True))
    dims = {i.name: len(i.type.tensor_type.shape.dim) for i in form.graph.input}
    assert dims[QUERY] == 2 and dims[ITEM] == 3
    readers = [n.op_type for n in form.graph.node if QUERY in n.input]
    assert readers == ["Unsqueeze"]  # the query becomes one [d, h] matrix per request
    assert [n.op_type for n in form.graph.node if ITEM in n.input] == ["MatMul"]


def test_a_request_form_that_changes_scores_is_refused():
    counts = [3, 2]
    wrong, _ = request_graph(toy_ranker(True, weight_scale=1.001))
    with pytest.raises(RequestGraphError, match="differs from the exported graph"):
        check_request_graph(session(toy_ranker(True)), session(wrong), row_feeds(counts), counts)


def test_a_graph_without_the_ranker_inputs_is_refused():
    model = toy_ranker(True)
    model.graph.input[0].name = "SOMETHING_ELSE"
    with pytest.raises(RequestGraphError, match=QUERY):
        request_graph(model)


@pytest.mark.parametrize("storage", ["float32", "float16", "int8"])
def test_the_stage_ranker_is_rewritten_and_checked(ci_repository, storage):
    model = onnx.load(str(ci_repository / spec.RANKER / "1" / runtime.RANKER_FILE))
    exported = session(model)
    sessions = RequestSessions(model, exported)
    form = sessions(storage)
    assert sessions.rewritten  # the stage's ranker has the similarity heads the rewrite targets
    assert sessions(storage) is form  # built once per storage
    counts = [1000, 5, 37]
    check_request_graph(exported, form, sample_row_feeds(exported, counts, seed=3), counts, storage, tolerance=1e-6)
