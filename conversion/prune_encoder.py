"""Stage 03: structured pruning of the BERT-family encoder, recovered by distillation.

Attention heads and FFN neurons are ranked by how much they measurably write into the residual
stream on real catalog text (the norm of each unit's additive contribution, relative to the
stream it is added to), and the least important go, cheapest-per-FLOP first, until the encoder
fits `keep_flops` of the teacher's FLOPs. Whole layers can go too, ranked by how much the
embedding moves when the layer is skipped. The result is a genuinely smaller dense model
(narrower matrices), then trained to reproduce the FP32 teacher's embeddings.

Held-out text (a fixed hash-based share of the catalog's titles and queries) is never used
for importance, distillation or calibration; the report measures fidelity on it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from conversion import stages
from conversion.catalog_generator import Catalog, CatalogSettings, build_catalog
from conversion.export_encoder import (ENCODER_ONNX, TOKENIZER_JSON, EncoderExportSettings, PooledEncoder,
                                       export_encoder, load_torch_encoder, model_dir_of)

log = logging.getLogger(__name__)

STAGE = "03-encoder-pruned"
WEIGHTS = "model.safetensors"
STRUCTURE_JSON = "structure.json"
DISTILL_JSON = "distill_report.json"
CHECKPOINT = "checkpoint.pt"
HELDOUT_PERCENT = 10


@dataclass(frozen=True)
class PruneSettings:
    teacher: EncoderExportSettings = field(default_factory=EncoderExportSettings)
    catalog: CatalogSettings = field(default_factory=CatalogSettings)
    # Chosen from the measured frontier (docs/encoder_compression.md): at 0.35 of the FLOPs with
    # 2 of 6 layers dropped the distilled encoder beat 0.5 with all layers on fidelity and speed.
    keep_flops: float = 0.35
    flops_seq: int = 16  # queries are what serving encodes per request; FLOPs are budgeted at their length
    drop_layers: int = 2
    min_heads: int = 1
    ffn_multiple: int = 16  # kept FFN widths round to GEMM-friendly sizes (and 2:4 groups)
    importance_texts: int = 512
    distill_steps: int = 600
    batch_size: int = 32
    lr: float = 2e-4
    warmup_steps: int = 30
    relation_weight: float = 1.0  # in-batch similarity matching keeps neighbourhoods, not just directions
    sparsity_2to4: bool = False
    checkpoint_every: int = 100
    seed: int = 0
    # Distillation text beyond the catalog's train split: pseudo-texts of whole words from the
    # tokenizer's vocabulary (conversion.generated_text; seeded), so the student sees words the
    # 20-category catalog never writes. Never the broad eval set.
    generated_texts: int = 20000
    # A user's texts (`--distill-texts FILE`); the sha256 of its texts keys the stage, so an edited
    # file re-distils. "" = none.
    extra_texts: str = ""
    extra_texts_sha256: str = ""

    def __post_init__(self):
        if not 0.0 < self.keep_flops <= 1.0:
            raise ValueError(f"keep_flops must be in (0, 1], got {self.keep_flops}")
        if self.distill_steps < 0 or self.batch_size < 2:
            raise ValueError("distill_steps must be >= 0 and batch_size >= 2")


@dataclass
class Structure:
    """What survived: original layer indices, and per kept layer its head indices and FFN neurons."""

    layers: list[int]
    heads: list[list[int]]
    neurons: list[list[int]]
    head_dim: int
    hidden: int

    def flops(self, seq: int) -> int:
        return sum(layer_flops(self.hidden, len(h) * self.head_dim, len(n), seq)
                   for h, n in zip(self.heads, self.neurons))

    def summary(self) -> dict:
        return {"layers": len(self.layers), "heads": [len(h) for h in self.heads],
                "ffn": [len(n) for n in self.neurons]}


def layer_flops(hidden: int, attn_width: int, ffn: int, seq: int) -> int:
    """Multiply-adds x2 of one BERT layer for one sequence (projections, attention, FFN)."""
    proj = 2 * seq * hidden * attn_width * 4       # Q, K, V and the output projection
    attention = 2 * 2 * seq * seq * attn_width     # scores and the weighted sum of values
    return proj + attention + 2 * 2 * seq * hidden * ffn


def full_structure(config) -> Structure:
    n_heads, n_ffn = config.num_attention_heads, config.intermediate_size
    return Structure(layers=list(range(config.num_hidden_layers)),
                     heads=[list(range(n_heads))] * config.num_hidden_layers,
                     neurons=[list(range(n_ffn))] * config.num_hidden_layers,
                     head_dim=config.hidden_size // n_heads, hidden=config.hidden_size)


def split_texts(catalog: Catalog) -> dict[str, list[str]]:
    """Titles and queries split by a hash of the text, so the held-out share never depends on order."""
    def held_out(text: str) -> bool:
        return int(hashlib.sha1(text.encode()).hexdigest(), 16) % 100 < HELDOUT_PERCENT

    out: dict[str, list[str]] = {"train": [], "heldout_titles": [], "heldout_queries": []}
    for kind, texts in (("titles", catalog.titles), ("queries", catalog.queries)):
        for t in dict.fromkeys(texts):
            (out[f"heldout_{kind}"] if held_out(t) else out["train"]).append(t)
    return out


def _batches(tok, texts: Sequence[str], batch_size: int):
    pad = tok.token_to_id("[PAD]") or 0
    for i in range(0, len(texts), batch_size):
        enc = tok.encode_batch(list(texts[i:i + batch_size]))
        n = max(len(e.ids) for e in enc)
        ids = torch.full((len(enc), n), pad, dtype=torch.int64)
        mask = torch.zeros((len(enc), n), dtype=torch.int64)
        for r, e in enumerate(enc):
            ids[r, :len(e.ids)] = torch.tensor(e.ids)
            mask[r, :len(e.ids)] = 1
        yield ids, mask


@torch.no_grad()
def embed(module: nn.Module, tok, texts: Sequence[str], batch_size: int = 64, desc: str = "") -> torch.Tensor:
    module.eval()
    # Length-sorted batches pad little; the result is put back in input order.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty((len(texts), module.model.config.hidden_size))
    rows = [texts[i] for i in order]
    done = 0
    for ids, mask in tqdm(_batches(tok, rows, batch_size), total=math.ceil(len(rows) / batch_size),
                          desc=desc or "embedding", disable=not desc, leave=False):
        out[torch.tensor(order[done:done + len(ids)])] = module(ids, mask)
        done += len(ids)
    return out


def teacher_embeddings(teacher: EncoderExportSettings, texts: Sequence[str], progress: bool = True) -> torch.Tensor:
    """The FP32 teacher's targets, from its verified ONNX export (ORT is about twice as fast as eager).

    Cached on the teacher's settings and the exact texts, so trying several pruning budgets
    encodes the training text once.
    """
    from model_repository.runtime import BucketTokenizer, encode_texts, ort_session

    folder = export_encoder(teacher)
    key = stages.settings_hash({"teacher": folder.name, "texts": hashlib.sha256("\n".join(texts).encode()).hexdigest()})
    cache = stages.build_root() / "cache" / f"teacher-embeddings-{key}.npy"
    if cache.is_file():
        return torch.from_numpy(np.load(cache))
    session = ort_session(folder / ENCODER_ONNX, threads=torch.get_num_threads())
    emb = encode_texts(BucketTokenizer(folder / TOKENIZER_JSON), session, texts, batch_size=64, progress=progress,
                       desc="teacher embeddings")
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.npy")
    np.save(tmp, emb)
    os.replace(tmp, cache)
    return torch.from_numpy(emb)


def _layers(module: PooledEncoder) -> nn.ModuleList:
    return module.model.encoder.layer


@torch.no_grad()
def measure_importance(module: PooledEncoder, tok, texts: Sequence[str], batch_size: int = 32
                       ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Per head and per FFN neuron: mean over real tokens of |contribution| / |residual sum|."""
    layers, hidden = _layers(module), module.model.config.hidden_size
    head_dim = hidden // module.model.config.num_attention_heads
    head_scores = [torch.zeros(0)] * len(layers)
    neuron_scores = [torch.zeros(0)] * len(layers)
    captured: dict[str, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(layers):
        for key, mod in ((f"ctx{i}", layer.attention.output.dense), (f"act{i}", layer.output.dense),
                         (f"attn_sum{i}", layer.attention.output.LayerNorm), (f"ffn_sum{i}", layer.output.LayerNorm)):
            hooks.append(mod.register_forward_pre_hook(lambda _m, args, key=key: captured.__setitem__(key, args[0])))
    n_tokens = 0
    try:
        for ids, mask in _batches(tok, texts, batch_size):
            captured.clear()
            module(ids, mask)
            real = mask.bool()
            n_tokens += int(real.sum())
            for i, layer in enumerate(layers):
                ctx, act = captured[f"ctx{i}"][real], captured[f"act{i}"][real]   # [tokens, width]
                attn_sum = captured[f"attn_sum{i}"][real].norm(dim=-1, keepdim=True)
                ffn_sum = captured[f"ffn_sum{i}"][real].norm(dim=-1, keepdim=True)
                w_o = layer.attention.output.dense.weight                          # [hidden, heads*head_dim]
                n_heads = w_o.shape[1] // head_dim
                per_head = torch.einsum("thk,dhk->thd", ctx.view(-1, n_heads, head_dim),
                                        w_o.view(hidden, n_heads, head_dim)).norm(dim=-1)
                h = (per_head / attn_sum).sum(0)
                w_2 = layer.output.dense.weight.norm(dim=0)                          # [ffn]
                n = (act.abs() * w_2 / ffn_sum).sum(0)
                head_scores[i] = head_scores[i] + h if head_scores[i].numel() else h
                neuron_scores[i] = neuron_scores[i] + n if neuron_scores[i].numel() else n
    finally:
        for h in hooks:
            h.remove()
    return (torch.stack(head_scores).numpy() / n_tokens, [n.numpy() / n_tokens for n in neuron_scores])


@torch.no_grad()
def layer_drop_scores(module: PooledEncoder, tok, texts: Sequence[str]) -> np.ndarray:
    """1 - mean cosine to the full model when each layer alone is skipped (higher = more needed)."""
    full = embed(module, tok, texts)
    layers = _layers(module)
    scores = []
    for i in range(len(layers)):
        module.model.encoder.layer = nn.ModuleList(l for j, l in enumerate(layers) if j != i)
        try:
            scores.append(1.0 - float((embed(module, tok, texts) * full).sum(1).mean()))
        finally:
            module.model.encoder.layer = layers
    return np.asarray(scores)


def plan_pruning(config, head_scores: np.ndarray, neuron_scores: list[np.ndarray], settings: PruneSettings,
                 drop: Sequence[int] = ()) -> Structure:
    """Keep the same share r of heads and of FFN neurons, each ranked across all layers, with r
    the largest share whose FLOPs fit the budget.

    Heads and neurons are ranked within their own kind because their scores are not on one
    scale: a head's contribution is one vector, a neuron's is one of ~1500 summed ones. Ranking
    both on one list by score per FLOP removed nearly every head (held-out cosine 0.62 before
    distillation at keep 0.5, against 0.82 this way; random ranking gave 0.49).
    """
    full = full_structure(config)
    budget = settings.keep_flops * full.flops(settings.flops_seq)
    layers = [i for i in full.layers if i not in set(drop)]
    heads = sorted(((head_scores[i, h], i, h) for i in layers for h in full.heads[i]), reverse=True)
    neurons = sorted(((neuron_scores[i][n], i, n) for i in layers for n in full.neurons[i]), reverse=True)

    def structure(share: float) -> Structure:
        kept_h = {(i, h) for _, i, h in heads[:round(share * len(heads))]}
        kept_n = {(i, n) for _, i, n in neurons[:round(share * len(neurons))]}
        per_layer_h, per_layer_n = [], []
        for i in layers:
            hs = [h for h in full.heads[i] if (i, h) in kept_h]
            if len(hs) < settings.min_heads:
                hs = sorted(np.argsort(-head_scores[i])[:settings.min_heads].tolist())
            ns = sorted(full.neurons[i], key=lambda n: -neuron_scores[i][n])
            count = sum((i, n) in kept_n for n in full.neurons[i])
            # Round widths down to the multiple (dropping the weakest) so the budget still holds.
            width = max(settings.ffn_multiple, count // settings.ffn_multiple * settings.ffn_multiple)
            per_layer_h.append(hs)
            per_layer_n.append(sorted(ns[:width]))
        return Structure(layers=layers, heads=per_layer_h, neurons=per_layer_n, head_dim=full.head_dim,
                         hidden=full.hidden)

    lo, hi = 0.0, 1.0
    for _ in range(30):  # FLOPs grow with the share, so bisect for the largest share that fits
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if structure(mid).flops(settings.flops_seq) <= budget else (lo, mid)
    return structure(lo)


def _linear(old: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    w = old.weight.data
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    b = old.bias.data[rows] if rows is not None else old.bias.data
    new = nn.Linear(w.shape[1], w.shape[0], bias=True)
    new.weight.data.copy_(w)
    new.bias.data.copy_(b)
    return new


def shrink(module: PooledEncoder, structure: Structure) -> PooledEncoder:
    """Slice the model in place down to `structure`: smaller matrices, not masks."""
    model = module.model
    layers = _layers(module)
    kept = nn.ModuleList()
    for i, heads, neurons in zip(structure.layers, structure.heads, structure.neurons):
        layer = layers[i]
        cols = torch.tensor([h * structure.head_dim + k for h in heads for k in range(structure.head_dim)],
                            dtype=torch.int64)
        att = layer.attention
        for name in ("query", "key", "value"):
            setattr(att.self, name, _linear(getattr(att.self, name), rows=cols))
        att.output.dense = _linear(att.output.dense, cols=cols)
        # The attention code infers the head count from the width; these keep introspection honest.
        att.self.num_attention_heads = len(heads)
        att.self.all_head_size = len(cols)
        idx = torch.tensor(neurons, dtype=torch.int64)
        layer.intermediate.dense = _linear(layer.intermediate.dense, rows=idx)
        layer.output.dense = _linear(layer.output.dense, cols=idx)
        kept.append(layer)
    model.encoder.layer = kept
    model.config.num_hidden_layers = len(kept)
    return module


def apply_2to4(module: nn.Module) -> dict[str, torch.Tensor]:
    """Zero the two smallest of every four input weights of each encoder Linear; returns the masks."""
    masks = {}
    for name, lin in module.named_modules():
        if isinstance(lin, nn.Linear) and ".encoder.layer." in f".{name}" and lin.in_features % 4 == 0:
            w = lin.weight.data.view(lin.out_features, -1, 4)
            keep = w.abs().argsort(dim=-1, descending=True)[..., :2]
            mask = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, keep, True).view_as(lin.weight)
            lin.weight.data.mul_(mask)
            masks[name] = mask
    return masks


def _distill_loss(student: torch.Tensor, teacher: torch.Tensor, relation_weight: float) -> torch.Tensor:
    cosine = 1.0 - (student * teacher).sum(-1).mean()
    relation = ((student @ student.T - teacher @ teacher.T) ** 2).mean()
    return cosine + relation_weight * relation


def distill(student: PooledEncoder, teacher_emb: torch.Tensor, texts: list[str], tok, settings: PruneSettings,
            checkpoint: Path | None = None, masks: dict[str, torch.Tensor] | None = None) -> list[float]:
    """Train `student` to reproduce `teacher_emb`; resumes from `checkpoint` if one is there."""
    # Word embeddings are not pruned and dominate the parameter count; freezing them saves most
    # of the optimizer's time and keeps the vocabulary's geometry from drifting on catalog text.
    student.model.embeddings.word_embeddings.weight.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    warm = max(1, settings.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * max(
        0.0, 1.0 - s / max(1, settings.distill_steps)) ** 0.5)
    gen = torch.Generator().manual_seed(settings.seed)
    step, losses = 0, []
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        student.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        step, losses = state["step"], state["losses"]
        log.info("resuming distillation at step %d from %s", step, checkpoint)
    named = dict(student.named_modules())
    # Dropout off: the target is a deterministic function, and a resumed run must replay exactly.
    student.eval()
    with tqdm(total=settings.distill_steps, initial=step, desc="distilling", unit="step") as bar:
        while step < settings.distill_steps:
            idx = torch.randint(len(texts), (settings.batch_size,), generator=gen)
            ids, mask = next(_batches(tok, [texts[int(i)] for i in idx], settings.batch_size))
            loss = _distill_loss(student(ids, mask), teacher_emb[idx], settings.relation_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            for name, m in (masks or {}).items():
                named[name].weight.data.mul_(m)
            step += 1
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
            if checkpoint is not None and (step % settings.checkpoint_every == 0 or step == settings.distill_steps):
                tmp = checkpoint.with_suffix(".tmp")
                torch.save({"model": student.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                            "gen": gen.get_state(), "step": step, "losses": losses}, tmp)
                os.replace(tmp, checkpoint)
    student.eval()
    return losses


def distillation_texts(settings: PruneSettings, catalog_train: Sequence[str]) -> list[str]:
    """The catalog's train split, then the vocabulary pseudo-texts, then the user's file (each text once)."""
    from conversion.generated_text import load_text_file, texts_sha256, vocabulary_texts

    generated = vocabulary_texts(export_encoder(settings.teacher) / TOKENIZER_JSON, settings.generated_texts,
                                 seed=settings.seed + 1)
    extra: tuple[str, ...] = ()
    if settings.extra_texts:
        extra = load_text_file(settings.extra_texts)
        if settings.extra_texts_sha256 and texts_sha256(extra) != settings.extra_texts_sha256:
            raise ValueError(f"{settings.extra_texts} changed since the settings were made (sha256 differs)")
    return list(dict.fromkeys([*catalog_train, *generated, *extra]))


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def prune_and_distill(settings: PruneSettings, checkpoint: Path | None = None, progress: bool = True):
    """The pruned, distilled student, its structure and a report (no files written)."""
    torch.manual_seed(settings.seed)
    teacher, tok = load_torch_encoder(settings.teacher.model, settings.teacher.max_length)
    config = teacher.model.config
    if not 0 <= settings.drop_layers < config.num_hidden_layers:
        raise ValueError(f"drop_layers must be in [0, {config.num_hidden_layers - 1}], got {settings.drop_layers}")
    texts = split_texts(Catalog.load(build_catalog(settings.catalog)))
    train = texts["train"]
    rng = np.random.default_rng(settings.seed)
    sample = [train[i] for i in rng.choice(len(train), min(settings.importance_texts, len(train)), replace=False)]

    t0 = time.perf_counter()
    drop: list[int] = []
    if settings.drop_layers:
        scores = layer_drop_scores(teacher, tok, sample)
        drop = sorted(np.argsort(scores)[:settings.drop_layers].tolist())
        log.info("layer-skip scores %s: dropping layers %s", np.round(scores, 4).tolist(), drop)
    head_scores, neuron_scores = measure_importance(teacher, tok, sample)
    structure = plan_pruning(config, head_scores, neuron_scores, settings, drop)
    full = full_structure(config)
    train = distillation_texts(settings, train)
    teacher_emb = teacher_embeddings(settings.teacher, train, progress)
    student, _ = load_torch_encoder(settings.teacher.model, settings.teacher.max_length)
    shrink(student, structure)
    masks = apply_2to4(student) if settings.sparsity_2to4 else None
    log.info("pruned to %s: %.3f of FLOPs at seq %d, %d -> %d parameters", structure.summary(),
             structure.flops(settings.flops_seq) / full.flops(settings.flops_seq), settings.flops_seq,
             _params(teacher), _params(student))
    probe = texts["heldout_titles"][:500]  # a quick before/after; the report measures all held-out text
    probe_teacher = embed(teacher, tok, probe)
    before = float((embed(student, tok, probe) * probe_teacher).sum(1).mean())
    losses = distill(student, teacher_emb, train, tok, settings, checkpoint, masks)
    after = float((embed(student, tok, probe) * probe_teacher).sum(1).mean())
    report = {
        "structure": structure.summary(), "dropped_layers": drop,
        "flops": {str(s): {"teacher": full.flops(s), "pruned": structure.flops(s)} for s in (16, 32)},
        "keep_flops_achieved": structure.flops(settings.flops_seq) / full.flops(settings.flops_seq),
        "parameters": {"teacher": _params(teacher), "pruned": _params(student)},
        "heldout_title_cosine": {"before_distillation": before, "after_distillation": after},
        "distill": {"steps": len(losses), "first_loss": float(np.mean(losses[:10])) if losses else None,
                    "last_loss": float(np.mean(losses[-10:])) if losses else None,
                    "seconds": round(time.perf_counter() - t0, 1), "train_texts": len(train),
                    "catalog_texts": len(texts["train"]), "generated_texts": settings.generated_texts,
                    "extra_texts": settings.extra_texts, "extra_texts_sha256": settings.extra_texts_sha256},
        "sparsity_2to4": settings.sparsity_2to4,
        "head_importance": np.round(head_scores, 5).tolist(),
    }
    log.info("held-out title cosine to teacher: %.4f before distillation, %.4f after", before, after)
    return student, tok, structure, report


def build_pruned_encoder(settings: PruneSettings = PruneSettings(), force: bool = False) -> Path:
    folder = stages.stage_dir(STAGE, settings)
    if stages.is_complete(folder) and not force:
        log.info("pruned encoder up to date: %s", folder)
        return folder
    # The checkpoint sits beside the stage folder under the same settings hash, so a resumed run
    # can only pick up training for exactly these settings.
    checkpoint = folder.with_name(f".{folder.name}.{CHECKPOINT}")
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    student, tok, structure, report = prune_and_distill(settings, checkpoint)
    with stages.atomic_stage(folder, settings) as tmp:
        save_pruned(tmp, student, tok, structure, report)
    checkpoint.unlink(missing_ok=True)
    return folder


def save_pruned(folder: Path, student: PooledEncoder, tok, structure: Structure, report: dict) -> None:
    save_file({k: v.contiguous() for k, v in student.model.state_dict().items()}, str(folder / WEIGHTS))
    (folder / STRUCTURE_JSON).write_text(json.dumps(asdict(structure)))
    student.model.config.to_json_file(str(folder / "config.json"))
    tok.save(str(folder / TOKENIZER_JSON))
    (folder / DISTILL_JSON).write_text(json.dumps(report, indent=2))


def load_pruned_encoder(folder: str | os.PathLike) -> tuple[PooledEncoder, object]:
    """Rebuild the pruned architecture from structure.json and load its weights."""
    import tokenizers
    import transformers

    folder = model_dir_of(folder)
    structure = Structure(**json.loads((folder / STRUCTURE_JSON).read_text()))
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    config.num_hidden_layers = max(structure.layers) + 1  # the unpruned layer count, before slicing
    model = transformers.AutoModel.from_config(config, attn_implementation="eager")
    module = shrink(PooledEncoder(model), structure)
    result = module.model.load_state_dict(load_file(str(folder / WEIGHTS)), strict=False)
    # The pooler head is unused by mean pooling and may be absent; anything else missing is an error.
    missing = [k for k in result.missing_keys if not k.startswith("pooler.")]
    if missing or result.unexpected_keys:
        raise ValueError(f"{folder}: weights do not match structure.json "
                         f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
    tok = tokenizers.Tokenizer.from_file(str(folder / TOKENIZER_JSON))
    tok.no_padding()
    return module.eval(), tok


def main(argv: Sequence[str] | None = None) -> int:
    d = PruneSettings()
    p = argparse.ArgumentParser(prog="python -m conversion.prune_encoder", description=__doc__.splitlines()[0])
    p.add_argument("--keep-flops", type=float, default=d.keep_flops, help="fraction of the teacher's FLOPs to keep")
    p.add_argument("--drop-layers", type=int, default=d.drop_layers, help="whole layers to remove first")
    p.add_argument("--steps", type=int, default=d.distill_steps, help="distillation steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--sparsity-2to4", action="store_true", help="2:4 sparse weights (TensorRT sparse tensor cores)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--force", action="store_true", help="rebuild even if the stage folder is complete")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = PruneSettings(keep_flops=args.keep_flops, drop_layers=args.drop_layers,
                                 distill_steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                 sparsity_2to4=args.sparsity_2to4, seed=args.seed)
        folder = build_pruned_encoder(settings, force=args.force)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
