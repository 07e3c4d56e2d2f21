"""The node's TensorRT engine cache: build or reuse the encoder plan, never serve a bad one.

`conversion.build_trt_engine` owns the key (TensorRT version, GPU name, compute capability,
ONNX sha256, builder settings) and reuses a plan only when its metadata matches that key and its
bytes are unchanged. This module adds what a shared node cache needs on top:
- one folder per GPU model / compute capability / TensorRT version, so nodes of different kinds
  sharing a volume do not evict each other's plans;
- a file lock, so two pods starting on one node build once, not twice on one GPU;
- a deserialization check: a plan that matches its key but TensorRT cannot load (a truncated
  copy, a driver problem) is rebuilt once, and if the rebuilt plan fails too the start fails.
"""
from __future__ import annotations

import fcntl
import logging
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from conversion.build_trt_engine import BuildTarget, TrtBuildError, TrtBuildSettings, build_engine

log = logging.getLogger(__name__)

TIMING_CACHE = "timing.cache"
LOCK_FILE = ".build.lock"


class EngineUnusableError(TrtBuildError):
    """A freshly built plan still does not deserialize: serving it would fail every request."""


def target_folder_name(target: BuildTarget) -> str:
    """e.g. nvidia-a10g.cc8.6.trt10.8.0.43: readable, and distinct for every key field of the node."""
    gpu = re.sub(r"[^a-z0-9]+", "-", target.gpu_name.lower()).strip("-") or "gpu"
    return f"{gpu}.cc{target.compute_capability}.trt{target.tensorrt_version}"


def writable_cache_root(root: Path) -> Path:
    """`root`, or a temporary folder when the volume is missing or read-only (the plan is then
    rebuilt at every start: slower, still correct)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root):
            pass
        return root
    except OSError as e:
        fallback = Path(tempfile.gettempdir()) / "searchrank-engines"
        log.warning("engine cache %s is not writable (%s); building into %s, not kept across restarts",
                    root, e, fallback)
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the handle closes, also if we crash
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def plan_deserializes(plan: Path) -> bool:
    """True if TensorRT on this node turns the plan into an engine."""
    from conversion.build_trt_engine import _import_tensorrt, _trt_logger

    trt = _import_tensorrt()
    try:
        engine = trt.Runtime(_trt_logger(trt)).deserialize_cuda_engine(Path(plan).read_bytes())
    except Exception as e:  # bindings raise on some corruptions and return None on others
        log.warning("%s failed to deserialize: %s", plan.name, e)
        return False
    return engine is not None


Builder = Callable[..., Path]


def ensure_engine(onnx: Path, cache_root: Path, settings: TrtBuildSettings, target: BuildTarget, *,
                  build: Builder = build_engine, deserializes: Callable[[Path], bool] = plan_deserializes) -> Path:
    """The plan for `onnx` on this node: reused when its key matches and it loads, else built.

    `build` is `build_engine` (which reuses a plan only if `engine_is_reusable`); it is a
    parameter so the cache policy can be tested without a GPU.
    """
    folder = writable_cache_root(Path(cache_root)) / target_folder_name(target)
    with file_lock(folder / LOCK_FILE):
        plan = build(onnx, folder, settings, folder / TIMING_CACHE)
        if deserializes(plan):
            log.info("serving TensorRT plan %s", plan)
            return plan
        log.warning("cached plan %s matches its key but does not deserialize; rebuilding it", plan.name)
        plan = build(onnx, folder, settings, folder / TIMING_CACHE, force=True)
        if not deserializes(plan):
            raise EngineUnusableError(f"rebuilt plan {plan} does not deserialize on this node; not serving it")
        return plan
