"""CTR ranker models: DCN-v2 (low-rank cross network + deep tower), the id hash shared with
serving, compact embedding tables and structured pruning.

One body, two stems. `SearchRanker` turns the served inputs (query and item text embeddings,
item and user categorical features) into the DCN-v2 input; `CriteoRanker` does the same for
Criteo-style rows (13 integer features, 26 hashed categoricals). Both share `DCNv2`, so
pruning, export and the tests see one ranker family.

Why this shape (docs/ranker.md has the measurements): serving scores up to 1000 candidates
per request on two CPU cores, so the cost per row must be a few tens of kFLOP. The 384-d text
embeddings are projected to a few dims first (the only wide matmuls), every categorical field
is one row of a single concatenated table (one Gather), and the cross layers use a rank-r
factorisation W = U V, which is what DCN-v2 itself proposes for serving cost.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

# ---- hashing shared by training and serving -------------------------------------------------

# Fibonacci hashing: the top bits of id * 2^64/phi spread sequential ids evenly. Identical to
# model_repository.runtime.user_bucket (a test holds them together); every hashed id feature
# (user id, item id, Criteo categoricals) goes through this one function.
_FIB_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)
ITEM_BUCKET_BITS = 16
N_ITEM_BUCKETS = 1 << ITEM_BUCKET_BITS
COLD_START_BUCKET = 0  # unknown / missing ids everywhere; hashed ids land in 1..2^bits


def hash_bucket(ids: np.ndarray | Iterable[int], bits: int) -> np.ndarray:
    """Stable hash of non-negative integer ids into 1..2**bits (0 stays the cold-start bucket)."""
    if not 1 <= bits <= 32:
        raise ValueError(f"hash bits must be between 1 and 32, got {bits}")
    arr = np.asarray(ids)
    if arr.dtype.kind == "i" and arr.size and int(arr.min()) < 0:
        raise ValueError("ids to hash must be non-negative")
    # at least 1-D: numpy warns about wrap-around for scalar uint64 products, not for arrays
    flat = np.atleast_1d(arr).astype(np.uint64)
    h = (flat * _FIB_MULTIPLIER) >> np.uint64(64 - bits)
    return (h.astype(np.int64) + 1).reshape(arr.shape)


def item_bucket(item_ids: np.ndarray) -> np.ndarray:
    """The served item-id feature: catalog ids hashed into N_ITEM_BUCKETS (see catalog_artifact)."""
    return hash_bucket(item_ids, ITEM_BUCKET_BITS)


# ---- building blocks ------------------------------------------------------------------------


class FieldEmbedding(nn.Module):
    """One embedding table per categorical field, stored as a single table with row offsets so
    the exported graph does one Gather for all fields instead of one per field."""

    def __init__(self, cardinalities: tuple[int, ...], dim: int, sparse: bool = False):
        super().__init__()
        self.cardinalities = tuple(cardinalities)
        self.dim = dim
        offsets = np.concatenate([[0], np.cumsum(self.cardinalities)[:-1]]).astype(np.int64)
        self.register_buffer("offsets", torch.from_numpy(offsets))
        self.table = nn.Embedding(int(sum(self.cardinalities)), dim, sparse=sparse)
        nn.init.normal_(self.table.weight, std=0.05)

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        return self.table(rows)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids int64 [B, n_fields] -> [B, n_fields * dim]."""
        return self.lookup(ids + self.offsets).flatten(1)


class CompactFieldEmbedding(FieldEmbedding):
    """A FieldEmbedding whose table is stored as FP16 or INT8 (symmetric, one scale per row).

    Gathered rows are widened to FP32 before use, so PyTorch and ONNX compute the same values
    bit for bit; only the stored table shrinks.
    """

    def __init__(self, source: FieldEmbedding, dtype: str):
        super().__init__(source.cardinalities, source.dim)
        del self.table
        self.storage = dtype
        weight = source.table.weight.detach().float()
        if dtype == "fp16":
            self.register_buffer("table16", weight.half())
        elif dtype == "int8":
            scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
            self.register_buffer("table8", torch.round(weight / scale).clamp(-127, 127).to(torch.int8))
            self.register_buffer("scale", scale)
        else:
            raise ValueError(f"table dtype must be 'fp16' or 'int8', got {dtype!r}")

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        if self.storage == "fp16":
            return self.table16[rows].float()
        return self.table8[rows].float() * self.scale[rows]


