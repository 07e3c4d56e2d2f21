"""The node's TensorRT engine cache: build or reuse the encoder plan, never serve a bad one.

`conversion.build_trt_engine` owns the key (TensorRT version, GPU name, compute capability,
ONNX sha256, builder settings) and reuses a plan only when its metadata matches that key and its
bytes are unchanged. This module adds what a shared node cache needs on top:
- one folder per GPU model / compute capability / TensorRT version, so nodes of different kinds
  sharing a volume do not evict each other's plans;
- a file lock, so two pods starting on one node build once, not twice on one GPU;
- a deserialization check: a plan that matches its key but TensorRT cannot load (a truncated
  copy, a driver problem) is rebuilt once, and if the rebuilt plan fails too the start fails;
- the server's TensorRT: the plan is built with the pip wheel's libnvinfer but loaded by Triton's
  tensorrt backend with the container's own, and a plan loads only in the exact version that built
  it. So the key carries the version of the libnvinfer the server loads, and a wheel that differs
  from it fails the image build (`python -m deploy.engines check-versions`) and the start;
- an interruptible build: a SIGTERM during a build ends the process at once and leaves no plan
  or partial file behind (the entrypoint installs the handler, `interrupt_cleanup` does the rest).
"""
from __future__ import annotations

import argparse
import dataclasses
import fcntl
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from conversion import build_trt_engine
from conversion.build_trt_engine import BuildTarget, TensorRTUnavailableError, TrtBuildError, TrtBuildSettings

log = logging.getLogger(__name__)

TIMING_CACHE = "timing.cache"
LOCK_FILE = ".build.lock"


class EngineUnusableError(TrtBuildError):
    """A freshly built plan still does not deserialize: serving it would fail every request."""


class TensorRTVersionMismatchError(TensorRTUnavailableError):
    """The wheel that builds plans and the libnvinfer that Triton loads them with differ."""


# The library Triton's tensorrt backend links (TensorRT 10's soname), resolved by the dynamic loader
# the way the server resolves it: the container's own install, not the pip wheel's copy.
SERVER_LIBNVINFER = "libnvinfer.so.10"
_LIB_VERSION_PROBE = (
    "import ctypes, sys\n"
    "lib = ctypes.CDLL(sys.argv[1])\n"
    "v = lib.getInferLibVersion()\n"  # TensorRT >= 10: major * 10000 + minor * 100 + patch
    "build = lib.getInferLibBuildVersion() if hasattr(lib, 'getInferLibBuildVersion') else None\n"
    "print(f'{v // 10000}.{v // 100 % 100}.{v % 100}' + ('' if build is None else f'.{build}'))\n")
_WHEEL_VERSION_PROBE = "import tensorrt; print(tensorrt.__version__)"


def _probe(code: str, *args: str, what: str) -> str:
    # A fresh interpreter each: once `import tensorrt` has loaded the wheel's libnvinfer.so.10, a
    # dlopen of that soname in the same process returns the wheel's copy, whatever the server would load.
    run = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
    if run.returncode != 0:
        tail = (run.stderr.strip().splitlines() or ["no output"])[-1]
        raise TensorRTUnavailableError(f"{what}: {tail}")
    return run.stdout.strip()


def server_tensorrt_version(library: str = SERVER_LIBNVINFER) -> str:
    """major.minor.patch[.build] of the libnvinfer the server process will load."""
    return _probe(_LIB_VERSION_PROBE, library, what=f"cannot read the server's TensorRT version from {library}")


def wheel_tensorrt_version() -> str:
    return _probe(_WHEEL_VERSION_PROBE, what="the tensorrt Python package cannot be imported")


def require_matching_tensorrt(library: str = SERVER_LIBNVINFER) -> str:
    """The server's TensorRT version, after checking the wheel that builds plans is the same release."""
    server, wheel = server_tensorrt_version(library), wheel_tensorrt_version()
    if not build_trt_engine.same_tensorrt_release(server, wheel):
        raise TensorRTVersionMismatchError(
            f"the tensorrt wheel is {wheel} but the server's {library} is {server}: plans built by the wheel "
            "would not load in Triton (pin tensorrt-cu12 to the container's TensorRT)")
    return server


