"""The blocking client: one gRPC channel, a deadline on every call, retries within it."""
from __future__ import annotations

import logging
import time
from typing import Sequence

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from search_rank_client import _common as common
from search_rank_client import contract
from search_rank_client._common import RankedItem, SearchError

log = logging.getLogger(__name__)


class SearchClient(common.ClientBase):
    """`url`: "host:port", "dns:///name:port", "a:port,b:port" or a list of addresses.

    Thread-safe: one client (one channel) is meant to be shared by a service's threads."""

    _grpc_module = grpcclient

    def __enter__(self) -> "SearchClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._grpc.close()

    def _infer(self, model: str, inputs, outputs: Sequence[contract.Tensor], timeout_s: float | None):
        requested = common.requested_outputs(outputs)
        attempts = self._attempts(timeout_s)
        while True:
            try:
                result = self._grpc.infer(model, inputs, outputs=requested, client_timeout=attempts.next_timeout_s())
            except InferenceServerException as exc:
                pause = attempts.failed(exc)
                log.debug("%s failed on attempt %d, retrying in %.2f s: %s", model, attempts.attempt, pause, exc)
                time.sleep(pause)
                continue
            attempts.succeeded()
            return [result.as_numpy(t.name) for t in outputs]

    def rank(self, query: str | bytes, user_id: int, candidate_ids: Sequence[int] | np.ndarray,
             top_k: int | None = None, timeout_s: float | None = None) -> list[RankedItem]:
        """Candidates ordered by predicted click probability, best first (at most `top_k`)."""
        inputs = common.rank_inputs(query, user_id, candidate_ids, top_k)
        item_ids, scores = self._infer(contract.SEARCH_RANK, inputs, common.RANK_OUTPUTS, timeout_s)
        return common.ranked(item_ids, scores)

    def embed(self, text: str | bytes, timeout_s: float | None = None) -> np.ndarray:
        """L2-normalised text embedding [d] from the served encoder."""
        (emb,) = self._infer(contract.TEXT_EMBED, common.embed_inputs(text), common.EMBED_OUTPUTS, timeout_s)
        return emb.reshape(-1)

    def is_live(self) -> bool:
        try:
            return bool(self._grpc.is_server_live(client_timeout=self.timeout_s))
        except InferenceServerException:
            return False

    def is_ready(self) -> bool:
        """Server ready and both public ensembles ready."""
        try:
            return bool(self._grpc.is_server_ready(client_timeout=self.timeout_s)) and all(
                self._grpc.is_model_ready(m, client_timeout=self.timeout_s)
                for m in (contract.SEARCH_RANK, contract.TEXT_EMBED))
        except InferenceServerException:
            return False

    def wait_ready(self, timeout_s: float = 60.0, interval_s: float = 0.25) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.is_ready():
            if time.monotonic() > deadline:
                raise SearchError("UNAVAILABLE", f"{self.url} not ready after {timeout_s:.0f} s")
            time.sleep(interval_s)