class LowRankCross(nn.Module):
    """DCN-v2 cross layer with W = U V of rank r:  x_{l+1} = x0 * (U (V x_l) + b) + x_l.

    The r intermediate units are the prunable neurons; `mask` (None outside pruning) zeroes
    some of them so a masked model is exactly the model with those units removed.
    """

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)  # V
        self.up = nn.Linear(rank, dim)  # U and b
        self.register_buffer("mask", None, persistent=False)

    @property
    def units(self) -> int:
        return self.down.out_features

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self.down(x)
        if self.mask is not None:
            h = h * self.mask
        return x0 * self.up(h) + x


class PairedProjection(nn.Module):
    """Low-rank projections of the query and item text embeddings to k dims each.

    Unit j is the pair (P_q q)_j, (P_i i)_j, and with it their product feature: pruning a unit
    removes one row of each projection, the 384-wide work that dominates a row's cost.
    """

    def __init__(self, d_in: int, k: int):
        super().__init__()
        self.q = nn.Linear(d_in, k, bias=False)
        self.i = nn.Linear(d_in, k, bias=False)
        self.register_buffer("mask", None, persistent=False)

    @property
    def units(self) -> int:
        return self.q.out_features

    def forward(self, query_embedding: torch.Tensor, item_embedding: torch.Tensor):
        q, i = self.q(query_embedding), self.i(item_embedding)
        if self.mask is not None:
            q, i = q * self.mask, i * self.mask
        return q, i


class SimilarityHeads(nn.Module):
    """h learned similarities of query and item text: (q * i) @ W, a diagonal bilinear form per head.

    Head 0 starts as the plain cosine (the embeddings are L2-normalised). Heads are the prunable
    units. One elementwise product and one narrow MatMul read the two 384-d inputs once each,
    which is most of a row's memory traffic.
    """

    def __init__(self, d_in: int, heads: int):
        super().__init__()
        self.linear = nn.Linear(d_in, heads, bias=False)
        nn.init.normal_(self.linear.weight, std=0.05)
        if heads:
            with torch.no_grad():
                self.linear.weight[0] = 1.0
        self.register_buffer("mask", None, persistent=False)

    @property
    def units(self) -> int:
        return self.linear.out_features

    def forward(self, query_embedding: torch.Tensor, item_embedding: torch.Tensor) -> torch.Tensor:
        s = self.linear(query_embedding * item_embedding)
        if self.mask is not None:
            s = s * self.mask
        return s


