"""Ranker model: validates a request, reads its candidates' catalog rows in place, scores them and
keeps the top K, all in one python-backend step.

The batch axis of this model is requests, each with its own [N] candidates (a ragged input), so
Triton's dynamic batcher merges concurrent requests whatever their candidate counts. The rows of
the valid requests in a batch go through ORT in runs of at most `max_rows_per_run` padded rows
(backends/scoring.py) and are split back by each request's row count: a row's score depends on
that row and its request's query only, so merging never changes a score. Nothing per candidate
crosses a model boundary; only the query embedding comes in, and it stays one row per request
inside the ranker graph too (backends/ranker_graph.py).
"""
from __future__ import annotations

import numpy as np
import onnx
import triton_python_backend_utils as pb_utils

from model_repository import runtime, spec
from model_repository.backends.candidates import CatalogReloader, validate_ids
from model_repository.backends.common import BadRequest, ModelContext, input_array
from model_repository.backends.ranker_graph import RequestSessions
from model_repository.backends.scoring import RankerScorer
from model_repository.backends.top_k import select_top_k, top_k_value
from model_repository.runtime import ort_session


def ranker_graph_dims(embedding_dim: int) -> dict[str, list[int]]:
    """Per-candidate dims of every input the ranker graph takes (the batch axis is candidates)."""
    return {spec.query_embedding(0).name: [embedding_dim], spec.item_embedding(0).name: [embedding_dim],
            spec.ITEM_FEATURES.name: list(spec.ITEM_FEATURES.dims), spec.USER_FEATURES.name: list(spec.USER_FEATURES.dims)}


def check_ranker_graph(session, embedding_dim: int) -> None:
    """Fail at load time, naming the tensor, when the ONNX file does not take the rows this model
    builds (e.g. a ranker trained before a feature column was added): otherwise the first
    request would fail."""
    expected = ranker_graph_dims(embedding_dim)
    onnx_inputs = {i.name: i.shape[1:] for i in session.get_inputs()}
    if set(expected) != set(onnx_inputs):
        raise ValueError(f"{runtime.RANKER_FILE} inputs {sorted(onnx_inputs)} != expected {sorted(expected)}")
    for name, dims in onnx_inputs.items():
        fixed = [d if isinstance(d, int) else -1 for d in dims]
        if fixed != expected[name]:
            raise ValueError(f"{runtime.RANKER_FILE} input {name} has per-candidate dims {fixed}, the served "
                             f"encoder and catalog give {expected[name]}: rebuild the ranker stage for this spec")


def one_request(array: np.ndarray | None, name: str) -> np.ndarray | None:
    """A request's tensor without its batch axis: this model takes one request per call."""
    if array is None:
        return None
    if array.ndim < 1 or array.shape[0] != 1:
        raise BadRequest(f"{name} must come one request at a time (batch 1), got shape {list(array.shape)}")
    return array[0]


class TritonPythonModel:
    def initialize(self, args):
        self.ctx = ModelContext(args)
        self.max_candidates = int(self.ctx.param("max_candidates"))
        self.q_name = spec.query_embedding(0).name
        dim = int(next(t["dims"][-1] for t in self.ctx.config["input"] if t["name"] == self.q_name))
        # The exported graph takes the query on every candidate row; the request form takes it once
        # per request (backends/ranker_graph.py), checked against the exported one here.
        threads = int(self.ctx.param("intra_op_num_threads", "1"))
        model = onnx.load(str(self.ctx.version_dir / runtime.RANKER_FILE))
        exported = ort_session(model.SerializeToString(), threads)
        check_ranker_graph(exported, dim)
        self.sessions = RequestSessions(model, exported, threads)
        self.scorer = RankerScorer(self.sessions, int(self.ctx.param("max_rows_per_run")))
        self.catalog = CatalogReloader(self.ctx.version_dir / runtime.CATALOG_FOLDER, dim, pb_utils.Logger)
        storage = self.catalog.tables.item_embeddings.dtype.name
        self.sessions(storage)  # built and checked now, not on the first request
        pb_utils.Logger.log_info(f"ranker graph in request form for {storage} item rows, similarity heads "
                                 f"{'rewritten per request' if self.sessions.rewritten else 'as exported'}")
        # Warm the whole scoring path (catalog gather, the reused feeds, ORT's arena) up to the largest
        # merged batch and the longest ORT run: the first batch of a never-seen size otherwise stalls
        # every request queued behind it.
        tables = self.catalog.tables
        max_requests = max(1, int(self.ctx.config.get("max_batch_size", 1)))
        query, user = np.zeros(dim, np.float32), np.array([0], np.int64)
        largest = tables.item_ids[: self.max_candidates]
        filling = tables.item_ids[: max(1, self.scorer.max_rows // max_requests)]
        for ids, requests in [(largest, 1), (largest, max_requests), (filling, max_requests)]:
            self.scorer.score(tables, [(query, user, ids)] * requests)

    def _parse(self, request):
        """(query [d], user id [1], candidates [N], k) of a valid request; BadRequest names the tensor."""
        query = one_request(input_array(request, self.q_name), self.q_name)
        user_id = one_request(input_array(request, spec.USER_ID.name), spec.USER_ID.name)
        candidates = one_request(input_array(request, spec.CANDIDATE_IDS.name), spec.CANDIDATE_IDS.name)
        top_k = one_request(input_array(request, spec.TOP_K.name), spec.TOP_K.name)
        validate_ids(user_id, candidates, self.max_candidates)
        return query.reshape(-1), user_id.reshape(-1), candidates, top_k_value(top_k, len(candidates))

    def execute(self, requests):
        self.catalog.refresh()
        tables = self.catalog.tables
        responses: list = [None] * len(requests)
        valid = []
        for i, request in enumerate(requests):
            try:
                valid.append((i, *self._parse(request)))
            except BadRequest as err:
                responses[i] = self.ctx.invalid(err)
        if not valid:
            return responses
        probs = self.scorer.score(tables, [(query, user_id, candidates) for _, query, user_id, candidates, _ in valid])
        start = 0
        for i, _, _, candidates, k in valid:
            n = len(candidates)
            ids, scores = select_top_k(probs[start:start + n], candidates, k)
            start += n
            responses[i] = pb_utils.InferenceResponse([
                pb_utils.Tensor(spec.ITEM_IDS.name, ids.reshape(1, -1)),
                pb_utils.Tensor(spec.SCORES.name, scores.reshape(1, -1))])
        return responses
