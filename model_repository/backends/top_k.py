"""Top-k model: orders candidates by predicted click probability (ties keep request order)."""
from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from model_repository import spec
from model_repository.backends.common import BadRequest, ModelContext, input_array


def select_top_k(probs: np.ndarray, candidates: np.ndarray, top_k: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    n = len(candidates)
    k = n
    if top_k is not None:
        if top_k.size != 1:
            raise BadRequest(f"{spec.TOP_K.name} must hold one value, got {top_k.size}")
        k = int(top_k.reshape(-1)[0])
        if k < 1:
            raise BadRequest(f"{spec.TOP_K.name} must be >= 1, got {k}")
    order = np.argsort(-probs.reshape(-1), kind="stable")[: min(k, n)]
    return candidates[order].astype(np.int64), probs.reshape(-1)[order].astype(np.float32)


class TritonPythonModel:
    def initialize(self, args):
        self.ctx = ModelContext(args)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                ids, scores = select_top_k(input_array(request, spec.CLICK_PROB.name),
                                           input_array(request, spec.CANDIDATE_IDS.name),
                                           input_array(request, spec.TOP_K.name))
            except BadRequest as err:
                responses.append(self.ctx.invalid(err))
                continue
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor(spec.ITEM_IDS.name, ids), pb_utils.Tensor(spec.SCORES.name, scores)]))
        return responses
