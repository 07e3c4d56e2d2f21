"""Stage 04: the baseline CTR ranker, trained on the generated click logs and exported to ONNX.

Clicks carry position bias. Training models it explicitly (P(click) = P(seen | position) *
P(click | seen, features), the "position-aware" factorisation), and only the second factor is
exported: serving scores candidates as if each were shown at the top, and the reported test
AUC uses the full factorisation so it is comparable to the ground-truth AUC.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from conversion import stages
from conversion.catalog_artifact import CatalogArtifactSettings, build_catalog_artifact, served_encoder
from conversion.catalog_generator import CATEGORIES, N_PRICE_BUCKETS, Catalog, build_catalog
from conversion.export_encoder import ENCODER_ONNX, TOKENIZER_JSON, ExportFidelityError, export_encoder
from model_repository import spec
from model_repository import runtime
from model_repository.runtime import N_USER_BUCKETS, BucketTokenizer, CatalogTables, encode_texts, ort_session

log = logging.getLogger(__name__)

STAGE = "06-ranker"
RANKER_ONNX = runtime.RANKER_FILE
RANKER_WEIGHTS = "ranker.pt"
METRICS_JSON = "metrics.json"


@dataclass(frozen=True)
class RankerSettings:
    artifact: CatalogArtifactSettings = field(default_factory=CatalogArtifactSettings)
    seed: int = 0
    epochs: int = 8
    patience: int = 1
    batch_size: int = 1024
    lr: float = 2e-3
    emb_dim: int = 16
    hidden: tuple[int, ...] = (256, 64)
    # share of training rows whose item (or user) is replaced by the cold-start row, so the
    # model has learned what to do with ids that are missing from the catalog artifact
    cold_start_rate: float = 0.03


@dataclass(frozen=True)
class RankerShape:
    embedding_dim: int
    item_cardinalities: tuple[int, ...]
    user_cardinalities: tuple[int, ...]
    emb_dim: int = 16
    hidden: tuple[int, ...] = (256, 64)


class BaselineRanker(nn.Module):
    """MLP over [query emb, item emb, their product and cosine, categorical embeddings]."""

    def __init__(self, shape: RankerShape):
        super().__init__()
        self.shape = shape
        self.item_tables = nn.ModuleList(nn.Embedding(c, shape.emb_dim) for c in shape.item_cardinalities)
        self.user_tables = nn.ModuleList(nn.Embedding(c, shape.emb_dim) for c in shape.user_cardinalities)
        width = 3 * shape.embedding_dim + 1 + shape.emb_dim * (len(self.item_tables) + len(self.user_tables))
        layers: list[nn.Module] = []
        for h in shape.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def logits(self, query_embedding, item_embedding, item_features, user_features):
        cats = [t(item_features[:, j]) for j, t in enumerate(self.item_tables)]
        cats += [t(user_features[:, j]) for j, t in enumerate(self.user_tables)]
        product = query_embedding * item_embedding
        cosine = product.sum(dim=1, keepdim=True)
        return self.mlp(torch.cat([query_embedding, item_embedding, product, cosine, *cats], dim=1))

    def forward(self, query_embedding, item_embedding, item_features, user_features):
        return torch.sigmoid(self.logits(query_embedding, item_embedding, item_features, user_features))


def ranker_shape(settings: RankerSettings, embedding_dim: int) -> RankerShape:
    c = settings.artifact.catalog
    n_cat = len(CATEGORIES)
    return RankerShape(
        embedding_dim=embedding_dim,
        item_cardinalities=(n_cat + 1, n_cat * c.brands_per_category + 1, N_PRICE_BUCKETS + 1),
        user_cardinalities=(N_USER_BUCKETS + 1, c.n_segments + 1),
        emb_dim=settings.emb_dim, hidden=settings.hidden,
    )


def load_ranker(folder: Path) -> BaselineRanker:
    blob = torch.load(folder / RANKER_WEIGHTS, map_location="cpu", weights_only=False)
    shape = RankerShape(**{k: tuple(v) if isinstance(v, list) else v for k, v in blob["shape"].items()})
    model = BaselineRanker(shape)
    model.load_state_dict(blob["state_dict"])
    return model.eval()


@dataclass
class ClickData:
    """Impressions joined with the serving feature tables, as tensors."""

    query_emb: torch.Tensor  # [n_queries, d], indexed by `query`
    item_emb: torch.Tensor  # [n_items + 1, d] (row 0 cold start)
    item_feat: torch.Tensor
    user_feat: torch.Tensor
    query: torch.Tensor  # per impression
    item_row: torch.Tensor
    user_row: torch.Tensor
    position: torch.Tensor
    click: torch.Tensor
    p_true: np.ndarray

    def batch(self, idx: torch.Tensor, item_row=None, user_row=None):
        item_row = self.item_row[idx] if item_row is None else item_row
        user_row = self.user_row[idx] if user_row is None else user_row
        return (self.query_emb[self.query[idx]], self.item_emb[item_row], self.item_feat[item_row],
                self.user_feat[user_row])


def join_clicks(catalog: Catalog, tables: CatalogTables, query_emb: np.ndarray) -> ClickData:
    item_row = tables.item_rows(catalog.item_ids[catalog.imp_item])
    user_row = tables.user_rows(catalog.user_ids[catalog.session_user[catalog.imp_session]])
    return ClickData(
        query_emb=torch.from_numpy(query_emb), item_emb=torch.from_numpy(np.array(tables.item_embeddings)),
        item_feat=torch.from_numpy(np.array(tables.item_features)),
        user_feat=torch.from_numpy(np.array(tables.user_features)),
        query=torch.from_numpy(catalog.session_query[catalog.imp_session]),
        item_row=torch.from_numpy(item_row), user_row=torch.from_numpy(user_row),
        position=torch.from_numpy(catalog.imp_position), click=torch.from_numpy(catalog.imp_click.astype(np.float32)),
        p_true=catalog.imp_p_click,
    )


def _position_aware_log_probs(model, position_logit, data: ClickData, idx, item_row=None, user_row=None):
    log_p = nn.functional.logsigmoid(model.logits(*data.batch(idx, item_row, user_row)).squeeze(1)) \
        + nn.functional.logsigmoid(position_logit(data.position[idx]).squeeze(1))
    return log_p


def _bce_from_log_p(log_p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    log_not_p = torch.log1p(-torch.exp(log_p).clamp(max=1 - 1e-6))
    return -(y * log_p + (1 - y) * log_not_p).mean()


@torch.no_grad()
def evaluate(model, position_logit, data: ClickData, idx: np.ndarray) -> dict:
    from sklearn.metrics import roc_auc_score

    model.eval()
    t_idx = torch.from_numpy(idx)
    log_p = torch.cat([_position_aware_log_probs(model, position_logit, data, t_idx[s:s + 8192])
                       for s in range(0, len(idx), 8192)])
    y = data.click[t_idx]
    return {
        "logloss": float(_bce_from_log_p(log_p, y)),
        "auc": float(roc_auc_score(y.numpy(), log_p.numpy())),
        "ground_truth_auc": float(roc_auc_score(y.numpy(), data.p_true[idx])),
    }


def train(settings: RankerSettings, data: ClickData, splits: dict[str, np.ndarray], shape: RankerShape,
          progress: bool = True) -> tuple[BaselineRanker, dict]:
    torch.manual_seed(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    model = BaselineRanker(shape)
    position_logit = nn.Embedding(int(data.position.max()) + 1, 1)
    opt = torch.optim.Adam([*model.parameters(), *position_logit.parameters()], lr=settings.lr)
    train_idx = torch.from_numpy(splits["train"])
    best, best_state, bad_epochs, history = float("inf"), None, 0, []
    for epoch in range(settings.epochs):
        model.train()
        perm = train_idx[torch.randperm(len(train_idx), generator=gen)]
        bar = tqdm(range(0, len(perm), settings.batch_size), desc=f"ranker epoch {epoch + 1}", disable=not progress,
                   mininterval=1.0)
        for start in bar:
            idx = perm[start:start + settings.batch_size]
            item_row, user_row = data.item_row[idx].clone(), data.user_row[idx].clone()
            item_row[torch.rand(len(idx), generator=gen) < settings.cold_start_rate] = 0
            user_row[torch.rand(len(idx), generator=gen) < settings.cold_start_rate] = 0
            loss = _bce_from_log_p(_position_aware_log_probs(model, position_logit, data, idx, item_row, user_row),
                                   data.click[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        val = evaluate(model, position_logit, data, splits["val"])
        history.append({"epoch": epoch + 1, **val})
        log.info("epoch %d: val logloss %.4f auc %.4f", epoch + 1, val["logloss"], val["auc"])
        if val["logloss"] < best - 1e-4:
            best, bad_epochs = val["logloss"], 0
            best_state = ({k: v.clone() for k, v in model.state_dict().items()},
                          {k: v.clone() for k, v in position_logit.state_dict().items()})
        else:
            bad_epochs += 1
            if bad_epochs > settings.patience:
                break
    assert best_state is not None
    model.load_state_dict(best_state[0])
    position_logit.load_state_dict(best_state[1])
    metrics = {"history": history, "val": evaluate(model, position_logit, data, splits["val"]),
               "test": evaluate(model, position_logit, data, splits["test"]),
               "position_click_factor": torch.sigmoid(position_logit.weight.detach().squeeze(1)).tolist()}
    return model.eval(), metrics


def export_ranker_onnx(model: BaselineRanker, path: Path, example: tuple[torch.Tensor, ...], opset: int = 17) -> dict:
    """Export with the spec's tensor names and the candidate axis dynamic; verify against PyTorch."""
    names = [spec.query_embedding(0).name, spec.item_embedding(0).name, spec.ITEM_FEATURES.name,
             spec.USER_FEATURES.name]
    torch.onnx.export(model, example, str(path), input_names=names, output_names=[spec.CLICK_PROB.name],
                      dynamic_axes={n: {0: "candidates"} for n in [*names, spec.CLICK_PROB.name]},
                      opset_version=opset, dynamo=False)
    session = ort_session(path)
    got_inputs = [i.name for i in session.get_inputs()]
    got_outputs = [o.name for o in session.get_outputs()]
    if got_inputs != names or got_outputs != [spec.CLICK_PROB.name]:
        raise ExportFidelityError(f"ranker ONNX tensors {got_inputs}->{got_outputs}, expected {names}")
    max_diff = 0.0
    for n in (1, 7, len(example[0])):  # several candidate counts prove the axis is dynamic
        feeds = {name: t[:n].numpy() for name, t in zip(names, example)}
        onnx_out = session.run(None, feeds)[0]
        with torch.no_grad():
            torch_out = model(*(t[:n] for t in example)).numpy()
        if onnx_out.shape != torch_out.shape:
            raise ExportFidelityError(f"ranker ONNX output shape {onnx_out.shape} != PyTorch {torch_out.shape}")
        max_diff = max(max_diff, float(np.abs(onnx_out - torch_out).max()))
    if max_diff > 1e-5:
        raise ExportFidelityError(f"ranker ONNX differs from PyTorch by {max_diff:.2e} (> 1e-5)")
    return {"max_abs_diff": max_diff}


