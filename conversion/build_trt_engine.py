"""ONNX -> TensorRT plan for the encoder (or the ranker), built on the GPU node that serves it.

TensorRT >= 10, explicit quantization only: networks are STRONGLY_TYPED, so precision is the
ONNX's own (TensorRT 11 removed BuilderFlag.FP16/INT8 and the INT8 calibrator). The precision
label is checked against the ONNX: int8-qdq = Q/DQ nodes (nvidia-modelopt), fp16 = float16
tensors (fp16 export or ModelOpt AutoCast), fp32 = neither.

One optimization profile (batch min..max, sequence smallest..largest bucket) by default: Triton's
TensorRT backend uses only profile 0 unless instance_group lists `profile`, and with several it
keeps one execution context per profile per instance. "per-bucket" exists to measure the
difference; docs/tensorrt.md has the reasoning and the sources.

A plan is valid for one GPU model and TensorRT version only: the JSON beside it holds the key
(TensorRT version, GPU name, compute capability, ONNX sha256, settings hash), and
`engine_is_reusable` refuses a plan whose key differs or whose bytes changed.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from conversion.stages import settings_hash
from model_repository import spec

log = logging.getLogger(__name__)

PRECISIONS = ("int8-qdq", "fp16", "fp32")
PROFILE_STRATEGIES = ("single", "per-bucket")
MIN_TENSORRT_MAJOR = 10
# Per-request dims (Triton convention, batch excluded); -1 marks the sequence axis.
ENCODER_INPUTS = {t.name: t.dims for t in (spec.INPUT_IDS, spec.ATTENTION_MASK)}
KEY_FIELDS = ("tensorrt_version", "gpu_name", "compute_capability", "onnx_sha256", "settings_hash")


class TrtBuildError(RuntimeError):
    """A build that produced no plan."""


class TensorRTUnavailableError(TrtBuildError):
    """No TensorRT >= 10 or no usable NVIDIA GPU here; the message is one line."""


class OnnxParseError(TrtBuildError):
    def __init__(self, onnx_path: Path, errors: Sequence[str]):
        self.errors = list(errors)
        super().__init__(f"TensorRT could not parse {onnx_path}: {len(self.errors)} error(s): " + "; ".join(self.errors))


class SettingsError(ValueError):
    def __init__(self, field: str, detail: str):
        self.field, self.detail = field, detail
        super().__init__(f"{field}: {detail}")


@dataclasses.dataclass(frozen=True)
class TrtBuildSettings:
    precision: str = "fp32"
    min_batch: int = 1
    opt_batch: int = 16  # kernels are timed at opt; a loaded dynamic batcher's typical batch
    max_batch: int = 64  # spec.py's max_batch_size for the encoder
    seq_buckets: tuple[int, ...] = spec.SEQ_BUCKETS
    opt_sequence: int | None = None  # None: smallest bucket, where latency-critical queries land
    profile_strategy: str = "single"
    sparse_weights: bool = False
    workspace_gib: float = 4.0
    builder_optimization_level: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "seq_buckets", tuple(int(b) for b in self.seq_buckets))
        b = self.seq_buckets
        for field, ok, detail in [
            ("precision", self.precision in PRECISIONS, f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"),
            ("profile_strategy", self.profile_strategy in PROFILE_STRATEGIES,
             f"must be one of {', '.join(PROFILE_STRATEGIES)}, got {self.profile_strategy!r}"),
            ("min_batch", self.min_batch >= 1, f"must be >= 1, got {self.min_batch}"),
            ("max_batch", self.max_batch >= self.min_batch, f"{self.max_batch} is below min batch {self.min_batch}"),
            ("opt_batch", self.min_batch <= self.opt_batch <= self.max_batch,
             f"{self.opt_batch} is outside the batch range {self.min_batch}..{self.max_batch}"),
            ("seq_buckets", bool(b) and b[0] >= 1 and all(x < y for x, y in zip(b, b[1:])),
             f"must be positive and strictly increasing, got {b}"),
            ("opt_sequence", self.opt_sequence is None or (bool(b) and b[0] <= self.opt_sequence <= b[-1]),
             f"{self.opt_sequence} is outside the bucket range {b[:1]}..{b[-1:]}"),
            ("workspace_gib", self.workspace_gib > 0, f"must be > 0, got {self.workspace_gib}"),
            ("builder_optimization_level", 0 <= self.builder_optimization_level <= 5,
             f"must be 0..5, got {self.builder_optimization_level}"),
        ]:
            if not ok:
                raise SettingsError(field, detail)

    @property
    def opt_seq(self) -> int:
        return self.seq_buckets[0] if self.opt_sequence is None else self.opt_sequence


@dataclasses.dataclass(frozen=True)
class ShapeRange:
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


def optimization_profiles(settings: TrtBuildSettings, input_names: Iterable[str],
                          dims: Mapping[str, Sequence[int]] | None = None) -> list[dict[str, ShapeRange]]:
    """min/opt/max per input, one dict per profile. `dims`: per-request dims (batch excluded, -1 =
    sequence axis); an input it does not name is [batch, sequence], like the encoder's."""
    names = list(input_names)
    if not names:
        raise ValueError("the network has no inputs")
    per_request = {n: tuple(int(d) for d in (dims or {}).get(n, (-1,))) for n in names}
    b = settings.seq_buckets
    if not any(-1 in d for d in per_request.values()):
        seq_ranges = [(0, 0, 0)]  # e.g. the ranker: one profile whatever the strategy
    elif settings.profile_strategy == "single":
        seq_ranges = [(b[0], settings.opt_seq, b[-1])]
    else:  # bucket k takes lengths (b[k-1], b[k]]: together exactly the single profile's range
        seq_ranges = [(lo, hi, hi) for lo, hi in zip((b[0],) + tuple(x + 1 for x in b[:-1]), b)]
    batch = (settings.min_batch, settings.opt_batch, settings.max_batch)
    return [{n: ShapeRange(*((batch[k],) + tuple(seq[k] if d == -1 else d for d in per_request[n]) for k in range(3)))
             for n in names} for seq in seq_ranges]


