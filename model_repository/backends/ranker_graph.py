"""The ranker graph the ranker stage exports (one row per candidate) rewritten to take requests.

The exported graph reads its inputs per candidate row: the query embedding repeated on every row
of its request. Served as is, the stub writes that copy (1.5 MB per 1000 candidates) and the graph
multiplies it into every item row. The request form takes what a request has:

- QUERY_EMBEDDING [R, d]: one row per request;
- ITEM_EMBEDDING [R, M, d]: each request's candidate rows, padded to the longest request of the run;
- ITEM_FEATURES [R * M, k], USER_FEATURES [R * M, u]: per row, as before (a few bytes each);
- CLICK_PROB [R * M, 1]: per row; the padding rows' scores are dropped by the caller.

Where the graph's similarity heads are the ranker model's diagonal bilinear form, (q * i) @ W with W
a constant (conversion/ranker_model.SimilarityHeads), they become i @ (q[:, None] * W): one [d, h]
matrix per request, and the per-row multiply is gone. Any other graph gets the query rows expanded
inside ORT, so it is served unchanged.

The item rows come in the catalog's storage precision (runtime.CatalogTables: float32, float16, or
int8 with ITEM_EMBEDDING_SCALE [R, M, 1], one scale per row) and are widened inside ORT: numpy's
float16 -> float32 conversion of the gathered rows cost more than the rest of the ranker's work.
An int8 row's scale multiplies the similarities (s * (i8 @ Wq) = (s * i8) @ Wq), or the widened rows
where the heads were not rewritten. `check_request_graph` runs each form against the exported graph
on the same (stored, then widened) rows at load time and refuses one that changes a score.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from model_repository import spec

QUERY = spec.query_embedding(0).name
ITEM = spec.item_embedding(0).name
# Not a Triton tensor: the ranker graph's own input for int8 catalogs.
SCALE = "ITEM_EMBEDDING_SCALE"
STORAGE = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16, "int8": onnx.TensorProto.INT8}
# the exported graph's per-row inputs, kept inside the rewritten graph as intermediate tensors
ROW_PREFIX = "rows/"


class RequestGraphError(ValueError):
    """The request form of the ranker graph does not reproduce the exported graph."""


def _consumers(graph: onnx.GraphProto, name: str) -> list[onnx.NodeProto]:
    return [n for n in graph.node if name in n.input]


def _similarity_heads(graph: onnx.GraphProto):
    """(Mul node, MatMul node, W [d, h]) when QUERY and ITEM are read only by Mul(QUERY, ITEM) feeding
    only MatMul(., W) with W a graph constant; else None."""
    initializers = {i.name: i for i in graph.initializer}
    q_users, i_users = _consumers(graph, QUERY), _consumers(graph, ITEM)
    if len(q_users) != 1 or q_users != i_users:
        return None
    mul = q_users[0]
    if mul.op_type != "Mul" or set(mul.input) != {QUERY, ITEM}:
        return None
    after = _consumers(graph, mul.output[0])
    if len(after) != 1 or after[0].op_type != "MatMul" or list(after[0].input).index(mul.output[0]) != 0:
        return None
    matmul = after[0]
    weight = initializers.get(matmul.input[1])
    if weight is None or len(weight.dims) != 2 or any(o.name == mul.output[0] for o in graph.output):
        return None
    return mul, matmul, weight


def _rename_input(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name == old:
                node.input[k] = new


def request_graph(model: onnx.ModelProto, storage: str = "float32") -> tuple[onnx.ModelProto, bool]:
    """The request form of an exported ranker graph for item rows stored as `storage` (a key of
    STORAGE), and whether its similarity heads were rewritten."""
    if storage not in STORAGE:
        raise RequestGraphError(f"item embeddings stored as {storage!r}; the ranker takes {sorted(STORAGE)}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inputs = {i.name: i for i in g.input}
    if QUERY not in inputs or ITEM not in inputs:
        raise RequestGraphError(f"the ranker graph has no {QUERY} or {ITEM} input")
    if inputs[ITEM].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise RequestGraphError(f"the ranker graph's {ITEM} is not float32")
    dim = inputs[ITEM].type.tensor_type.shape.dim[-1]
    if not dim.HasField("dim_value"):
        raise RequestGraphError(f"the ranker graph's {ITEM} has no fixed width")
    d = int(dim.dim_value)
    const = lambda name, values: g.initializer.append(  # noqa: E731
        numpy_helper.from_array(np.asarray(values, dtype=np.int64), name))
    scaled = storage == "int8"
    items = ITEM  # the item block as float32 [R, M, d]
    new_nodes: list[onnx.NodeProto] = []
    if storage != "float32":
        items = "request/items"
        new_nodes.append(helper.make_node("Cast", [ITEM], [items], to=onnx.TensorProto.FLOAT))
    heads = _similarity_heads(g)
    if heads is not None:
        mul, matmul, weight = heads
        h = int(weight.dims[1])
        const("request/axis2", [2])
        const("request/heads_shape", [-1, h])
        sims = "request/similarities"
        new_nodes += [
            helper.make_node("Unsqueeze", [QUERY, "request/axis2"], ["request/query_column"]),
            helper.make_node("Mul", ["request/query_column", weight.name], ["request/query_weights"]),
            helper.make_node("MatMul", [items, "request/query_weights"], [sims]),
        ]
        if scaled:
            new_nodes.append(helper.make_node("Mul", [sims, SCALE], ["request/scaled_similarities"]))
            sims = "request/scaled_similarities"
        new_nodes.append(helper.make_node("Reshape", [sims, "request/heads_shape"], [matmul.output[0]]))
        g.node.remove(mul)
        g.node.remove(matmul)
    else:
        # Any other graph: hand it the per-row tensors it was exported for, built inside ORT.
        const("request/axis1", [1])
        const("request/rows_shape", [-1, d])
        _rename_input(g, QUERY, ROW_PREFIX + QUERY)
        _rename_input(g, ITEM, ROW_PREFIX + ITEM)
        if scaled:
            new_nodes.append(helper.make_node("Mul", [items, SCALE], ["request/scaled_items"]))
            items = "request/scaled_items"
        new_nodes += [
            helper.make_node("Shape", [ITEM], ["request/item_shape"]),
            helper.make_node("Unsqueeze", [QUERY, "request/axis1"], ["request/query_row"]),
            helper.make_node("Expand", ["request/query_row", "request/item_shape"], ["request/query_rows"]),
            helper.make_node("Reshape", ["request/query_rows", "request/rows_shape"], [ROW_PREFIX + QUERY]),
            helper.make_node("Reshape", [items, "request/rows_shape"], [ROW_PREFIX + ITEM]),
        ]
    nodes = new_nodes + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]  # shapes inferred for the per-row graph; ORT infers the new ones
    q_type = inputs[QUERY].type.tensor_type.elem_type
    for k, vi in enumerate(g.input):
        if vi.name == QUERY:
            g.input[k].CopyFrom(helper.make_tensor_value_info(QUERY, q_type, ["requests", d]))
        elif vi.name == ITEM:
            g.input[k].CopyFrom(helper.make_tensor_value_info(ITEM, STORAGE[storage], ["requests", "rows", d]))
    if scaled:
        g.input.append(helper.make_tensor_value_info(SCALE, onnx.TensorProto.FLOAT, ["requests", "rows", 1]))
    onnx.checker.check_model(out)
    return out, heads is not None


def request_feeds(row_feeds: dict[str, np.ndarray], counts: list[int], storage: str = "float32"
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """For per-row feeds of requests of `counts` rows each (the query repeated on its rows): the
    request-form feeds with the item rows stored as `storage` and each request padded with its last
    row, and the per-row feeds with the item rows as the catalog would widen those stored rows. For
    checks, not for serving."""
    from model_repository.runtime import stored_embeddings

    m, r = max(counts), len(counts)
    starts = np.cumsum([0] + counts[:-1])
    take = np.concatenate([s + np.minimum(np.arange(m), n - 1) for s, n in zip(starts, counts)])
    stored, scales = stored_embeddings(row_feeds[ITEM], storage)
    widened = stored.astype(np.float32) if scales is None else stored * scales[:, None]
    rows = {**row_feeds, ITEM: widened.astype(np.float32)}
    out = {name: a[take] for name, a in row_feeds.items() if name not in (QUERY, ITEM)}
    out[QUERY] = row_feeds[QUERY][starts]
    out[ITEM] = stored[take].reshape(r, m, -1)
    if scales is not None:
        out[SCALE] = scales[take].reshape(r, m, 1)
    return out, rows


def check_request_graph(row_session, request_session, row_feeds: dict[str, np.ndarray], counts: list[int],
                        storage: str = "float32", tolerance: float = 1e-5) -> float:
    """Largest score difference between the exported graph and its request form for `storage` on the
    same rows; RequestGraphError above `tolerance`."""
    feeds, rows = request_feeds(row_feeds, counts, storage)
    want = row_session.run([spec.CLICK_PROB.name], rows)[0].reshape(-1)
    got = request_session.run([spec.CLICK_PROB.name], feeds)[0].reshape(-1)
    m = max(counts)
    keep = np.concatenate([np.arange(n) + i * m for i, n in enumerate(counts)])
    diff = float(np.abs(got[keep] - want).max())
    if not diff <= tolerance:
        raise RequestGraphError(f"the ranker's request graph for {storage} item rows differs from the exported "
                                f"graph by {diff:.2e} (> {tolerance:g})")
    return diff


def sample_row_feeds(session, counts: list[int], seed: int = 0) -> dict[str, np.ndarray]:
    """Per-row feeds for a check: unit query and item embeddings (one query per request, repeated
    on its rows) and the cold-start row's features, which every catalog has."""
    rng = np.random.default_rng(seed)
    n = sum(counts)
    feeds = {}
    for i in session.get_inputs():
        width = int(i.shape[-1])
        if i.name in (QUERY, ITEM):
            x = rng.normal(size=(len(counts) if i.name == QUERY else n, width)).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            feeds[i.name] = np.repeat(x, counts, axis=0) if i.name == QUERY else x
        else:
            feeds[i.name] = np.zeros((n, width), dtype=np.int64)
    return feeds


