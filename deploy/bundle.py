"""Stage the model payload the container image carries: ONNX models, tokenizer, catalog artifact.

Never TensorRT engines: a plan is tied to one GPU model and TensorRT version, so the entrypoint
builds it on the node from the ONNX named in `bundle.json`. The layout mirrors render's
`Artifacts`, so the image renders its CPU or GPU repository with the same code as `make models`.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from model_repository import runtime
from model_repository.render import Artifacts

log = logging.getLogger(__name__)

BUNDLE_JSON = "bundle.json"
ENCODER_DIR, CATALOG_DIR, RANKER_DIR = "encoder", "catalog", "ranker"
# The ONNX the GPU node turns into a TensorRT plan, inside the encoder folder. The CPU encoder
# (ORT static INT8) is not a TensorRT input; the Q/DQ graph from nvidia-modelopt is.
GPU_ENCODER_ONNX = "encoder.gpu.onnx"
# Files of the encoder stage that serving needs; the rest (calibration data, reports) stays out.
_ENCODER_FILES = (runtime.ENCODER_FILE, runtime.TOKENIZER_FILE)
_SKIP = {"settings.json"}
# Relative to the repository root: the Docker build context, and what deploy/docker/Dockerfile copies.
IMAGE_BUNDLE = Path("build/image/bundle")


@dataclass(frozen=True)
class Bundle:
    root: Path
    embedding_dim: int
    gpu_precision: str  # build_trt_engine's label of GPU_ENCODER_ONNX: int8-qdq, fp16 or fp32

    @property
    def artifacts(self) -> Artifacts:
        return Artifacts(encoder_dir=self.root / ENCODER_DIR, catalog_dir=self.root / CATALOG_DIR,
                         ranker_dir=self.root / RANKER_DIR)

    @property
    def gpu_onnx(self) -> Path:
        return self.root / ENCODER_DIR / GPU_ENCODER_ONNX

    @classmethod
    def load(cls, root: Path | str) -> "Bundle":
        root = Path(root)
        try:
            meta = json.loads((root / BUNDLE_JSON).read_text())
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"{root} is not a model bundle ({BUNDLE_JSON}: {e})") from None
        bundle = cls(root=root, embedding_dim=int(meta["embedding_dim"]), gpu_precision=str(meta["gpu_precision"]))
        missing = [p for p in (*bundle.artifacts.folders(), bundle.gpu_onnx) if not Path(p).exists()]
        if missing:
            raise FileNotFoundError(f"bundle {root} lacks {', '.join(map(str, missing))}")
        return bundle


def gpu_source_onnx(encoder_dir: Path) -> Path:
    """The Q/DQ graph when the served encoder is the compressed one, else the FP32 export itself."""
    from conversion.compress_encoder import QDQ_ONNX

    qdq = Path(encoder_dir) / QDQ_ONNX
    return qdq if qdq.is_file() else Path(encoder_dir) / runtime.ENCODER_FILE


def _copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        dst.mkdir(parents=True, exist_ok=True)
        for child in src.iterdir():
            if child.name not in _SKIP:
                _copy(child, dst / child.name)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def stage_bundle(artifacts: Artifacts, embedding_dim: int, out: Path) -> Bundle:
    """Copy what serving needs into `out` (replaced whole) and describe it in bundle.json."""
    from conversion.build_trt_engine import detect_precision

    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for name in _ENCODER_FILES:
        _copy(artifacts.encoder_dir / name, tmp / ENCODER_DIR / name)
    gpu_src = gpu_source_onnx(artifacts.encoder_dir)
    _copy(gpu_src, tmp / ENCODER_DIR / GPU_ENCODER_ONNX)
    _copy(artifacts.catalog_dir, tmp / CATALOG_DIR)
    _copy(artifacts.ranker_file, tmp / RANKER_DIR / runtime.RANKER_FILE)
    (tmp / BUNDLE_JSON).write_text(json.dumps({
        "embedding_dim": embedding_dim, "gpu_precision": detect_precision(gpu_src),
        "sources": {k: Path(v).name for k, v in vars(artifacts).items() if k != "ranker_source"}, "gpu_source_onnx": gpu_src.name,
    }, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("staged model bundle %s", out)
    return Bundle.load(out)


def main(argv: list[str] | None = None) -> int:
    from conversion.build_models import ENCODERS, PROFILES, built_artifacts
    from conversion.stages import REPO_ROOT

    p = argparse.ArgumentParser(prog="python -m deploy.bundle", description=__doc__.splitlines()[0])
    p.add_argument("--profile", choices=sorted(PROFILES), default="default")
    p.add_argument("--encoder", choices=ENCODERS, default="int8")
    p.add_argument("--model", default="", help="the HF encoder folder the models were built with (default: bundled)")
    p.add_argument("--out", type=Path, help=f"bundle folder (default: {IMAGE_BUNDLE}, what the Dockerfile copies)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        artifacts, dim = built_artifacts(args.profile, args.model, args.encoder)
        bundle = stage_bundle(artifacts, dim, args.out or REPO_ROOT / IMAGE_BUNDLE)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(bundle.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