def engine_name(settings: TrtBuildSettings, onnx_sha: str, model: str = "encoder") -> str:
    """e.g. encoder.int8-qdq.b1-64.s16-128.sparse.<hash>.plan; the hash covers ONNX and settings."""
    b = settings.seq_buckets
    parts = [model, settings.precision, f"b{settings.min_batch}-{settings.max_batch}", f"s{b[0]}-{b[-1]}"]
    parts += [f"p{len(b)}"] if settings.profile_strategy == "per-bucket" else []
    parts += ["sparse"] if settings.sparse_weights else []
    return ".".join(parts + [hashlib.sha256(f"{onnx_sha}:{settings_hash(settings)}".encode()).hexdigest()[:12], "plan"])


@dataclasses.dataclass(frozen=True)
class BuildTarget:
    """What a plan is tied to, probed on the machine that builds or serves it."""
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    cuda_driver: str


def _import_tensorrt():
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:
        raise TensorRTUnavailableError(" ".join(f"the tensorrt Python package cannot be imported ({e})".split())) from None
    if int(trt.__version__.split(".")[0]) < MIN_TENSORRT_MAJOR:
        raise TensorRTUnavailableError(f"TensorRT >= {MIN_TENSORRT_MAJOR} is required, found {trt.__version__}")
    return trt


def _cuda_device() -> tuple[str, str, str]:
    # The CUDA driver API through ctypes: present wherever a plan can run, no CUDA Python package.
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        raise TensorRTUnavailableError("no NVIDIA driver (libcuda.so.1 not found), so no GPU") from None
    ver, count, dev, major, minor = (ctypes.c_int() for _ in range(5))
    name = ctypes.create_string_buffer(256)
    for call, args in [("cuInit", (0,)), ("cuDriverGetVersion", (ctypes.byref(ver),)),
                       ("cuDeviceGetCount", (ctypes.byref(count),))]:
        if (rc := getattr(cuda, call)(*args)) != 0:
            raise TensorRTUnavailableError(f"no usable GPU: {call} returned CUresult {rc}")
    if count.value < 1:
        raise TensorRTUnavailableError("no CUDA GPU visible (check CUDA_VISIBLE_DEVICES)")
    # 75/76: CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR/MINOR
    if (cuda.cuDeviceGet(ctypes.byref(dev), 0) or cuda.cuDeviceGetName(name, 256, dev)
            or cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)
            or cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)):
        raise TensorRTUnavailableError("no usable GPU: CUDA could not describe device 0")
    return name.value.decode(), f"{major.value}.{minor.value}", f"{ver.value // 1000}.{ver.value % 1000 // 10}"


