"""Stage 03: structured pruning and distillation, on a tiny random BERT (fast) and real pieces."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers

from conversion import prune_encoder as pe
from conversion.export_encoder import PooledEncoder, default_model_path, load_tokenizer
from conversion.catalog_generator import CatalogSettings, generate

pytestmark = pytest.mark.unit

TEXTS = ["red running shoes", "wireless earbuds noise cancelling", "organic green tea bags 100 count",
         "Nike Air Zoom Pegasus 40 Men's Road Running Shoes - Red/White, Size 10.5", "usb-c charger 65w gan",
         "Stainless Steel Frying Pan 12 Inch, Tri-Ply Nonstick Skillet", "kids winter jacket size 8",
         "LEGO Star Wars Millennium Falcon 75257 Building Kit"] * 4


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(default_model_path(), 128)


def tiny_encoder(seed: int = 0) -> PooledEncoder:
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=128,
                                     attn_implementation="eager")
    return PooledEncoder(transformers.BertModel(config, add_pooling_layer=False)).eval()


def batch(tok, texts):
    return next(pe._batches(tok, texts, len(texts)))


def test_layer_flops_counts_projections_attention_and_ffn():
    # hidden 4, attention width 2, ffn 3, seq 5: 2*5*4*2*4 + 4*25*2 + 4*5*4*3
    assert pe.layer_flops(4, 2, 3, 5) == 320 + 200 + 240


def test_plan_meets_flop_budget_and_keeps_the_most_important_units():
    config = SimpleNamespace(num_attention_heads=12, intermediate_size=1536, hidden_size=384, num_hidden_layers=6)
    rng = np.random.default_rng(0)
    heads = rng.random((6, 12))
    neurons = [rng.random(1536) for _ in range(6)]
    full = pe.full_structure(config).flops(16)
    for keep in (0.3, 0.5, 0.75):
        plan = pe.plan_pruning(config, heads, neurons, pe.PruneSettings(keep_flops=keep))
        assert keep - 0.03 <= plan.flops(16) / full <= keep
        assert all(len(h) >= 1 for h in plan.heads)
        assert all(len(n) % 16 == 0 for n in plan.neurons)
        # Whatever was kept outranks whatever was dropped within each layer.
        for i, (h, n) in enumerate(zip(plan.heads, plan.neurons)):
            dropped_h = sorted(set(range(12)) - set(h))
            if dropped_h and h:
                assert heads[i, h].min() >= heads[i, dropped_h].max()
            dropped_n = sorted(set(range(1536)) - set(n))
            assert neurons[i][n].min() >= neurons[i][dropped_n].max()
    dropped = pe.plan_pruning(config, heads, neurons, pe.PruneSettings(keep_flops=0.5), drop=[2])
    assert dropped.layers == [0, 1, 3, 4, 5]


def test_shrink_equals_masking_the_removed_units(tok):
    """A sliced model must compute exactly what the original computes with those units zeroed."""
    model = tiny_encoder()
    structure = pe.Structure(layers=[0, 1, 2], heads=[[0, 2], [1], [0, 1, 3]],
                             neurons=[list(range(0, 128, 2)), list(range(32)), list(range(100))],
                             head_dim=16, hidden=64)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for layer, heads, neurons in zip(masked.model.encoder.layer, structure.heads, structure.neurons):
            head_cols = torch.ones(64, dtype=torch.bool)
            for h in heads:
                head_cols[h * 16:(h + 1) * 16] = False
            layer.attention.output.dense.weight[:, head_cols] = 0
            neuron_cols = torch.ones(128, dtype=torch.bool)
            neuron_cols[neurons] = False
            layer.output.dense.weight[:, neuron_cols] = 0
    pruned = pe.shrink(copy.deepcopy(model), structure)
    ids, mask = batch(tok, TEXTS[:8])
    with torch.no_grad():
        want, got = masked(ids, mask), pruned(ids, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    layer1 = pruned.model.encoder.layer[1]
    assert layer1.attention.self.query.weight.shape == (16, 64)
    assert layer1.intermediate.dense.weight.shape == (32, 64)
    assert layer1.output.dense.weight.shape == (64, 32)
    assert pe._params(pruned) < pe._params(model)


def test_importance_ranks_a_silenced_head_and_neuron_last(tok):
    model = tiny_encoder()
    with torch.no_grad():
        model.model.encoder.layer[1].attention.output.dense.weight[:, 16:32] = 0  # head 1 of layer 1
        model.model.encoder.layer[2].output.dense.weight[:, 7] = 0               # neuron 7 of layer 2
    heads, neurons = pe.measure_importance(model, tok, TEXTS, batch_size=8)
    assert heads.shape == (3, 4) and [n.shape for n in neurons] == [(128,)] * 3
    assert heads[1, 1] == 0 and heads[1].argmin() == 1 and (heads[1, [0, 2, 3]] > 0).all()
    assert neurons[2][7] == 0 and (np.delete(neurons[2], 7) > 0).all()


def test_pruned_checkpoint_round_trips(tok, tmp_path):
    model = tiny_encoder()
    structure = pe.Structure(layers=[0, 2], heads=[[1, 3], [0]], neurons=[list(range(48)), list(range(16, 80))],
                             head_dim=16, hidden=64)
    pe.shrink(model, structure)
    pe.save_pruned(tmp_path, model, tok, structure, {"note": "test"})
    loaded, loaded_tok = pe.load_pruned_encoder(tmp_path)
    ids, mask = batch(tok, TEXTS[:5])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask), model(ids, mask))
    assert len(loaded.model.encoder.layer) == 2
    assert loaded_tok.encode("red shoes").ids == tok.encode("red shoes").ids


def test_distillation_reduces_loss_and_resumes_from_checkpoint(tok, tmp_path):
    teacher = tiny_encoder(seed=1)
    texts = TEXTS[:8]
    ids, mask = batch(tok, texts)
    with torch.no_grad():
        target = teacher(ids, mask)
    settings = pe.PruneSettings(distill_steps=40, batch_size=8, lr=3e-3, warmup_steps=1, checkpoint_every=10)
    student = pe.shrink(copy.deepcopy(teacher), pe.Structure(
        layers=[0, 1, 2], heads=[[0], [1], [2]], neurons=[list(range(32))] * 3, head_dim=16, hidden=64))
    losses = pe.distill(student, target, texts, tok, settings)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])

    # Interrupt after 20 steps (checkpoints every 10), then rerun: it picks up at 20 and replays
    # exactly the losses of the uninterrupted run.
    ckpt = tmp_path / "ckpt.pt"
    fresh = pe.shrink(copy.deepcopy(teacher), pe.Structure(
        layers=[0, 1, 2], heads=[[0], [1], [2]], neurons=[list(range(32))] * 3, head_dim=16, hidden=64))
    real_batches, calls = pe._batches, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) > 20:
            raise KeyboardInterrupt
        return real_batches(*args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pe, "_batches", interrupted)
        with pytest.raises(KeyboardInterrupt):
            pe.distill(copy.deepcopy(fresh), target, texts, tok, settings, checkpoint=ckpt)
    assert torch.load(ckpt, weights_only=False)["step"] == 20
    resumed = pe.distill(copy.deepcopy(fresh), target, texts, tok, settings, checkpoint=ckpt)
    assert len(resumed) == 40
    np.testing.assert_allclose(resumed, losses, rtol=1e-4, atol=1e-7)


def test_2to4_sparsity_holds_through_distillation(tok):
    teacher = tiny_encoder()
    student = copy.deepcopy(teacher)
    masks = pe.apply_2to4(student)
    assert masks and all(".encoder.layer." in f".{name}" for name in masks)
    ids, mask = batch(tok, TEXTS[:8])
    with torch.no_grad():
        target = teacher(ids, mask)
    pe.distill(student, target, TEXTS[:8], tok, pe.PruneSettings(distill_steps=5, batch_size=8), masks=masks)
    for name, module in student.named_modules():
        if name in masks:
            groups = module.weight.detach().view(module.out_features, -1, 4)
            assert ((groups == 0).sum(-1) >= 2).all(), name


def test_text_split_is_deterministic_and_disjoint():
    catalog = generate(CatalogSettings(n_items=400, n_users=50, n_sessions=300), progress=False)
    a, b = pe.split_texts(catalog), pe.split_texts(catalog)
    assert a == b
    held = set(a["heldout_titles"]) | set(a["heldout_queries"])
    assert held and not held & set(a["train"])
    share = len(a["heldout_titles"]) / len(set(catalog.titles))
    assert 0.05 < share < 0.15


def test_cli_rejects_bad_keep_flops(capsys):
    assert pe.main(["--keep-flops", "1.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "keep_flops" in err and "\n" not in err
