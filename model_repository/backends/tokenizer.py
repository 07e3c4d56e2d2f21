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


class TextInput:
    """What a model that takes TEXT reads from its config: the bucketed tokenizer, the byte limit, and
    the ensemble inputs that feed it (so an error names the tensor the client sent)."""

    def __init__(self, ctx: ModelContext):
        buckets = tuple(int(b) for b in ctx.param("seq_buckets").split(","))
        self.buckets = buckets
        self.max_bytes = int(ctx.param("max_query_bytes"))
        self.label = ctx.param("text_label", spec.ENCODER_TEXT.name)
        self.tokenizer = BucketTokenizer(ctx.version_dir / runtime.TOKENIZER_FILE, buckets)

    def texts(self, request) -> list[str]:
        """The request's texts, decoded and checked (BadRequest naming the tensor)."""
        raw = input_array(request, spec.ENCODER_TEXT.name)
        return [decode_text(x, self.label, self.max_bytes) for x in raw.reshape(-1)]


class TritonPythonModel:
    def initialize(self, args):
        self.ctx = ModelContext(args)
        self.text = TextInput(self.ctx)
        self.text.tokenizer.encode(["warm up the tokenizer"])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                texts = self.text.texts(request)
            except BadRequest as err:
                responses.append(self.ctx.invalid(err))
                continue
            ids, mask = self.text.tokenizer.encode(texts)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor(spec.INPUT_IDS.name, ids),
                pb_utils.Tensor(spec.ATTENTION_MASK.name, mask),
            ]))
        return responses
