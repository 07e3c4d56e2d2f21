"""Tokenizer model: UTF-8 text -> token ids and mask padded to a fixed sequence bucket."""
from __future__ import annotations

import triton_python_backend_utils as pb_utils

from model_repository import spec
from model_repository.backends.common import BadRequest, ModelContext, input_array
from model_repository import runtime
from model_repository.runtime import BucketTokenizer


def decode_text(raw: object, label: str, max_bytes: int) -> str:
    if not isinstance(raw, (bytes, bytearray)):
        raise BadRequest(f"{label} must be BYTES holding UTF-8 text")
    if len(raw) > max_bytes:
        raise BadRequest(f"{label} is {len(raw)} bytes long; at most {max_bytes} bytes are accepted")
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"{label} is not valid UTF-8 (byte {e.start}: {e.reason})") from None
    if not text.strip():
        raise BadRequest(f"{label} is empty; a non-empty UTF-8 text is required")
    return text


class TritonPythonModel:
    def initialize(self, args):
        self.ctx = ModelContext(args)
        buckets = tuple(int(b) for b in self.ctx.param("seq_buckets").split(","))
        self.max_bytes = int(self.ctx.param("max_query_bytes"))
        # Ensemble inputs that feed this model, so an error names the tensor the client sent.
        self.label = self.ctx.param("text_label", spec.ENCODER_TEXT.name)
        self.tokenizer = BucketTokenizer(self.ctx.version_dir / runtime.TOKENIZER_FILE, buckets)
        self.tokenizer.encode(["warm up the tokenizer"])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                raw = input_array(request, spec.ENCODER_TEXT.name)
                texts = [decode_text(x, self.label, self.max_bytes) for x in raw.reshape(-1)]
            except BadRequest as err:
                responses.append(self.ctx.invalid(err))
                continue
            ids, mask = self.tokenizer.encode(texts)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor(spec.INPUT_IDS.name, ids),
                pb_utils.Tensor(spec.ATTENTION_MASK.name, mask),
            ]))
        return responses
