"""Stage 01: the ONNX encoder export, checked against PyTorch and on its own."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tokenizers
import torch

from conversion import export_encoder as ee
from conversion import stages
from model_repository import spec

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def build_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("build")


@pytest.fixture(scope="module")
def exported(build_root) -> Path:
    # One real export for the whole module; it goes to the default (hashed) stage folder.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SEARCHRANK_BUILD", str(build_root))
        return ee.export_encoder(ee.EncoderExportSettings())


@pytest.fixture(scope="module")
def report(exported) -> dict:
    return json.loads((exported / ee.REPORT_JSON).read_text())


def _embed(folder: Path, texts: list[str]) -> np.ndarray:
    tok = tokenizers.Tokenizer.from_file(str(folder / ee.TOKENIZER_JSON))
    tok.enable_padding()
    enc = tok.encode_batch(texts)
    session = ort.InferenceSession(str(folder / ee.ENCODER_ONNX), providers=["CPUExecutionProvider"])
    feeds = {spec.INPUT_IDS.name: np.array([e.ids for e in enc], dtype=np.int64),
             spec.ATTENTION_MASK.name: np.array([e.attention_mask for e in enc], dtype=np.int64)}
    return session.run([spec.text_embedding(384).name], feeds)[0]


def test_export_lands_in_stage_folder_and_is_reused(exported, build_root, monkeypatch):
    monkeypatch.setenv("SEARCHRANK_BUILD", str(build_root))
    assert exported == stages.stage_dir("01-encoder-fp32", ee.EncoderExportSettings())
    assert exported.is_relative_to(build_root) and stages.is_complete(exported)
    assert {p.name for p in exported.iterdir()} >= {ee.ENCODER_ONNX, ee.TOKENIZER_JSON, ee.REPORT_JSON}
    mtime = (exported / ee.ENCODER_ONNX).stat().st_mtime_ns
    assert ee.export_encoder(ee.EncoderExportSettings()) == exported
    assert (exported / ee.ENCODER_ONNX).stat().st_mtime_ns == mtime


def test_fidelity_report(exported, report):
    fid = report["fidelity"]
    assert fid["min_cosine"] >= 0.9999
    assert fid["n_texts"] >= 40
    assert len(fid["batch_sizes"]) >= 2 and len(fid["seq_lengths"]) >= 2
    assert report["embedding_dim"] == ee.read_embedding_dim(exported) == 384
    assert report["opset"] == 17 and set(report["versions"]) >= {"torch", "onnx", "onnxruntime"}


def test_onnx_names_and_dynamic_axes(exported):
    model = onnx.load(str(exported / ee.ENCODER_ONNX))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == [spec.INPUT_IDS.name, spec.ATTENTION_MASK.name]
    assert [o.name for o in model.graph.output] == [spec.text_embedding(384).name]
    for vi in model.graph.input:
        batch, seq = vi.type.tensor_type.shape.dim
        assert batch.dim_param and seq.dim_param and not batch.dim_value and not seq.dim_value
        assert vi.type.tensor_type.elem_type == onnx.TensorProto.INT64
    batch, hidden = model.graph.output[0].type.tensor_type.shape.dim
    assert batch.dim_param and hidden.dim_value == 384


def test_tokenizer_truncates_without_fixed_padding(exported):
    cfg = json.loads((exported / ee.TOKENIZER_JSON).read_text())
    assert cfg["truncation"]["max_length"] == max(spec.SEQ_BUCKETS)
    assert cfg["padding"] is None
    tok = tokenizers.Tokenizer.from_file(str(exported / ee.TOKENIZER_JSON))
    assert len(tok.encode("shoes").ids) == 3
    assert len(tok.encode("shoes " * 500).ids) == max(spec.SEQ_BUCKETS)


def test_ort_embeddings_are_unit_norm_and_semantic(exported):
    emb = _embed(exported, ["red running shoes", "running shoes in red", "stainless steel frying pan",
                            "ワイヤレスイヤホン 🎧"])
    assert emb.shape == (4, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert emb[0] @ emb[1] > emb[0] @ emb[2]


def test_perturbed_weights_fail_fidelity(exported):
    module, _ = ee.load_torch_encoder(ee.default_model_path())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    texts = ["red running shoes", "🔥 summer sale dresses 🌸", ee.FIDELITY_TEXTS[-1]]
    with pytest.raises(ee.ExportFidelityError, match="cosine"):
        ee.check_fidelity(module, exported / ee.ENCODER_ONNX, exported / ee.TOKENIZER_JSON, texts, 0.9999)


def test_non_bert_config_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ee.UnsupportedModelError, match="gpt2"):
        ee.load_torch_encoder(tmp_path)


def test_cli_bad_model_path(tmp_path):
    missing, out = tmp_path / "no-such-model", tmp_path / "out" / "encoder"
    env = {**os.environ, "SEARCHRANK_BUILD": str(tmp_path / "build")}
    proc = subprocess.run([sys.executable, "-m", "conversion.export_encoder", "--model", str(missing),
                           "--out", str(out)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(missing) in lines[0]
    assert not proc.stdout.strip()
    assert not (tmp_path / "out").exists() and not (tmp_path / "build").exists()
