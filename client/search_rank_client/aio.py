"""The asyncio client: the blocking client's deadlines, retry policy, retry budget, round_robin
balancing and typed errors, on tritonclient's grpc.aio channel. Create and use it inside one
running event loop (the channel belongs to the loop it was made in)."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Sequence

import numpy as np
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from search_rank_client import _common as common
from search_rank_client import contract
from search_rank_client._common import RankedItem, SearchError

log = logging.getLogger(__name__)


class AsyncSearchClient(common.ClientBase):
    """`url`: as SearchClient's. `async with AsyncSearchClient(url) as c: await c.rank(...)`."""

    _grpc_module = grpcaio

    async def __aenter__(self) -> "AsyncSearchClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._grpc.close()

    async def _infer(self, model: str, inputs, outputs: Sequence[contract.Tensor], timeout_s: float | None):
        requested = common.requested_outputs(outputs)
        attempts = self._attempts(timeout_s)
        while True:
            try:
                result = await self._grpc.infer(model, inputs, outputs=requested,
                                                client_timeout=attempts.next_timeout_s())
            except InferenceServerException as exc:
                pause = attempts.failed(exc)
                log.debug("%s failed on attempt %d, retrying in %.2f s: %s", model, attempts.attempt, pause, exc)
                await asyncio.sleep(pause)
                continue
            attempts.succeeded()
            return [result.as_numpy(t.name) for t in outputs]

    async def rank(self, query: str | bytes, user_id: int, candidate_ids: Sequence[int] | np.ndarray,
                   top_k: int | None = None, timeout_s: float | None = None) -> list[RankedItem]:
        """Candidates ordered by predicted click probability, best first (at most `top_k`)."""
        inputs = common.rank_inputs(query, user_id, candidate_ids, top_k)
        item_ids, scores = await self._infer(contract.SEARCH_RANK, inputs, common.RANK_OUTPUTS, timeout_s)
        return common.ranked(item_ids, scores)

    async def embed(self, text: str | bytes, timeout_s: float | None = None) -> np.ndarray:
        """L2-normalised text embedding [d] from the served encoder."""
        (emb,) = await self._infer(contract.TEXT_EMBED, common.embed_inputs(text), common.EMBED_OUTPUTS, timeout_s)
        return emb.reshape(-1)

    async def is_live(self) -> bool:
        try:
            return bool(await self._grpc.is_server_live(client_timeout=self.timeout_s))
        except InferenceServerException:
            return False

    async def is_ready(self) -> bool:
        """Server ready and both public ensembles ready."""
        try:
            if not await self._grpc.is_server_ready(client_timeout=self.timeout_s):
                return False
            for model in (contract.SEARCH_RANK, contract.TEXT_EMBED):
                if not await self._grpc.is_model_ready(model, client_timeout=self.timeout_s):
                    return False
            return True
        except InferenceServerException:
            return False

    async def wait_ready(self, timeout_s: float = 60.0, interval_s: float = 0.25) -> None:
        deadline = time.monotonic() + timeout_s
        while not await self.is_ready():
            if time.monotonic() > deadline:
                raise SearchError("UNAVAILABLE", f"{self.url} not ready after {timeout_s:.0f} s")
            await asyncio.sleep(interval_s)