class HiddenLayer(nn.Module):
    """Linear + ReLU of the deep tower; its output units are the prunable neurons."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)
        self.register_buffer("mask", None, persistent=False)

    @property
    def units(self) -> int:
        return self.linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.linear(x))
        if self.mask is not None:
            h = h * self.mask
        return h


@dataclass(frozen=True)
class DCNShape:
    """The DCN-v2 body: cross layers (their ranks) in parallel with a deep tower (its widths)."""

    cross_ranks: tuple[int, ...] = (16, 16)
    deep: tuple[int, ...] = (64, 32)


class DCNv2(nn.Module):
    """Parallel DCN-v2: logit = head([cross_L(x0), deep(x0)])."""

    def __init__(self, input_dim: int, shape: DCNShape):
        super().__init__()
        self.input_dim = input_dim
        self.cross = nn.ModuleList(LowRankCross(input_dim, r) for r in shape.cross_ranks)
        widths = (input_dim, *shape.deep)
        self.deep = nn.ModuleList(HiddenLayer(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.head = nn.Linear(input_dim + (shape.deep[-1] if shape.deep else 0), 1)
        for layer in self.cross:  # start near identity: x_{l+1} ~ x_l, so depth does not hurt early training
            nn.init.zeros_(layer.up.bias)
            nn.init.normal_(layer.up.weight, std=0.01)

    def shape(self) -> DCNShape:
        return DCNShape(tuple(c.units for c in self.cross), tuple(d.units for d in self.deep))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        h = x0
        for layer in self.deep:
            h = layer(h)
        return self.head(torch.cat([x, h], dim=1) if len(self.deep) else x)


# ---- the two rankers ------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchRankerShape:
    embedding_dim: int  # text embedding width (384 for all-MiniLM-L6-v2)
    item_cardinalities: tuple[int, ...]  # per column of spec.ITEM_FEATURE_COLUMNS, cold start included
    user_cardinalities: tuple[int, ...]  # per column of spec.USER_FEATURE_COLUMNS
    # similarity heads of query and item text ((q * i) @ W, head 0 starts as the cosine)
    sim_heads: int = 16
    # optional low-rank projections of q and i themselves (and their product); 0: similarities only
    proj_dim: int = 0
    emb_dim: int = 8
    dcn: DCNShape = field(default_factory=DCNShape)

    @property
    def input_dim(self) -> int:
        n_fields = len(self.item_cardinalities) + len(self.user_cardinalities)
        return 3 * self.proj_dim + self.sim_heads + n_fields * self.emb_dim

    @classmethod
    def from_dict(cls, d: dict) -> "SearchRankerShape":
        dcn = DCNShape(**{k: tuple(v) for k, v in d["dcn"].items()})
        return cls(**{**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}, "dcn": dcn})


class SearchRanker(nn.Module):
    """DCN-v2 over [P_q q, P_i i, (P_q q) * (P_i i), cos(q, i), item and user field embeddings].

    Same call signature as the served ONNX graph: (QUERY_EMBEDDING, ITEM_EMBEDDING,
    ITEM_FEATURES, USER_FEATURES) -> CLICK_PROB, candidates on the batch axis.
    """

    def __init__(self, shape: SearchRankerShape):
        super().__init__()
        self.shape = shape
        self.sims = SimilarityHeads(shape.embedding_dim, shape.sim_heads)
        self.proj = PairedProjection(shape.embedding_dim, shape.proj_dim) if shape.proj_dim else None
        self.fields = FieldEmbedding(shape.item_cardinalities + shape.user_cardinalities, shape.emb_dim)
        self.body = DCNv2(shape.input_dim, shape.dcn)

    def features(self, query_embedding, item_embedding, item_features, user_features) -> torch.Tensor:
        parts = []
        if self.shape.proj_dim:
            q, i = self.proj(query_embedding, item_embedding)
            parts += [q, i, q * i]
        if self.shape.sim_heads:
            parts.append(self.sims(query_embedding, item_embedding))
        parts.append(self.fields(torch.cat([item_features, user_features], dim=1)))
        return torch.cat(parts, dim=1)

    def logits(self, query_embedding, item_embedding, item_features, user_features) -> torch.Tensor:
        return self.body(self.features(query_embedding, item_embedding, item_features, user_features))

    def input_keep(self) -> torch.Tensor:
        """Indices of the DCN input (x0) that survive the masks: [q, i, q * i, similarities, fields]."""
        k, h = self.shape.proj_dim, self.shape.sim_heads
        kept = _kept(self.proj) if self.proj is not None else torch.arange(0)
        heads = _kept(self.sims)
        rest = torch.arange(3 * k + h, self.shape.input_dim)
        return torch.cat([kept, k + kept, 2 * k + kept, 3 * k + heads, rest])

    def pruned_shape(self, dcn: DCNShape) -> "SearchRankerShape":
        k = int(len(_kept(self.proj))) if self.proj is not None else 0
        return replace(self.shape, proj_dim=k, sim_heads=int(len(_kept(self.sims))), dcn=dcn)

    @torch.no_grad()
    def copy_stem(self, source: "SearchRanker") -> None:
        if source.proj is not None:
            kept = _kept(source.proj)
            self.proj.q.weight.copy_(source.proj.q.weight[kept])
            self.proj.i.weight.copy_(source.proj.i.weight[kept])
        self.sims.linear.weight.copy_(source.sims.linear.weight[_kept(source.sims)])
        self.fields.load_state_dict(source.fields.state_dict())

    def forward(self, query_embedding, item_embedding, item_features, user_features) -> torch.Tensor:
        return torch.sigmoid(self.logits(query_embedding, item_embedding, item_features, user_features))


@dataclass(frozen=True)
class CriteoRankerShape:
    n_dense: int
    cat_cardinalities: tuple[int, ...]
    emb_dim: int = 8
    dcn: DCNShape = field(default_factory=DCNShape)

    @property
    def input_dim(self) -> int:
        return self.n_dense + len(self.cat_cardinalities) * self.emb_dim

    @classmethod
    def from_dict(cls, d: dict) -> "CriteoRankerShape":
        dcn = DCNShape(**{k: tuple(v) for k, v in d["dcn"].items()})
        return cls(**{**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}, "dcn": dcn})


class CriteoRanker(nn.Module):
    """The same DCN-v2 body over [log-transformed integer features, hashed categorical embeddings]."""

    def __init__(self, shape: CriteoRankerShape, sparse: bool = False):
        super().__init__()
        self.shape = shape
        self.fields = FieldEmbedding(shape.cat_cardinalities, shape.emb_dim, sparse=sparse)
        self.body = DCNv2(shape.input_dim, shape.dcn)

    def logits(self, dense: torch.Tensor, cats: torch.Tensor) -> torch.Tensor:
        return self.body(torch.cat([dense, self.fields(cats)], dim=1))

    def input_keep(self) -> torch.Tensor:
        return torch.arange(self.shape.input_dim)

    def pruned_shape(self, dcn: DCNShape) -> "CriteoRankerShape":
        return replace(self.shape, dcn=dcn)

    @torch.no_grad()
    def copy_stem(self, source: "CriteoRanker") -> None:
        self.fields.load_state_dict(source.fields.state_dict())

    def forward(self, dense: torch.Tensor, cats: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(dense, cats))


def compact_tables(model: nn.Module, dtype: str) -> nn.Module:
    """A copy of `model` whose field-embedding table is stored as 'fp32' (unchanged), 'fp16' or 'int8'."""
    out = copy.deepcopy(model)
    if dtype != "fp32":
        out.fields = CompactFieldEmbedding(model.fields, dtype)
    return out.eval()


# ---- the baseline the DCN-v2 ranker replaced (kept for the AUC/latency comparison) ----------


@dataclass(frozen=True)
class BaselineShape:
    embedding_dim: int
    item_cardinalities: tuple[int, ...]
    user_cardinalities: tuple[int, ...]
    emb_dim: int = 16
    hidden: tuple[int, ...] = (256, 64)


class BaselineRanker(nn.Module):
    """The first ranker: an MLP over [query emb, item emb, their product and cosine, categorical
    embeddings]. Its first layer reads ~1.2k inputs per row, which is what made it slow."""

    def __init__(self, shape: BaselineShape):
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


# ---- structured pruning ---------------------------------------------------------------------


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Layers whose units pruning may remove: similarity heads, projection pairs, cross-layer rank
    units, deep neurons (a layer without units, e.g. proj_dim=0, has nothing to prune)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (SimilarityHeads, PairedProjection, LowRankCross, HiddenLayer)) and m.units}


def attach_masks(model: nn.Module) -> nn.Module:
    for layer in prunable_layers(model).values():
        layer.mask = torch.ones(layer.units)
    return model


def taylor_importance(model: nn.Module, batch_losses: Iterable[Callable[[nn.Module], torch.Tensor]]
                      ) -> dict[str, torch.Tensor]:
    """First-order Taylor importance of every prunable unit: |dL/dm_j| for a unit mask m_j = 1,
    i.e. |sum over the batch of activation * gradient|, the loss change its removal predicts
    (Molchanov et al., 2017), averaged over the given batches."""
    layers = prunable_layers(model)
    for layer in layers.values():
        if layer.mask is None:
            layer.mask = torch.ones(layer.units)
        layer.mask.requires_grad_(True)
    totals = {name: torch.zeros(layer.units) for name, layer in layers.items()}
    n = 0
    was_training = model.training
    model.eval()  # measure the model as it will be served
    try:
        for loss_fn in batch_losses:
            grads = torch.autograd.grad(loss_fn(model), [layer.mask for layer in layers.values()])
            for name, g in zip(layers, grads):
                totals[name] += g.abs()
            n += 1
    finally:
        for layer in layers.values():
            layer.mask = layer.mask.detach()
        model.train(was_training)
    if n == 0:
        raise ValueError("taylor_importance needs at least one batch")
    return {name: t / n for name, t in totals.items()}


def prune_masks(model: nn.Module, importance: dict[str, torch.Tensor], fraction: float) -> dict[str, int]:
    """Zero the masks of the `fraction` least important units of every prunable layer (at least
    one unit survives per layer). Returns the surviving unit count per layer."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"prune fraction must be in [0, 1), got {fraction}")
    kept = {}
    for name, layer in prunable_layers(model).items():
        n_prune = min(int(round(fraction * layer.units)), layer.units - 1)
        mask = torch.ones(layer.units)
        if n_prune:
            # stable sort: equal importances prune the lower index first, deterministically
            order = torch.from_numpy(np.argsort(importance[name].numpy(), kind="stable"))
            mask[order[:n_prune]] = 0.0
        layer.mask = mask
        kept[name] = int(mask.sum())
    return kept


