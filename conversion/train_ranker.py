"""Ranker stage: the DCN-v2 CTR ranker, trained on the generated click logs, pruned, exported to ONNX.

Clicks carry position bias. Training models it explicitly (P(click) = P(seen | position) *
P(click | seen, features), the "position-aware" factorisation), and only the second factor is
exported: serving scores candidates as if each were shown at the top, and the reported test
AUC uses the full factorisation so it is comparable to the ground-truth AUC.

Besides clicks, every logged slate's order is a (noisy) label of which item the logging ranker
thought more relevant; an auxiliary pairwise loss learns from it (`slate_order_weight`).

The stage writes the FP32 model (`ranker_fp32.onnx`) and the compressed one at the name the
server loads (`ranker.onnx`): the FP32 model's similarity heads, cross rank units and deep
neurons are pruned by measured importance, fine-tuned, and then stored in every candidate
format (FP32, FP16/INT8 tables, ORT INT8); candidates whose test AUC falls more than
`max_auc_drop` below FP32, or whose top 10 over held-out 100- and 1000-candidate sets shares less
than `min_top10_overlap` with the FP32 ranker's, are rejected, and the simplest survivor is served
unless another is clearly faster (ORT, 2 threads, 1000 candidates). When none survives at any
prune fraction, the FP32 ranker itself is served (`chosen: fp32` in metrics.json). metrics.json holds the AUCs (ground truth,
FP32, compressed, optionally the old baseline) and latencies. Choices and numbers: docs/ranker.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from conversion import stages
from conversion.catalog_artifact import CatalogArtifactSettings, build_catalog_artifact, served_encoder
from conversion.catalog_generator import CATEGORIES, N_PRICE_BUCKETS, Catalog, build_catalog
from conversion.export_encoder import ENCODER_ONNX, TOKENIZER_JSON, ExportFidelityError
from conversion.quantize import (OrtInt8Settings, QdqSettings, check_qdq_structure, quantize_ort_int8,
                                 quantize_qdq_modelopt)
from conversion.ranker_model import (N_ITEM_BUCKETS, BaselineRanker, BaselineShape, DCNShape, SearchRanker,
                                     SearchRankerShape, attach_masks, compact_tables, count_units, flops_per_row,
                                     materialize, prune_masks, taylor_importance)
from model_repository import runtime, spec
from model_repository.runtime import N_USER_BUCKETS, BucketTokenizer, CatalogTables, encode_texts, ort_session

log = logging.getLogger(__name__)

STAGE = "06-ranker"

RANKER_ONNX = runtime.RANKER_FILE  # the compressed model, where the server loads it
RANKER_FP32_ONNX = "ranker_fp32.onnx"
RANKER_QDQ_ONNX = "ranker.qdq.onnx"  # for TensorRT engines (GPU nodes); not served on CPU
RANKER_WEIGHTS = "ranker.pt"  # PyTorch weights of the served model (pruned; table storage recorded)
RANKER_FP32_WEIGHTS = "ranker_fp32.pt"
METRICS_JSON = "metrics.json"
LATENCY_SIZES = (100, 1000)


class CompressionGateError(ExportFidelityError):
    """A compressed ranker lost more AUC against its FP32 version than the gate allows."""


@dataclass(frozen=True)
class CompressionSettings:
    # share of units removed from every prunable layer: projection pairs, cross rank units, deep neurons
    prune_fraction: float = 0.5
    # milder fractions tried, in order, when no format of the pruned model passes the AUC gate
    fallback_fractions: tuple[float, ...] = (0.25,)
    importance_batches: int = 20
    importance_batch_size: int = 2048
    # Fine-tuning re-reads data the model has already seen once, where this kind of model
    # overfits fast: a small lr, and the pruned model itself counts as a checkpoint.
    finetune_epochs: int = 1
    finetune_lr: float = 3e-4
    # stored formats tried for the pruned model's embedding table
    table_dtypes: tuple[str, ...] = ("fp32", "fp16", "int8")
    ort_int8: bool = True  # also try ONNX Runtime static INT8 (conversion.quantize) on the pruned graph
    tensorrt_qdq: bool = True  # also write the pruned model as modelopt Q/DQ ONNX (RANKER_QDQ_ONNX) for TensorRT
    max_auc_drop: float = 0.005  # the acceptance gate (DESIGN.md): compressed AUC >= FP32 AUC - this
    # ... and the ranking gate: AUC does not see the order of near-equal scores inside one candidate
    # set, which is what a search page shows. Mean share of the FP32 ranker's top 10 that the
    # compressed one also puts in its top 10, over held-out candidate sets of each size. A build
    # where no compressed format meets both gates serves the FP32 ranker (docs/ranker.md).
    min_top10_overlap: float = 0.95
    ranking_set_sizes: tuple[int, ...] = (100, 1000)
    ranking_sets: int = 100  # candidate sets per size
    # a candidate must be this much faster than the simplest passing one to be served instead;
    # timings on a shared 2-core box move by more than a few percent between runs
    min_speedup: float = 0.10
    latency_runs: int = 300

    def __post_init__(self):
        # the FP32-table export is the source of the INT8 and Q/DQ variants
        if not self.table_dtypes or self.table_dtypes[0] != "fp32":
            raise ValueError(f"table_dtypes must start with 'fp32', got {self.table_dtypes}")
        if not 0.0 <= self.prune_fraction < 1.0:
            raise ValueError(f"prune_fraction must be in [0, 1), got {self.prune_fraction}")


@dataclass(frozen=True)
class RankerSettings:
    artifact: CatalogArtifactSettings = field(default_factory=CatalogArtifactSettings)
    seed: int = 0
    # The model peaks within about one epoch (docs/ranker.md): the lr decays over that epoch,
    # validation is checked four times per epoch, and the best check is kept.
    epochs: int = 2
    patience: int = 2  # validation checks without improvement before stopping
    evals_per_epoch: int = 4
    lr_decay_epochs: float = 1.0  # linear decay to 5% of lr over this many epochs; 0: constant
    batch_size: int = 128
    lr: float = 3e-3
    sim_heads: int = 16
    proj_dim: int = 0
    emb_dim: int = 8
    # One cross layer and one deep layer: two of each gave the same test AUC (0.7866 vs 0.7861,
    # one seed) for ~10% more latency at 1000 candidates, where per-op overhead dominates (docs/ranker.md).
    cross_ranks: tuple[int, ...] = (16,)
    deep: tuple[int, ...] = (64,)
    # weight of the auxiliary pairwise loss on the logged slate order (0: clicks only)
    slate_order_weight: float = 2.0
    # share of training rows whose item (or user) is replaced by the cold-start row, so the
    # model has learned what to do with ids that are missing from the catalog artifact
    cold_start_rate: float = 0.03
    compression: CompressionSettings = field(default_factory=CompressionSettings)
    # also train the first (MLP) ranker on the same split, for the AUC/latency comparison
    compare_baseline: bool = False


def _cardinalities(settings: RankerSettings) -> tuple[tuple[int, ...], tuple[int, ...]]:
    c = settings.artifact.catalog
    n_cat = len(CATEGORIES)
    item = (n_cat + 1, n_cat * c.brands_per_category + 1, N_PRICE_BUCKETS + 1, N_ITEM_BUCKETS + 1)
    user = (N_USER_BUCKETS + 1, c.n_segments + 1)
    assert len(item) == len(spec.ITEM_FEATURE_COLUMNS) and len(user) == len(spec.USER_FEATURE_COLUMNS)
    return item, user


def ranker_shape(settings: RankerSettings, embedding_dim: int) -> SearchRankerShape:
    item, user = _cardinalities(settings)
    return SearchRankerShape(embedding_dim=embedding_dim, item_cardinalities=item, user_cardinalities=user,
                             sim_heads=settings.sim_heads, proj_dim=settings.proj_dim, emb_dim=settings.emb_dim,
                             dcn=DCNShape(settings.cross_ranks, settings.deep))


def baseline_shape(settings: RankerSettings, embedding_dim: int) -> BaselineShape:
    item, user = _cardinalities(settings)
    # the baseline never had the item-id feature: it reads the first three item columns only
    return BaselineShape(embedding_dim=embedding_dim, item_cardinalities=item[:3], user_cardinalities=user)


def save_ranker(model: SearchRanker, path: Path, tables: str = "fp32", ort_int8: bool = False) -> None:
    torch.save({"shape": asdict(model.shape), "tables": tables, "ort_int8": ort_int8,
                "state_dict": model.state_dict()}, path)


class OrtRanker(nn.Module):
    """A ranker whose served form only runs in ONNX Runtime (its INT8 kernels exist nowhere else):
    the same call signature as SearchRanker, scored by plain ORT on the served file.
    `model` is the FP32 PyTorch model the file was quantized from."""

    def __init__(self, onnx_path: Path, model: SearchRanker):
        super().__init__()
        self.model, self.shape = model, model.shape
        self.session = ort_session(onnx_path)
        self.names = [i.name for i in self.session.get_inputs()]

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        feeds = {n: np.ascontiguousarray(t.numpy()) for n, t in zip(self.names, inputs)}
        return torch.from_numpy(self.session.run(None, feeds)[0])


def load_ranker(folder: Path, weights: str = RANKER_WEIGHTS) -> nn.Module:
    """The model behind an ONNX file of the stage (default: the served one), table storage
    included, so it reproduces the served scores: PyTorch, or ORT on the served file when that
    file is ORT INT8."""
    blob = torch.load(Path(folder) / weights, map_location="cpu", weights_only=False)
    model = SearchRanker(SearchRankerShape.from_dict(blob["shape"]))
    model.load_state_dict(blob["state_dict"])
    if blob.get("ort_int8"):
        return OrtRanker(Path(folder) / RANKER_ONNX, model.eval())
    return compact_tables(model.eval(), blob.get("tables", "fp32"))


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
    session: torch.Tensor | None = None  # per impression; needed only for the slate-order loss

    def batch(self, idx: torch.Tensor, item_row=None, user_row=None):
        item_row = self.item_row[idx] if item_row is None else item_row
        user_row = self.user_row[idx] if user_row is None else user_row
        return (self.query_emb[self.query[idx]], self.item_emb[item_row], self.item_feat[item_row],
                self.user_feat[user_row])

    def feeds(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """The ranker's ONNX inputs for impressions `idx`, named as in spec."""
        names = [spec.query_embedding(0).name, spec.item_embedding(0).name, spec.ITEM_FEATURES.name,
                 spec.USER_FEATURES.name]
        return {n: np.ascontiguousarray(t.numpy()) for n, t in zip(names, self.batch(torch.from_numpy(idx)))}


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
        p_true=catalog.imp_p_click, session=torch.from_numpy(catalog.imp_session),
    )