class RequestSessions:
    """ORT sessions of the request form of an exported ranker graph, one per catalog storage
    precision, each built and checked against the exported graph the first time a catalog of that
    precision is served (a catalog swap may change it)."""

    def __init__(self, model: onnx.ModelProto, exported, threads: int = 1):
        self.model, self.exported, self.threads = model, exported, threads
        self._sessions: dict[str, object] = {}
        self.rewritten: bool | None = None

    def __call__(self, storage: str):
        session = self._sessions.get(storage)
        if session is None:
            session, self.rewritten = request_session(self.model, self.exported, self.threads, storage)
            self._sessions[storage] = session
        return session


def request_session(model: onnx.ModelProto, exported, threads: int = 1, storage: str = "float32"):
    """(ORT session of the request form of the exported ranker graph `model` for item rows stored as
    `storage`, whether its similarity heads were rewritten), checked against `exported`, the
    exported graph's own session."""
    from model_repository.runtime import ort_session

    form, rewritten = request_graph(model, storage)
    session = ort_session(form.SerializeToString(), threads)
    counts = [3, 1, 5]
    # Both graphs see the same stored-then-widened rows, so int8's rounding is not in the bound.
    check_request_graph(exported, session, sample_row_feeds(exported, counts), counts, storage)
    return session, rewritten
