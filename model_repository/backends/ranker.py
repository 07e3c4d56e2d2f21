"""CTR ranker model: candidate rows of every request in a dynamic batch scored in one ORT run.

Candidates are the batch axis, so Triton's dynamic batcher merges the rows of concurrent
requests; one ORT call scores them all and the result is split back by each request's row
count (a row's score depends on that row only, so merging never changes a score).
"""
from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from model_repository import runtime, spec
from model_repository.backends.common import ModelContext, input_array
from model_repository.runtime import ort_session


def check_inputs_match_config(session, config: dict) -> None:
    """Fail at load time, naming the tensor, when the ONNX file and config.pbtxt disagree (e.g. a
    ranker trained before a feature column was added): otherwise the first request would fail."""
    declared = {t["name"]: [int(d) for d in t["dims"]] for t in config.get("input", [])}
    onnx_inputs = {i.name: i.shape[1:] for i in session.get_inputs()}
    if set(declared) != set(onnx_inputs):
        raise ValueError(f"{runtime.RANKER_FILE} inputs {sorted(onnx_inputs)} != config inputs {sorted(declared)}")
    for name, dims in onnx_inputs.items():
        fixed = [d if isinstance(d, int) else -1 for d in dims]
        if fixed != declared[name]:
            raise ValueError(f"{runtime.RANKER_FILE} input {name} has per-candidate dims {fixed}, config.pbtxt "
                             f"declares {declared[name]}: rebuild the ranker stage for this spec")


class TritonPythonModel:
    def initialize(self, args):
        self.ctx = ModelContext(args)
        self.session = ort_session(self.ctx.version_dir / runtime.RANKER_FILE,
                                   int(self.ctx.param("intra_op_num_threads", "1")))
        check_inputs_match_config(self.session, self.ctx.config)
        self.inputs = [i.name for i in self.session.get_inputs()]
        for n in (1, 100, spec.MAX_CANDIDATES):  # warm the allocator for typical sizes
            feeds = {}
            for i in self.session.get_inputs():
                dtype = np.int64 if "int64" in i.type else np.float32
                feeds[i.name] = np.zeros([n, *i.shape[1:]], dtype=dtype)  # zeros: the cold-start row
            self.session.run(None, feeds)

    def execute(self, requests):
        parts = {name: [input_array(r, name) for r in requests] for name in self.inputs}
        feeds = {name: np.concatenate(arrays) if len(arrays) > 1 else arrays[0] for name, arrays in parts.items()}
        probs = self.session.run([spec.CLICK_PROB.name], feeds)[0]
        bounds = np.cumsum([len(a) for a in parts[self.inputs[0]]])[:-1]
        return [pb_utils.InferenceResponse([pb_utils.Tensor(spec.CLICK_PROB.name, p)])
                for p in np.split(probs, bounds)]
