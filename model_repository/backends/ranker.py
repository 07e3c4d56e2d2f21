"""CTR ranker model: candidate rows of every request in a dynamic batch scored in one ORT run."""
from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from model_repository import spec
from model_repository.backends.common import ModelContext, input_array
from model_repository import runtime
from model_repository.runtime import ort_session


class TritonPythonModel:
    def initialize(self, args):
        self.ctx = ModelContext(args)
        self.session = ort_session(self.ctx.version_dir / runtime.RANKER_FILE, int(self.ctx.param("intra_op_num_threads", "1")))
        self.inputs = [i.name for i in self.session.get_inputs()]
        for n in (1, 100, spec.MAX_CANDIDATES):  # warm the allocator for typical sizes
            feeds = {}
            for i in self.session.get_inputs():
                dtype = np.int64 if "int64" in i.type else np.float32
                feeds[i.name] = np.zeros([n, *i.shape[1:]], dtype=dtype)
            self.session.run(None, feeds)

    def execute(self, requests):
        parts = {name: [input_array(r, name) for r in requests] for name in self.inputs}
        feeds = {name: np.concatenate(arrays) for name, arrays in parts.items()}
        probs = self.session.run([spec.CLICK_PROB.name], feeds)[0]
        bounds = np.cumsum([len(a) for a in parts[self.inputs[0]]])[:-1]
        return [pb_utils.InferenceResponse([pb_utils.Tensor(spec.CLICK_PROB.name, p)])
                for p in np.split(probs, bounds)]