def probe_target() -> BuildTarget:
    """TensorRT version and GPU 0 as TensorRT sees it; TensorRTUnavailableError if either is missing."""
    trt = _import_tensorrt()
    return BuildTarget(trt.__version__, *_cuda_device())


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def engine_cache_key(settings: TrtBuildSettings, onnx_sha: str, target: BuildTarget) -> dict[str, str]:
    # The driver is recorded in the metadata, not keyed: a newer driver runs an older plan.
    return {"tensorrt_version": target.tensorrt_version, "gpu_name": target.gpu_name,
            "compute_capability": target.compute_capability, "onnx_sha256": onnx_sha,
            "settings_hash": settings_hash(settings)}


def metadata_path(plan: str | os.PathLike) -> Path:
    return Path(plan).with_suffix(".json")


def load_engine_metadata(plan: str | os.PathLike) -> dict[str, Any] | None:
    """The metadata beside `plan`, or None when it is missing or unreadable."""
    try:
        meta = json.loads(metadata_path(plan).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def engine_is_reusable(plan: str | os.PathLike, expected_key: Mapping[str, str]) -> bool:
    """True only if `plan` is complete and was built for exactly `expected_key`."""
    if missing := [f for f in KEY_FIELDS if not expected_key.get(f)]:
        raise ValueError(f"expected_key lacks {', '.join(missing)}")
    plan, meta = Path(plan), load_engine_metadata(plan)
    if meta is None or not plan.is_file():
        log.info("%s: no complete plan with metadata", plan.name)
        return False
    key = meta["key"] if isinstance(meta.get("key"), dict) else {}
    if differs := [f for f in KEY_FIELDS if key.get(f) != expected_key[f]]:
        log.info("%s was built for a different %s", plan.name, ", ".join(differs))
        return False
    if plan.stat().st_size != meta.get("plan_bytes") or sha256_file(plan) != meta.get("plan_sha256"):
        log.info("%s is not the plan its metadata describes", plan.name)
        return False
    return True


def detect_precision(onnx_path: str | os.PathLike) -> str:
    """int8-qdq if the graph has Q/DQ nodes, fp16 if it has float16 tensors, else fp32."""
    try:
        import onnx
    except ImportError:
        raise TrtBuildError("the onnx package is needed to check the ONNX's precision") from None
    g = onnx.load(str(onnx_path), load_external_data=False).graph
    if {n.op_type for n in g.node} & {"QuantizeLinear", "DequantizeLinear"}:
        return "int8-qdq"
    f16 = onnx.TensorProto.FLOAT16
    if (any(t.data_type == f16 for t in g.initializer)
            or any(v.type.tensor_type.elem_type == f16 for v in (*g.input, *g.output, *g.value_info))
            or any(a.name == "to" and a.i == f16 for n in g.node if n.op_type == "Cast" for a in n.attribute)):
        return "fp16"
    return "fp32"


_LOGGER = None  # one per process: TensorRT keeps the first logger it is given as its global one


def _trt_logger(trt):
    global _LOGGER
    if _LOGGER is None:
        sev = trt.ILogger.Severity
        levels = {sev.INTERNAL_ERROR: logging.ERROR, sev.ERROR: logging.ERROR, sev.WARNING: logging.WARNING,
                  sev.INFO: logging.DEBUG}

        class _Logger(trt.ILogger):
            errors: list[str] = []

            def log(self, severity, msg):
                if levels.get(severity) == logging.ERROR:
                    self.errors.append(" ".join(str(msg).split()))
                if severity in levels:
                    log.log(levels[severity], "tensorrt: %s", msg)

        _LOGGER = _Logger()
    return _LOGGER


def _set_timing_cache(config, path: Path | None) -> None:
    blob = path.read_bytes() if path is not None and path.is_file() else b""
    try:
        cache = config.create_timing_cache(blob)
    except Exception as e:  # a truncated or foreign cache must cost a slower build, not a failed one
        log.warning("timing cache %s unreadable (%s)", path, e)
        cache = None
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        if blob:
            log.warning("timing cache %s is from another GPU or TensorRT version; starting empty", path)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def _build_plan(trt, onnx_path: Path, settings: TrtBuildSettings, timing_cache: Path | None):
    logger = _trt_logger(trt)
    logger.errors.clear()
    try:
        builder = trt.Builder(logger)
    except Exception as e:  # pybind raises when the factory returns null, e.g. CUDA failed to start
        raise TensorRTUnavailableError(" ".join(f"TensorRT could not create a builder: {e}".split())) from None
    # Needed on 10.x to keep the ONNX's own types (Q/DQ, fp16); accepted and ignored by 11.x.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the file, so external weights resolve
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        raise OnnxParseError(onnx_path, [" ".join(f"node {e.node()} ({e.node_name()}, {e.node_operator()}): "
                                                  f"{e.desc()}".split()) for e in errors] or logger.errors or ["?"])
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    if fixed := [t.name for t in inputs if tuple(t.shape)[:1] != (-1,)]:
        raise TrtBuildError(f"inputs {', '.join(fixed)} have a fixed batch axis; export a dynamic one")
    profiles = optimization_profiles(settings, [t.name for t in inputs], {t.name: tuple(t.shape)[1:] for t in inputs})
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_gib * (1 << 30)))
    config.builder_optimization_level = settings.builder_optimization_level
    if settings.sparse_weights:  # kernels for 2:4-structured weights; other weights are unaffected
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    for p in profiles:
        profile = builder.create_optimization_profile()
        for name, r in p.items():
            profile.set_shape(name, r.min, r.opt, r.max)
        config.add_optimization_profile(profile)
    _set_timing_cache(config, timing_cache)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TrtBuildError(f"TensorRT failed to build {onnx_path.name}: " + ("; ".join(logger.errors) or "see the log"))
    if timing_cache is not None:
        try:  # losing the cache costs the next build time; losing the plan for it would cost this one
            timing_cache.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(timing_cache, bytes(config.get_timing_cache().serialize()))
        except OSError as e:
            log.warning("could not save timing cache %s: %s", timing_cache, e)
    return bytes(plan), profiles


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _publish(plan_path: Path, plan: bytes, meta: dict[str, Any]) -> None:
    """Plan first, metadata last: a plan without its metadata is never reused."""
    meta = dict(meta, plan_bytes=len(plan), plan_sha256=hashlib.sha256(plan).hexdigest())
    metadata_path(plan_path).unlink(missing_ok=True)  # stale metadata must not vouch for a new plan
    _atomic_write(plan_path, plan)
    _atomic_write(metadata_path(plan_path), (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())


def same_tensorrt_release(a: str, b: str) -> bool:
    """Equal on every version component both name (a library's build number may be unknown)."""
    pa, pb = a.split("."), b.split(".")
    n = min(len(pa), len(pb))
    return n >= 3 and pa[:n] == pb[:n]


def build_engine(onnx_path: str | os.PathLike, out_dir: str | os.PathLike, settings: TrtBuildSettings,
                 timing_cache: str | os.PathLike | None = None, *, force: bool = False,
                 target: BuildTarget | None = None) -> Path:
    """Build the plan for `onnx_path` into `out_dir` (or reuse a matching one); returns its path.

    `target`: the node as the *loader* sees it (deploy.engines.server_target: Triton's libnvinfer
    version), keyed instead of what this process probes; it must be the same TensorRT release as the
    bindings that build, or the plan would not load where it is served."""
    onnx_path, out = Path(onnx_path), Path(out_dir)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {onnx_path}")
    if (detected := detect_precision(onnx_path)) != settings.precision:
        raise SettingsError("precision", f"{settings.precision!r} does not match {onnx_path.name}, which is {detected}")
    probed, trt = probe_target(), _import_tensorrt()
    target = target or probed
    if not same_tensorrt_release(probed.tensorrt_version, target.tensorrt_version):
        raise TrtBuildError(f"this process builds with TensorRT {probed.tensorrt_version} but the plan is for "
                            f"TensorRT {target.tensorrt_version}; it would not load there")
    onnx_sha = sha256_file(onnx_path)
    plan_path, key = out / engine_name(settings, onnx_sha, onnx_path.stem), engine_cache_key(settings, onnx_sha, target)
    if not force and engine_is_reusable(plan_path, key):
        log.info("engine up to date: %s", plan_path)
        return plan_path
    log.info("building %s on %s (TensorRT %s)", plan_path.name, target.gpu_name, target.tensorrt_version)
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    plan, profiles = _build_plan(trt, onnx_path, settings, Path(timing_cache) if timing_cache else None)
    _publish(plan_path, plan, {
        "engine": plan_path.name, "key": key, "cuda_driver": target.cuda_driver, "onnx": str(onnx_path),
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(time.monotonic() - started, 1), "settings": dataclasses.asdict(settings),
        "profiles": [{n: dataclasses.asdict(r) for n, r in p.items()} for p in profiles]})
    log.info("engine written: %s (%.1f MB)", plan_path, len(plan) / 1e6)
    return plan_path


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage block; still exit 2
        sys.stderr.write(f"error: {message}\n")
        sys.exit(2)


def _positive(kind):
    def parse(text: str):
        if (value := kind(text)) <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


_FLAGS = {"precision": "--precision", "profile_strategy": "--profiles", "min_batch": "--min-batch",
          "opt_batch": "--opt-batch", "max_batch": "--max-batch", "seq_buckets": "--seq-buckets",
          "opt_sequence": "--opt-seq", "workspace_gib": "--workspace-gib", "builder_optimization_level": "--opt-level"}


def main(argv: Sequence[str] | None = None) -> int:
    d = TrtBuildSettings()
    p = _Parser(prog="python -m conversion.build_trt_engine", description=__doc__.split("\n")[0])
    p.add_argument("--onnx", type=Path, required=True, help="QDQ, fp16 or fp32 ONNX")
    p.add_argument("--out", type=Path, required=True, help="folder for <name>.plan and <name>.json")
    p.add_argument("--precision", choices=PRECISIONS, help="default: detected from the ONNX; must match it")
    p.add_argument("--min-batch", type=_positive(int), default=d.min_batch)
    p.add_argument("--opt-batch", type=_positive(int), help=f"default: {d.opt_batch}, clamped to the batch range")
    p.add_argument("--max-batch", type=_positive(int), default=d.max_batch)
    p.add_argument("--seq-buckets", type=lambda s: tuple(_positive(int)(x) for x in s.split(",")),
                   default=d.seq_buckets, help="comma-separated, increasing (default: spec.SEQ_BUCKETS)")
    p.add_argument("--opt-seq", type=_positive(int), help="default: the smallest bucket")
    p.add_argument("--profiles", choices=PROFILE_STRATEGIES, default=d.profile_strategy)
    p.add_argument("--sparse", action="store_true", help="BuilderFlag.SPARSE_WEIGHTS (2:4-sparse weights)")
    p.add_argument("--workspace-gib", type=_positive(float), default=d.workspace_gib)
    p.add_argument("--opt-level", type=int, default=d.builder_optimization_level, help="0..5")
    p.add_argument("--timing-cache", type=Path, help="loaded if present, saved after the build")
    p.add_argument("--force", action="store_true", help="rebuild even if a matching plan exists")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not a.onnx.is_file():
        p.error(f"argument --onnx: file not found: {a.onnx}")
    try:
        settings = TrtBuildSettings(
            precision=a.precision or detect_precision(a.onnx), min_batch=a.min_batch, max_batch=a.max_batch,
            opt_batch=a.opt_batch if a.opt_batch is not None else max(a.min_batch, min(d.opt_batch, a.max_batch)),
            seq_buckets=a.seq_buckets, opt_sequence=a.opt_seq, profile_strategy=a.profiles,
            sparse_weights=a.sparse, workspace_gib=a.workspace_gib, builder_optimization_level=a.opt_level)
        print(build_engine(a.onnx, a.out, settings, a.timing_cache, force=a.force))
    except SettingsError as e:
        p.error(f"argument {_FLAGS.get(e.field, e.field)}: {e.detail}")
    except TensorRTUnavailableError as e:
        sys.stderr.write(f"error: TensorRT not available: {e}\n")
        return 2
    except TrtBuildError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