def server_target(target: BuildTarget, library: str = SERVER_LIBNVINFER) -> BuildTarget:
    """`target` with the server's TensorRT version in place of the wheel's: what the cache is keyed on."""
    return dataclasses.replace(target, tensorrt_version=require_matching_tensorrt(library))


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

# Folders a build may leave a partial file in, for interrupt_cleanup; guarded: the handler runs in the
# main thread while the build runs in another.
_ACTIVE: set[Path] = set()
_ACTIVE_LOCK = threading.Lock()


def interrupt_cleanup() -> list[Path]:
    """Remove this process's partial files (<folder>/.<name>.tmp-<pid>) from folders with a build in
    progress; the SIGTERM handler calls it right before the process exits. Returns what it removed."""
    removed = []
    with _ACTIVE_LOCK:
        folders = list(_ACTIVE)
    for folder in folders:
        for partial in folder.glob(f".*.tmp-{os.getpid()}"):
            partial.unlink(missing_ok=True)
            removed.append(partial)
    return removed


def _interruptible(build: Builder, folder: Path, *args, **kwargs) -> Path:
    """Run `build` in a worker thread while the main thread waits in short joins.

    A Python signal handler runs only in the main thread, between bytecodes: during a TensorRT build
    (one C++ call of minutes) a handler would wait for the call to return. Waiting in join() keeps the
    main thread where the SIGTERM handler can run at once and end the process."""
    result: dict = {}

    def work():
        try:
            result["plan"] = build(*args, **kwargs)
        except BaseException as e:  # re-raised in the caller's thread
            result["error"] = e

    with _ACTIVE_LOCK:
        _ACTIVE.add(folder)
    try:
        worker = threading.Thread(target=work, name="engine-build", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.2)
    finally:
        with _ACTIVE_LOCK:
            _ACTIVE.discard(folder)
    if "error" in result:
        raise result["error"]
    return result["plan"]


def ensure_engine(onnx: Path, cache_root: Path, settings: TrtBuildSettings, target: BuildTarget, *,
                  build: Builder | None = None, deserializes: Callable[[Path], bool] = plan_deserializes) -> Path:
    """The plan for `onnx` on this node: reused when its key matches and it loads, else built.

    `target` is the node as the server sees it (server_target: the server's TensorRT version), and
    the plan's key is built from it. `build` defaults to `build_engine` (looked up at call time), which
    reuses a plan only if `engine_is_reusable`; it is a parameter so the cache policy and the
    interruption can be tested without a GPU.
    """
    build = build or build_trt_engine.build_engine
    folder = writable_cache_root(Path(cache_root)) / target_folder_name(target)
    with file_lock(folder / LOCK_FILE):
        plan = _interruptible(build, folder, onnx, folder, settings, folder / TIMING_CACHE, target=target)
        if deserializes(plan):
            log.info("serving TensorRT plan %s", plan)
            return plan
        log.warning("cached plan %s matches its key but does not deserialize; rebuilding it", plan.name)
        plan = _interruptible(build, folder, onnx, folder, settings, folder / TIMING_CACHE, force=True, target=target)
        if not deserializes(plan):
            raise EngineUnusableError(f"rebuilt plan {plan} does not deserialize on this node; not serving it")
        return plan


def main(argv: list[str] | None = None) -> int:
    """`check-versions`: the image build's guard (deploy/docker/Dockerfile). One line, exit 1 on a mismatch."""
    p = argparse.ArgumentParser(prog="python -m deploy.engines", description=main.__doc__.split(":")[0])
    sub = p.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-versions", help="the tensorrt wheel must equal the server's libnvinfer")
    check.add_argument("--library", default=SERVER_LIBNVINFER)
    args = p.parse_args(argv)
    try:
        version = require_matching_tensorrt(args.library)
    except TensorRTUnavailableError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    print(f"tensorrt wheel and server libnvinfer: {version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