def _kept(layer: nn.Module) -> torch.Tensor:
    return torch.arange(layer.units) if layer.mask is None else torch.nonzero(layer.mask).reshape(-1)


@torch.no_grad()
def materialize(model: nn.Module) -> nn.Module:
    """A new, smaller model without the masked units and without masks; exactly the masked model.

    Removed cross/deep units contributed zeros. A removed similarity head zeroes one x0 dim (a
    projection pair three), and a zero x0 dim stays zero through every cross layer
    (x0 * (...) + x), so those dims are cut from every layer that reads x0 or the cross output.
    """
    body: DCNv2 = model.body
    x_keep = model.input_keep()
    cross_keep = [_kept(c) for c in body.cross]
    deep_keep = [_kept(d) for d in body.deep]
    out = type(model)(model.pruned_shape(DCNShape(tuple(len(k) for k in cross_keep),
                                                  tuple(len(k) for k in deep_keep))))
    out.copy_stem(model)
    for old, new, keep in zip(body.cross, out.body.cross, cross_keep):
        new.down.weight.copy_(old.down.weight[keep][:, x_keep])
        new.up.weight.copy_(old.up.weight[x_keep][:, keep])
        new.up.bias.copy_(old.up.bias[x_keep])
    prev = x_keep
    for old, new, keep in zip(body.deep, out.body.deep, deep_keep):
        new.linear.weight.copy_(old.linear.weight[keep][:, prev])
        new.linear.bias.copy_(old.linear.bias[keep])
        prev = keep
    head_cols = torch.cat([x_keep, body.input_dim + prev]) if len(body.deep) else x_keep
    out.body.head.weight.copy_(body.head.weight[:, head_cols])
    out.body.head.bias.copy_(body.head.bias)
    return out.train(model.training)


def count_units(model: nn.Module) -> int:
    return sum(layer.units for layer in prunable_layers(model).values())


def flops_per_row(model: nn.Module) -> int:
    """Multiply-adds x2 of every Linear per candidate row (the gathers and elementwise ops are
    left out: they are a few hundred operations)."""
    return sum(2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
