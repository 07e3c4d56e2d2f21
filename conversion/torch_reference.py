"""The FP32 end-to-end reference in PyTorch, independent of every served file.

What the end-to-end fidelity gate compares `search_rank` with (DESIGN.md: the FP32 pipeline): the
query and the candidates' titles embedded by the HF checkpoint itself in PyTorch (mean pooling over
real tokens, L2 norm; one text at a time, no padding, no buckets, no ONNX), item and user features
computed from the catalog stage's own records (not the catalog artifact's tables), and the ranker
stage's FP32 PyTorch weights (`ranker_fp32.pt`). Nothing the build compressed, quantized, exported or
stored for serving is read, so a fault anywhere in those paths shows up as disagreement.

    from conversion.torch_reference import reference_top_k
    reference_top_k("ci", "wireless earbuds", user_id=17, candidate_ids=[...], k=10)  # -> [item ids]
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch

from conversion.catalog_generator import Catalog, build_catalog
from conversion.export_encoder import load_torch_encoder
from conversion.stages import is_complete, stage_dir


class TorchReference:
    """A profile's FP32 pipeline in PyTorch. Item embeddings are computed on demand and cached."""

    def __init__(self, profile: str = "ci", model: str = ""):
        from conversion import train_ranker
        from conversion.build_models import profile_settings
        from conversion.catalog_artifact import feature_tables

        settings = profile_settings(profile, model)
        art = settings.artifact
        ranker_dir = stage_dir(train_ranker.STAGE, settings)
        weights = ranker_dir / train_ranker.RANKER_FP32_WEIGHTS
        if not is_complete(ranker_dir) or not weights.is_file():
            raise FileNotFoundError(f"FP32 ranker weights for profile {profile!r} are not built: {weights} "
                                    "(run `make models`)")
        self.encoder, self.tokenizer = load_torch_encoder(art.encoder.model, art.encoder.max_length)
        self.ranker = train_ranker.load_ranker(ranker_dir, train_ranker.RANKER_FP32_WEIGHTS).eval()
        self.catalog = Catalog.load(build_catalog(art.catalog))
        self._feature_tables = feature_tables
        self.title_of = {int(i): t for i, t in zip(self.catalog.item_ids, self.catalog.titles)}
        _, user_ids, user_features = feature_tables(self.catalog, np.zeros(0, np.int64))
        self.user_row = {int(u): user_features[r + 1] for r, u in enumerate(user_ids)}
        self.default_user = user_features[0]
        self._item_emb: dict[int, np.ndarray] = {}
        self.dim = int(self.encoder.model.config.hidden_size)

    @torch.no_grad()
    def embed(self, text: str) -> np.ndarray:
        """One text, unpadded: the checkpoint's mean-pooled, L2-normalised embedding (FP32)."""
        ids = torch.tensor([self.tokenizer.encode(text).ids], dtype=torch.int64)
        return self.encoder(ids, torch.ones_like(ids)).numpy()[0]

    def item_embedding(self, item_id: int) -> np.ndarray:
        """The item's title embedding; an id the catalog lacks gets the cold-start zero vector."""
        if item_id not in self._item_emb:
            title = self.title_of.get(item_id)
            self._item_emb[item_id] = (self.embed(title) if title is not None
                                       else np.zeros(self.dim, np.float32))
        return self._item_emb[item_id]

    @torch.no_grad()
    def scores(self, query: str, user_id: int, candidate_ids: Sequence[int]) -> np.ndarray:
        ids = np.asarray([int(c) for c in candidate_ids], dtype=np.int64)
        n = len(ids)
        q = self.embed(query)
        items = np.stack([self.item_embedding(int(i)) for i in ids]).astype(np.float32)
        item_features, _, _ = self._feature_tables(self.catalog, ids)
        user = np.asarray(self.user_row.get(int(user_id), self.default_user), dtype=np.int64)
        probs = self.ranker(torch.from_numpy(np.repeat(q[None, :], n, axis=0)), torch.from_numpy(items),
                            torch.from_numpy(item_features[1:].astype(np.int64)),
                            torch.from_numpy(np.repeat(user[None, :], n, axis=0)))
        return probs.numpy().reshape(-1)

    def top_k(self, query: str, user_id: int, candidate_ids: Sequence[int], k: int = 10) -> list[int]:
        s = self.scores(query, user_id, candidate_ids)
        order = np.argsort(-s, kind="stable")  # ties keep the candidates' order
        return [int(candidate_ids[i]) for i in order[:k]]


@functools.lru_cache(maxsize=4)
def reference(profile: str = "ci", model: str = "") -> TorchReference:
    return TorchReference(profile, model)


def reference_top_k(profile: str, query: str, user_id: int, candidate_ids: Sequence[int], k: int = 10,
                    model: str = "") -> list[int]:
    """The FP32 PyTorch pipeline's best k of candidate_ids for (query, user), best first."""
    return reference(profile, model).top_k(query, user_id, list(candidate_ids), k)


def reference_scores(profile: str, query: str, user_id: int, candidate_ids: Sequence[int],
                     model: str = "") -> np.ndarray:
    """Its click probabilities, in candidate order."""
    return reference(profile, model).scores(query, user_id, list(candidate_ids))
