"""The offline PyTorch pipeline that `search_rank` must reproduce.

Deliberately independent of the serving code path: the encoder on the unpadded tokenizer
output (no buckets; PyTorch for an FP32 export, plain ONNX Runtime on the same file for a
quantized one, since INT8 kernels only exist there), features looked up through plain dicts
built from the catalog artifact, and the PyTorch ranker. Tests compare the served ranking
with this.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from conversion.export_encoder import ENCODER_ONNX, REPORT_JSON, TOKENIZER_JSON, load_torch_encoder
from conversion.train_ranker import load_ranker
from model_repository.runtime import CatalogTables


class ReferencePipeline:
    def __init__(self, encoder_dir: Path, catalog_dir: Path, ranker_dir: Path):
        report = json.loads((Path(encoder_dir) / REPORT_JSON).read_text())
        if "int8" in report:  # the compressed encoder folder
            import onnxruntime as ort
            import tokenizers

            self.session = ort.InferenceSession(str(Path(encoder_dir) / ENCODER_ONNX),
                                                providers=["CPUExecutionProvider"])
            self.tokenizer = tokenizers.Tokenizer.from_file(str(Path(encoder_dir) / TOKENIZER_JSON))
            self.tokenizer.no_padding()
            self.encoder = None
        else:
            self.encoder, self.tokenizer = load_torch_encoder(report["source_model"])
        self.ranker = load_ranker(Path(ranker_dir))
        tables = CatalogTables.load(catalog_dir, mmap=False)
        self.items = {int(i): (tables.item_embeddings[r + 1], tables.item_features[r + 1])
                      for r, i in enumerate(tables.item_ids)}
        self.cold_item = (tables.item_embeddings[0], tables.item_features[0])
        self.users = {int(u): tables.user_features[r + 1] for r, u in enumerate(tables.user_ids)}
        self.default_user = tables.user_features[0]

    @torch.no_grad()
    def embed(self, text: str) -> np.ndarray:
        enc = self.tokenizer.encode(text)
        ids = torch.tensor([enc.ids], dtype=torch.int64)
        if self.encoder is None:
            feeds = dict(zip((i.name for i in self.session.get_inputs()), (ids.numpy(), np.ones_like(ids.numpy()))))
            return self.session.run(None, feeds)[0][0]
        return self.encoder(ids, torch.ones_like(ids)).numpy()[0]

    @torch.no_grad()
    def scores(self, query: str, user_id: int, candidate_ids: Sequence[int]) -> np.ndarray:
        q = self.embed(query)
        rows = [self.items.get(int(c), self.cold_item) for c in candidate_ids]
        user = self.users.get(int(user_id), self.default_user)
        n = len(rows)
        probs = self.ranker(
            torch.from_numpy(np.repeat(q[None, :], n, axis=0)),
            torch.from_numpy(np.stack([r[0] for r in rows]).astype(np.float32)),
            torch.from_numpy(np.stack([r[1] for r in rows]).astype(np.int64)),
            torch.from_numpy(np.repeat(np.asarray(user, dtype=np.int64)[None, :], n, axis=0)),
        )
        return probs.numpy().reshape(-1)

    def rank(self, query: str, user_id: int, candidate_ids: Sequence[int],
             top_k: int | None = None) -> list[tuple[int, float]]:
        s = self.scores(query, user_id, candidate_ids)
        ranked = sorted(zip((int(c) for c in candidate_ids), s.tolist()), key=lambda t: -t[1])
        return ranked[: top_k or len(ranked)]
