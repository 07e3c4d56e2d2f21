"""Stand-ins for conversion.build_trt_engine.build_engine (no GPU here), importable from the tests and
from the entrypoint subprocesses they start."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from conversion.build_trt_engine import BuildTarget

A10G = BuildTarget("10.8.0.43", "NVIDIA A10G", "8.6", "12.8")
L4 = BuildTarget("10.8.0.43", "NVIDIA L4", "8.9", "12.8")
PLAN = "encoder.plan"


class FakeBuilder:
    """Stands in for build_engine: writes a plan file, records whether a rebuild was forced and for which target."""

    def __init__(self):
        self.calls: list[tuple[Path, bool]] = []
        self.targets: list[BuildTarget | None] = []

    def __call__(self, onnx, out, settings, timing_cache=None, *, force=False, target=None):
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        plan = out / PLAN
        if force or not plan.exists():
            plan.write_bytes(b"plan-%d" % len(self.calls))
        self.calls.append((out, force))
        self.targets.append(target)
        return plan


class SlowBuilder(FakeBuilder):
    """A build that takes minutes: it writes half a plan the way build_engine's atomic write names it
    (.<name>.tmp-<pid>), says BUILDING on stdout, and sleeps in a C call (time.sleep), like TensorRT."""

    def __call__(self, onnx, out, settings, timing_cache=None, *, force=False, target=None):
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f".{PLAN}.tmp-{os.getpid()}").write_bytes(b"half a plan")
        print("BUILDING", flush=True)
        time.sleep(600)
        return super().__call__(onnx, out, settings, timing_cache, force=force, target=target)


def run_entrypoint_with_slow_build(argv: list[str]) -> int:
    """The real entrypoint main(), on a pretend A10G node whose engine build is SlowBuilder."""
    from conversion import build_trt_engine
    from deploy import engines, entrypoint

    build_trt_engine.build_engine = SlowBuilder()
    entrypoint.probe_target = lambda: A10G
    engines.server_target = lambda target, library=None: target
    return entrypoint.main(argv)


if __name__ == "__main__":
    sys.exit(run_entrypoint_with_slow_build(sys.argv[1:]))