def encode_queries(queries: list[str], encoder_dir: Path) -> np.ndarray:
    tokenizer = BucketTokenizer(encoder_dir / TOKENIZER_JSON)
    return encode_texts(tokenizer, ort_session(encoder_dir / ENCODER_ONNX, threads=2), queries, progress=True,
                        desc="queries")


def build_ranker(settings: RankerSettings, force: bool = False) -> Path:
    folder = stages.stage_dir(STAGE, settings)
    if stages.is_complete(folder) and not force:
        log.info("ranker up to date: %s", folder)
        return folder
    torch.set_num_threads(2)
    artifact_dir = build_catalog_artifact(settings.artifact)
    encoder_dir = served_encoder(settings.artifact)  # queries encoded as serving will encode them
    catalog = Catalog.load(build_catalog(settings.artifact.catalog))
    tables = CatalogTables.load(artifact_dir, mmap=False)
    data = join_clicks(catalog, tables, encode_queries(catalog.queries, encoder_dir))
    splits = catalog.split(settings.artifact.catalog.seed)
    shape = ranker_shape(settings, tables.embedding_dim)
    model, metrics = train(settings, data, splits, shape)
    with stages.atomic_stage(folder, settings) as tmp:
        torch.save({"shape": asdict(shape), "state_dict": model.state_dict()}, tmp / RANKER_WEIGHTS)
        example = data.batch(torch.from_numpy(splits["test"][:256]))
        metrics["export"] = export_ranker_onnx(model, tmp / RANKER_ONNX, example)
        (tmp / METRICS_JSON).write_text(json.dumps(metrics, indent=2))
    log.info("ranker test AUC %.4f (ground truth %.4f)", metrics["test"]["auc"], metrics["test"]["ground_truth_auc"])
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m conversion.train_ranker", description=__doc__.splitlines()[0])
    d = RankerSettings()
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    if args.epochs < 1:
        print(f"error: --epochs must be >= 1, got {args.epochs}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    folder = build_ranker(RankerSettings(epochs=args.epochs, seed=args.seed), force=args.force)
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