# ---- training -------------------------------------------------------------------------------


def _bce_from_log_p(log_p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    log_not_p = torch.log1p(-torch.exp(log_p).clamp(max=1 - 1e-6))
    return -(y * log_p + (1 - y) * log_not_p).mean()


def position_aware_log_p(click_logit: torch.Tensor, position_logit: nn.Embedding, position: torch.Tensor):
    """log P(click) = log P(click | seen, x) + log P(seen | position)."""
    return nn.functional.logsigmoid(click_logit.reshape(-1)) + \
        nn.functional.logsigmoid(position_logit(position).reshape(-1))


def _metrics(log_p: torch.Tensor, data: ClickData, idx: np.ndarray) -> dict:
    from sklearn.metrics import roc_auc_score

    y = data.click[torch.from_numpy(idx)]
    return {
        "logloss": float(_bce_from_log_p(log_p, y)),
        "auc": float(roc_auc_score(y.numpy(), log_p.numpy())),
        "ground_truth_auc": float(roc_auc_score(y.numpy(), data.p_true[idx])),
    }


@torch.no_grad()
def evaluate(model, position_logit, data: ClickData, idx: np.ndarray) -> dict:
    model.eval()
    t_idx = torch.from_numpy(idx)
    log_p = torch.cat([position_aware_log_p(model.logits(*data.batch(t_idx[s:s + 8192])), position_logit,
                                            data.position[t_idx[s:s + 8192]]) for s in range(0, len(idx), 8192)])
    return _metrics(log_p, data, idx)


def _random_batch_loss(data: ClickData, position_logit, idx: torch.Tensor) -> Callable[[nn.Module], torch.Tensor]:
    def loss(model):
        return _bce_from_log_p(position_aware_log_p(model.logits(*data.batch(idx)), position_logit,
                                                    data.position[idx]), data.click[idx])
    return loss


def session_slates(data: ClickData, idx: np.ndarray) -> torch.Tensor:
    """Impression rows of `idx` grouped by session, [n_sessions, slate_size] (slates of one size)."""
    if data.session is None:
        raise ValueError("the slate-order loss needs ClickData.session")
    order = np.argsort(data.session[idx].numpy(), kind="stable")
    rows, sessions = idx[order], data.session[idx].numpy()[order]
    _, counts = np.unique(sessions, return_counts=True)
    if len(set(counts.tolist())) != 1:
        raise ValueError(f"the slate-order loss needs slates of one size, got sizes {sorted(set(counts.tolist()))}")
    return torch.from_numpy(rows.reshape(len(counts), int(counts[0])))


def slate_order_loss(logit: torch.Tensor, position: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Pairwise logistic loss that scores items shown higher in a logged slate above items shown
    lower: the logging ranker ordered each slate by its own (noisy) relevance estimate, which is
    a label for every pair of a slate, where clicks label a quarter of the rows. [S, k] inputs;
    the learned temperature absorbs how noisy the logged order is."""
    a, b = torch.triu_indices(logit.shape[1], logit.shape[1], 1)
    sign = torch.where(position[:, a] < position[:, b], 1.0, -1.0)
    return nn.functional.softplus(-temperature * sign * (logit[:, a] - logit[:, b])).mean()


def fit(model: nn.Module, data: ClickData, splits: dict[str, np.ndarray], settings: RankerSettings, *,
        epochs: int, lr: float, position_logit: nn.Embedding | None = None, desc: str = "ranker",
        progress: bool = True) -> tuple[nn.Module, nn.Embedding, dict]:
    """Position-aware training with cold-start dropout and early stopping.

    Validation logloss is checked `evals_per_epoch` times per epoch and the best checkpoint is
    kept; training stops after `patience` checks without improvement. Models with id embeddings
    peak early (often within the first epoch, then overfit: the "one-epoch phenomenon" of CTR
    models), so checks finer than an epoch find the peak; the learning rate decays linearly to
    5% over `lr_decay_epochs` (0: constant) so the last steps before the peak are small ones.
    With `slate_order_weight` > 0, batches are whole slates and `slate_order_loss` is added.
    """
    torch.manual_seed(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    if position_logit is None:
        position_logit = nn.Embedding(int(data.position.max()) + 1, 1)
        nn.init.zeros_(position_logit.weight)
    temperature = nn.Parameter(torch.tensor(1.0))
    opt = torch.optim.Adam([*model.parameters(), *position_logit.parameters(), temperature], lr=lr)
    if settings.slate_order_weight > 0:
        units = session_slates(data, splits["train"])  # a batch is whole slates
    else:
        units = torch.from_numpy(splits["train"]).reshape(-1, 1)
    per_batch = max(1, settings.batch_size // units.shape[1])
    steps_per_epoch = -(-len(units) // per_batch)
    n_checks = max(1, min(settings.evals_per_epoch, steps_per_epoch))
    checks = {round(k * steps_per_epoch / n_checks) for k in range(1, n_checks + 1)}  # batch numbers in an epoch
    decay_steps = settings.lr_decay_epochs * steps_per_epoch
    # the starting point counts: fine-tuning that never beats it keeps it
    best = evaluate(model, position_logit, data, splits["val"])["logloss"]
    best_state, bad_checks, history, step, stop = None, 0, [], 0, False
    for epoch in range(epochs):
        model.train()
        perm = units[torch.randperm(len(units), generator=gen)]
        bar = tqdm(range(0, len(perm), per_batch), desc=f"{desc} epoch {epoch + 1}", disable=not progress,
                   mininterval=1.0)
        for batch_no, start in enumerate(bar, start=1):
            if decay_steps:
                for group in opt.param_groups:
                    group["lr"] = lr * max(0.05, 1.0 - step / decay_steps)
            slates = perm[start:start + per_batch]
            idx = slates.reshape(-1)
            item_row, user_row = data.item_row[idx].clone(), data.user_row[idx].clone()
            item_row[torch.rand(len(idx), generator=gen) < settings.cold_start_rate] = 0
            user_row[torch.rand(len(idx), generator=gen) < settings.cold_start_rate] = 0
            logit = model.logits(*data.batch(idx, item_row, user_row))
            loss = _bce_from_log_p(position_aware_log_p(logit, position_logit, data.position[idx]), data.click[idx])
            if settings.slate_order_weight > 0:
                loss = loss + settings.slate_order_weight * slate_order_loss(
                    logit.reshape(slates.shape), data.position[slates], temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if batch_no not in checks:
                continue
            val = evaluate(model, position_logit, data, splits["val"])
            model.train()
            history.append({"epoch": round(step / steps_per_epoch, 3), **val})
            log.info("%s epoch %.2f: val logloss %.4f auc %.4f", desc, step / steps_per_epoch, val["logloss"],
                     val["auc"])
            if val["logloss"] < best - 1e-4:
                best, bad_checks = val["logloss"], 0
                best_state = ({k: v.clone() for k, v in model.state_dict().items()},
                              {k: v.clone() for k, v in position_logit.state_dict().items()})
            else:
                bad_checks += 1
                if bad_checks > settings.patience:
                    stop = True
                    break
        if stop:
            break
    if best_state is not None:
        model.load_state_dict(best_state[0])
        position_logit.load_state_dict(best_state[1])
    metrics = {"history": history, "val": evaluate(model, position_logit, data, splits["val"]),
               "test": evaluate(model, position_logit, data, splits["test"]),
               "position_click_factor": torch.sigmoid(position_logit.weight.detach().reshape(-1)).tolist()}
    return model.eval(), position_logit, metrics


def train(settings: RankerSettings, data: ClickData, splits: dict[str, np.ndarray], shape: SearchRankerShape,
          progress: bool = True) -> tuple[SearchRanker, nn.Embedding, dict]:
    torch.manual_seed(settings.seed)
    return fit(SearchRanker(shape), data, splits, settings, epochs=settings.epochs, lr=settings.lr, progress=progress)


def prune_and_finetune(model: SearchRanker, position_logit: nn.Embedding, data: ClickData,
                       splits: dict[str, np.ndarray], settings: RankerSettings, progress: bool = True
                       ) -> tuple[SearchRanker, nn.Embedding, dict]:
    """Remove the least important units of every prunable layer (similarity heads, cross rank
    units, deep neurons; first-order Taylor importance measured on training batches), then
    fine-tune the smaller model with early stopping."""
    c = settings.compression
    gen = torch.Generator().manual_seed(settings.seed + 1)
    train_idx = torch.from_numpy(splits["train"])
    batches = [_random_batch_loss(data, position_logit,
                                  train_idx[torch.randint(len(train_idx), (c.importance_batch_size,), generator=gen)])
               for _ in range(c.importance_batches)]
    masked = attach_masks(SearchRanker(model.shape))
    masked.load_state_dict(model.state_dict())
    importance = taylor_importance(masked, batches)
    kept = prune_masks(masked, importance, c.prune_fraction)
    pruned = materialize(masked)
    before = evaluate(pruned, position_logit, data, splits["val"])
    log.info("pruned %d -> %d units %s; val auc before fine-tuning %.4f", count_units(model), count_units(pruned),
             kept, before["auc"])
    pos = nn.Embedding.from_pretrained(position_logit.weight.detach().clone(), freeze=False)
    tuned, pos, metrics = fit(pruned, data, splits, settings, epochs=c.finetune_epochs, lr=c.finetune_lr,
                              position_logit=pos, desc="fine-tune", progress=progress)
    metrics.update(units_before=count_units(model), units_after=count_units(tuned), kept_units=kept,
                   val_before_finetune=before, shape=asdict(tuned.shape))
    return tuned, pos, metrics


# ---- export, ONNX evaluation and latency ----------------------------------------------------


def _names() -> list[str]:
    return [spec.query_embedding(0).name, spec.item_embedding(0).name, spec.ITEM_FEATURES.name,
            spec.USER_FEATURES.name]


def export_ranker_onnx(model: nn.Module, path: Path, example: tuple[torch.Tensor, ...], opset: int = 17) -> dict:
    """Export with the spec's tensor names and the candidate axis dynamic; verify against PyTorch."""
    names = _names()
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


def onnx_click_prob(path: Path, data: ClickData, idx: np.ndarray, chunk: int = 8192) -> np.ndarray:
    session = ort_session(path, threads=2)
    return np.concatenate([session.run(None, data.feeds(idx[s:s + chunk]))[0].reshape(-1)
                           for s in range(0, len(idx), chunk)])


def onnx_metrics(path: Path, position_logit: nn.Embedding, data: ClickData, idx: np.ndarray) -> dict:
    """Position-aware test metrics of an ONNX file, i.e. of exactly what the server would run."""
    prob = torch.from_numpy(onnx_click_prob(path, data, idx)).clamp(1e-7, 1 - 1e-7)
    logit = torch.log(prob) - torch.log1p(-prob)
    with torch.no_grad():
        log_p = position_aware_log_p(logit, position_logit, data.position[torch.from_numpy(idx)])
    return _metrics(log_p, data, idx)


def ranking_sets(data: ClickData, idx: np.ndarray, sizes: tuple[int, ...], n_sets: int,
                 seed: int) -> dict[int, list[dict[str, np.ndarray]]]:
    """Held-out candidate sets as serving sees them: a test impression's query and user, with `size`
    catalog items drawn at random (no cold-start row), so the order among many unrelated items counts."""
    rng = np.random.default_rng(seed)
    n_items = data.item_emb.shape[0] - 1
    out: dict[int, list[dict[str, np.ndarray]]] = {}
    names = [spec.query_embedding(0).name, spec.item_embedding(0).name, spec.ITEM_FEATURES.name,
             spec.USER_FEATURES.name]
    for size in sizes:
        sets = []
        for row in rng.choice(idx, size=n_sets, replace=len(idx) < n_sets):
            items = torch.from_numpy(rng.choice(np.arange(1, n_items + 1), size=min(size, n_items), replace=False))
            rows = torch.full((len(items),), int(row), dtype=torch.long)
            tensors = data.batch(rows, item_row=items, user_row=data.user_row[rows])
            sets.append({n: np.ascontiguousarray(t.numpy()) for n, t in zip(names, tensors)})
        out[size] = sets
    return out


def top10_overlap(reference: Path, candidate: Path, sets: dict[int, list[dict[str, np.ndarray]]],
                  k: int = 10) -> dict[str, float]:
    """Per set size: mean share of the reference's top k that the candidate also ranks in its top k."""
    ref_session, cand_session = ort_session(reference, threads=2), ort_session(candidate, threads=2)
    out = {}
    for size, feeds in sets.items():
        shares = []
        for f in feeds:
            ref = np.argsort(-ref_session.run(None, f)[0].reshape(-1), kind="stable")[:k]
            got = np.argsort(-cand_session.run(None, f)[0].reshape(-1), kind="stable")[:k]
            shares.append(len(set(ref.tolist()) & set(got.tolist())) / k)
        out[str(size)] = float(np.mean(shares))
    return out


def measure_latency(paths: dict[str, Path], feeds_by_size: dict[int, dict[str, np.ndarray]], runs: int = 300,
                    threads: int = 2, progress: bool = True) -> dict[str, dict[str, float]]:
    """Median ms per ORT call for every model and candidate count, sessions created as serving
    creates them. Calls are interleaved across models so that load from other processes on a
    shared machine hits every model alike."""
    sessions = {name: ort_session(p, threads=threads) for name, p in paths.items()}
    times: dict[tuple[str, int], list[float]] = {(m, n): [] for m in sessions for n in feeds_by_size}
    for n, feeds in feeds_by_size.items():
        for s in sessions.values():  # warm-up: allocator, thread pool
            for _ in range(10):
                s.run(None, feeds)
    for _ in tqdm(range(runs), desc="latency", disable=not progress, mininterval=1.0):
        for n, feeds in feeds_by_size.items():
            for name, s in sessions.items():
                t0 = time.perf_counter()
                s.run(None, feeds)
                times[(name, n)].append(time.perf_counter() - t0)
    out: dict[str, dict[str, float]] = {m: {} for m in sessions}
    for (m, n), ts in times.items():
        out[m][str(n)] = round(1000 * float(np.median(ts)), 4)
    return out


def check_compression_gate(fp32_auc: float, compressed_auc: float, max_drop: float, name: str = "compressed") -> None:
    """Raise CompressionGateError when the compressed ranker lost more than `max_drop` AUC."""
    drop = fp32_auc - compressed_auc
    if drop > max_drop:
        raise CompressionGateError(f"{name} ranker test AUC {compressed_auc:.4f} is {drop:.4f} below FP32 "
                                   f"{fp32_auc:.4f} (gate: at most {max_drop})")


# Static, not dynamic: dynamic INT8 picks each call's activation scale from the whole batch, so a
# candidate's score would depend on which other candidates (and, with Triton merging requests,
# which other requests) share its call. Gemm too: exported Linear layers with bias are Gemm nodes.
RANKER_INT8 = OrtInt8Settings(mode="static", op_types=("MatMul", "Gemm"))
RANKER_QDQ = QdqSettings(op_types=("MatMul", "Gemm"), n_calibration_samples=2048)


def calibration_feeds(data: ClickData, splits: dict[str, np.ndarray], seed: int, rows: int = 2048
                      ) -> list[dict[str, np.ndarray]]:
    """One feed of `rows` training impressions (never test rows: the gate measures on those)."""
    rng = np.random.default_rng(seed)
    train = splits["train"]
    return [data.feeds(np.sort(rng.choice(train, min(rows, len(train)), replace=False)))]


def export_ranker_qdq(pruned_onnx: Path, out_onnx: Path, calibration: list[dict[str, np.ndarray]]) -> dict:
    """The pruned ranker as explicit-quantization Q/DQ ONNX for TensorRT, by the encoder's machinery
    (nvidia-modelopt), its structure checked: every weighted MatMul/Gemm reads INT8 weights."""
    report = quantize_qdq_modelopt(pruned_onnx, out_onnx, calibration, RANKER_QDQ)
    return {"report": {k: report[k] for k in ("tool", "seconds") if k in report},
            "structure": check_qdq_structure(out_onnx)}


def choose(candidates: list[dict], min_speedup: float, size: str = "1000") -> dict:
    """The simplest passing candidate, unless a later (more compressed) one is faster by more
    than `min_speedup`; `candidates` are ordered simplest first."""
    passing = [c for c in candidates if c["gate_passed"]]
    if not passing:
        raise CompressionGateError("no compressed ranker passed the AUC gate: " + "; ".join(
            f"{c['name']}: auc {c['auc']:.4f}" for c in candidates))
    best = passing[0]
    for c in passing[1:]:
        if c["latency_ms"][size] < (1 - min_speedup) * best["latency_ms"][size]:
            best = c
    return best


def check_ranking_gate(overlap: dict[str, float], min_overlap: float, name: str = "compressed") -> None:
    """Raise CompressionGateError when the compressed ranker's top 10 strays from the FP32 ranker's."""
    low = {size: v for size, v in overlap.items() if v < min_overlap}
    if low:
        raise CompressionGateError(f"{name} ranker top-10 overlap with FP32 " + ", ".join(
            f"{v:.3f} at {size} candidates" for size, v in low.items()) + f" (gate: at least {min_overlap})")


def _candidates(pruned: SearchRanker, pruned_pos: nn.Embedding, data: ClickData, splits, settings: RankerSettings,
                scratch: Path, fp32_auc: float, latency_feeds, progress: bool,
                fp32_onnx: Path | None = None, sets: dict | None = None) -> tuple[list[dict], dict | None]:
    """Every stored format of one pruned model, exported, timed and gated on test AUC and, given the
    FP32 file and held-out candidate `sets`, on top-10 agreement with it; the FP32 file, when given,
    is timed in the same interleaved run (its latency is returned beside)."""
    c = settings.compression
    example = data.batch(torch.from_numpy(splits["test"][:256]))
    test_idx = splits["test"]
    candidates = []
    for dtype in c.table_dtypes:
        name = f"pruned-{dtype}-tables"
        path = scratch / f"{name}.onnx"
        export = export_ranker_onnx(compact_tables(pruned, dtype), path, example)
        candidates.append({"name": name, "path": path, "tables": dtype, "export": export})
    if c.ort_int8:
        path = scratch / "pruned-ort-int8.onnx"
        calibration = calibration_feeds(data, splits, settings.seed)
        quantize_ort_int8(candidates[0]["path"], path, RANKER_INT8, calibration)
        candidates.append({"name": "pruned-ort-int8", "path": path, "tables": "fp32", "export": None})
    timed = {x["name"]: x["path"] for x in candidates}
    if fp32_onnx is not None:
        timed = {"fp32": fp32_onnx, **timed}
    latency = measure_latency(timed, latency_feeds, c.latency_runs, progress=progress)
    for x in candidates:
        x.update(onnx_metrics(x["path"], pruned_pos, data, test_idx), latency_ms=latency[x["name"]],
                 bytes=x["path"].stat().st_size)
        if fp32_onnx is not None and sets:
            x["top10_overlap"] = top10_overlap(fp32_onnx, x["path"], sets)
        try:
            check_compression_gate(fp32_auc, x["auc"], c.max_auc_drop, x["name"])
            if "top10_overlap" in x:
                check_ranking_gate(x["top10_overlap"], c.min_top10_overlap, x["name"])
            x["gate_passed"] = True
        except CompressionGateError as e:
            log.warning("REJECTED: %s", e)
            x["gate_passed"] = False
    return candidates, latency.get("fp32")


def compress(model: SearchRanker, position_logit: nn.Embedding, data: ClickData, splits: dict[str, np.ndarray],
             settings: RankerSettings, folder: Path, fp32_auc: float, latency_feeds, progress: bool = True,
             fp32_onnx: Path | None = None, fp32_metrics: dict | None = None) -> dict:
    """Prune + fine-tune, write every candidate format to `folder`, gate each on test AUC and (with
    `fp32_onnx`) on top-10 agreement with the FP32 ranker over held-out candidate sets, time them,
    and put the chosen one at RANKER_ONNX / RANKER_WEIGHTS. Returns the compression report; with
    `fp32_onnx`, the FP32 model is timed in the same interleaved run as the candidates
    (report["fp32_latency_ms"]), so load from other processes hits both sides alike.

    When no format of the pruned model passes, the next (milder) fraction of `fallback_fractions` is
    tried; when none is left, the FP32 ranker itself is served if `fp32_onnx` is given (it costs
    little: docs/ranker.md), else CompressionGateError is raised.
    """
    c = settings.compression
    sets = (ranking_sets(data, splits["test"], c.ranking_set_sizes, c.ranking_sets, settings.seed)
            if fp32_onnx is not None else None)
    attempts = []
    chosen = None
    for fraction in (c.prune_fraction, *(f for f in c.fallback_fractions if f < c.prune_fraction)):
        attempt_settings = dataclasses.replace(settings, compression=dataclasses.replace(c, prune_fraction=fraction))
        pruned, pruned_pos, prune_report = prune_and_finetune(model, position_logit, data, splits, attempt_settings,
                                                              progress)
        scratch = folder / f"candidates-prune{round(100 * fraction)}"
        scratch.mkdir()
        candidates, fp32_latency = _candidates(pruned, pruned_pos, data, splits, settings, scratch, fp32_auc,
                                               latency_feeds, progress, fp32_onnx, sets)
        attempts.append({"prune_fraction": fraction, "prune": prune_report, "candidates": candidates})
        try:
            chosen = choose(candidates, c.min_speedup)
            break
        except CompressionGateError as e:
            log.warning("compression at prune fraction %.2f rejected: %s", fraction, e)
    if chosen is None and fp32_onnx is None:
        raise CompressionGateError(f"no compressed ranker kept test AUC within {c.max_auc_drop} of FP32 "
                                   f"{fp32_auc:.4f} at prune fractions {[a['prune_fraction'] for a in attempts]}")
    qdq = None
    if c.tensorrt_qdq:
        source = next(x for x in candidates if x["name"] == "pruned-fp32-tables")
        qdq = export_ranker_qdq(source["path"], folder / RANKER_QDQ_ONNX, calibration_feeds(data, splits, settings.seed))
        # ORT runs Q/DQ graphs too: the AUC a TensorRT engine of this file should come close to
        qdq.update(onnx_metrics(folder / RANKER_QDQ_ONNX, pruned_pos, data, splits["test"]))
        if sets:
            qdq["top10_overlap"] = top10_overlap(fp32_onnx, folder / RANKER_QDQ_ONNX, sets)
    if chosen is None:  # no compressed format is faithful enough: serve the FP32 ranker
        log.warning("no compressed ranker passed the gates; serving the FP32 ranker")
        shutil.copyfile(fp32_onnx, folder / RANKER_ONNX)
        chosen = {"name": "fp32", "path": RANKER_ONNX, "tables": "fp32", "export": None,
                  **{k: (fp32_metrics or {}).get(k) for k in ("logloss", "auc", "ground_truth_auc")},
                  "latency_ms": fp32_latency, "bytes": fp32_onnx.stat().st_size, "gate_passed": True,
                  "top10_overlap": {str(n): 1.0 for n in c.ranking_set_sizes}}
        candidates = [*candidates, chosen]
        served_model, served_fraction = model, 0.0
        save_ranker(model, folder / RANKER_WEIGHTS)
    else:
        chosen["path"].replace(folder / RANKER_ONNX)
        served_model, served_fraction = pruned, attempts[-1]["prune_fraction"]
        save_ranker(pruned, folder / RANKER_WEIGHTS, tables=chosen["tables"],
                    ort_int8=chosen["name"].endswith("ort-int8"))
    for a in attempts:
        for x in a["candidates"]:
            x["path"] = RANKER_ONNX if x is chosen else str(x["path"].relative_to(folder))
    log.info("serving %s at prune fraction %.2f: test auc %.4f (fp32 %.4f), %.3f ms at 1000 candidates",
             chosen["name"], served_fraction, chosen["auc"], fp32_auc, chosen["latency_ms"]["1000"])
    return {"chosen": chosen["name"], "prune_fraction": served_fraction,
            "gate": {"max_auc_drop": c.max_auc_drop, "min_top10_overlap": c.min_top10_overlap,
                     "ranking_sets": {str(n): c.ranking_sets for n in c.ranking_set_sizes} if sets else None,
                     "passed": True, "compressed_passed": chosen["name"] != "fp32", "fp32_auc": fp32_auc,
                     "served_auc": chosen["auc"], "served_top10_overlap": chosen.get("top10_overlap")},
            "candidates": candidates, "prune": prune_report, "attempts": attempts[:-1], "fp32_latency_ms": fp32_latency,
            "flops_per_row": flops_per_row(served_model), "tensorrt_qdq": qdq}


# ---- the stage ------------------------------------------------------------------------------


def encode_queries(queries: list[str], encoder_dir: Path) -> np.ndarray:
    tokenizer = BucketTokenizer(encoder_dir / TOKENIZER_JSON)
    return encode_texts(tokenizer, ort_session(encoder_dir / ENCODER_ONNX, threads=2), queries, progress=True,
                        desc="queries")


def train_baseline(settings: RankerSettings, data: ClickData, splits, embedding_dim: int, folder: Path,
                   latency_feeds, progress: bool = True) -> dict:
    """The first ranker (MLP, its original hyperparameters) on the same split, for comparison."""
    base_settings = dataclasses.replace(settings, epochs=8, lr=2e-3, patience=1, batch_size=1024, evals_per_epoch=1,
                                        lr_decay_epochs=0.0)
    torch.manual_seed(settings.seed)
    model, _, metrics = fit(BaselineRanker(baseline_shape(settings, embedding_dim)), data, splits, base_settings,
                            epochs=8, lr=2e-3, desc="baseline", progress=progress)
    path = folder / "baseline.onnx"
    export_ranker_onnx(model, path, data.batch(torch.from_numpy(splits["test"][:256])))
    latency = measure_latency({"baseline": path}, latency_feeds, runs=50, progress=progress)["baseline"]
    path.unlink()  # only its numbers are kept; the file is large and never served
    return {"test": metrics["test"], "latency_ms": latency, "flops_per_row": flops_per_row(model)}


def build_ranker(settings: RankerSettings, force: bool = False, progress: bool = True) -> Path:
    folder = stages.stage_dir(STAGE, settings)
    if stages.is_complete(folder) and not force:
        log.info("ranker up to date: %s", folder)
        return folder
    torch.set_num_threads(2)
    tables = CatalogTables.load(build_catalog_artifact(settings.artifact), mmap=False)
    encoder_dir = served_encoder(settings.artifact)  # queries encoded as serving will encode them
    catalog = Catalog.load(build_catalog(settings.artifact.catalog))
    data = join_clicks(catalog, tables, encode_queries(catalog.queries, encoder_dir))
    splits = catalog.split(settings.artifact.catalog.seed)
    shape = ranker_shape(settings, tables.embedding_dim)
    model, position_logit, metrics = train(settings, data, splits, shape, progress=progress)
    latency_feeds = {n: data.feeds(splits["test"][:n]) for n in LATENCY_SIZES}
    with stages.atomic_stage(folder, settings) as tmp:
        save_ranker(model, tmp / RANKER_FP32_WEIGHTS)
        example = data.batch(torch.from_numpy(splits["test"][:256]))
        metrics["export"] = export_ranker_onnx(model, tmp / RANKER_FP32_ONNX, example)
        fp32 = onnx_metrics(tmp / RANKER_FP32_ONNX, position_logit, data, splits["test"])
        compression = compress(model, position_logit, data, splits, settings, tmp, fp32["auc"], latency_feeds,
                               progress, fp32_onnx=tmp / RANKER_FP32_ONNX, fp32_metrics=fp32)
        fp32["latency_ms"] = compression["fp32_latency_ms"]
        served = next(c for c in compression["candidates"] if c["name"] == compression["chosen"])
        metrics["fp32"] = {**fp32, "flops_per_row": flops_per_row(model), "bytes": (tmp / RANKER_FP32_ONNX).stat().st_size}
        metrics["compression"] = compression
        metrics["fp32_test"] = metrics["test"]
        # "test" is what the server runs (build_models' report and the tests read it)
        metrics["test"] = {k: served[k] for k in ("logloss", "auc", "ground_truth_auc")}
        metrics["auc"] = {"ground_truth": fp32["ground_truth_auc"], "fp32": fp32["auc"], "compressed": served["auc"]}
        metrics["latency_ms"] = {"fp32": fp32["latency_ms"], "compressed": served["latency_ms"]}
        if settings.compare_baseline:
            metrics["baseline"] = train_baseline(settings, data, splits, tables.embedding_dim, tmp, latency_feeds,
                                                 progress)
            metrics["auc"]["baseline"] = metrics["baseline"]["test"]["auc"]
            metrics["latency_ms"]["baseline"] = metrics["baseline"]["latency_ms"]
        (tmp / METRICS_JSON).write_text(json.dumps(metrics, indent=2, default=str))
    log.info("ranker test AUC: ground truth %.4f, fp32 %.4f, served (%s) %.4f; 1000 candidates: fp32 %.3f ms, "
             "served %.3f ms", metrics["auc"]["ground_truth"], metrics["auc"]["fp32"], compression["chosen"],
             metrics["auc"]["compressed"], fp32["latency_ms"]["1000"], served["latency_ms"]["1000"])
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m conversion.train_ranker", description=__doc__.splitlines()[0])
    d = RankerSettings()
    p.add_argument("--profile", choices=("default", "ci"), default="default",
                   help="catalog size and epochs as in conversion.build_models")
    p.add_argument("--encoder", choices=("int8", "fp32"), default="int8",
                   help="served encoder the embeddings come from, as in `make models ENCODER=...`")
    p.add_argument("--epochs", type=int, help="training epochs (default: the profile's)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--prune-fraction", type=float, default=d.compression.prune_fraction,
                   help="share of units (similarity heads, cross rank units, deep neurons) removed before "
                        "fine-tuning")
    p.add_argument("--compare-baseline", action="store_true",
                   help="also train the first MLP ranker on the same split and report its AUC and latency")
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        print(f"error: --epochs must be >= 1, got {args.epochs}", file=sys.stderr)
        return 2
    if not 0.0 <= args.prune_fraction < 1.0:
        print(f"error: --prune-fraction must be in [0, 1), got {args.prune_fraction}", file=sys.stderr)
        return 2
    from conversion.build_models import profile_settings  # build_models imports this module

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = profile_settings(args.profile, encoder=args.encoder)  # what `make models PROFILE=...` builds
    settings = dataclasses.replace(
        settings, seed=args.seed, epochs=args.epochs or settings.epochs, compare_baseline=args.compare_baseline,
        compression=dataclasses.replace(settings.compression, prune_fraction=args.prune_fraction))
    try:
        folder = build_ranker(settings, force=args.force)
    except ExportFidelityError as e:  # CompressionGateError included
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
