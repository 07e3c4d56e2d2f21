"""Query encoder model: ONNX Runtime on CPU, merging all requests of a dynamic batch into one run."""
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
        self.session = ort_session(self.ctx.version_dir / runtime.ENCODER_FILE, int(self.ctx.param("intra_op_num_threads", "1")))
        self.output = self.session.get_outputs()[0].name
        # Warm every bucket so the first real request of each length is not the slow one.
        for length in spec.SEQ_BUCKETS:
            ones = np.ones((1, length), dtype=np.int64)
            self._run(ones, ones)

    def _run(self, ids, mask):
        return self.session.run([self.output], {spec.INPUT_IDS.name: ids, spec.ATTENTION_MASK.name: mask})[0]

    def execute(self, requests):
        ids = [input_array(r, spec.INPUT_IDS.name) for r in requests]
        masks = [input_array(r, spec.ATTENTION_MASK.name) for r in requests]
        width = max(x.shape[1] for x in ids)
        # The batcher only merges equal shapes, but a mixed call must not fail: padded positions
        # carry mask 0, so their ids never reach the pooled embedding.
        if any(x.shape[1] != width for x in ids):
            ids = [np.pad(x, ((0, 0), (0, width - x.shape[1]))) for x in ids]
            masks = [np.pad(x, ((0, 0), (0, width - x.shape[1]))) for x in masks]
        emb = self._run(np.concatenate(ids), np.concatenate(masks))
        bounds = np.cumsum([len(x) for x in ids])[:-1]
        return [pb_utils.InferenceResponse([pb_utils.Tensor(self.output, part)])
                for part in np.split(emb, bounds)]
