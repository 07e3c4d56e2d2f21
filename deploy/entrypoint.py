"""Container entrypoint: choose CPU or GPU, build or reuse the TensorRT plan on a GPU node, render
the model repository for that target, then exec tritonserver with production flags.

The same command serves the CPU rendering on a machine without a GPU, which is how its logic is
tested with the real server (tests/deploy). exec, not a child process: tritonserver becomes the
container's main process, so Kubernetes' SIGTERM reaches it directly and starts its drain
(--exit-timeout-secs) without a supervisor in between.

Before that, this Python process is PID 1, and the kernel drops signals that PID 1 has no handler
for: a SIGTERM during a minutes-long engine build would be ignored until the kubelet's SIGKILL. So
the handler is the first thing main() installs; it removes the build's partial files and exits.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from conversion.build_trt_engine import BuildTarget, SettingsError, TensorRTUnavailableError, TrtBuildError, \
    TrtBuildSettings, probe_target
from deploy import engines, gpu_pod
from deploy.bundle import Bundle
from deploy.cli import OneLineParser
from deploy.engines import TensorRTVersionMismatchError, ensure_engine
from model_repository import spec
from model_repository.render import render_repository
from model_repository.triton_server import TritonPorts, TritonSettings, prepare_backends, server_command, server_env

log = logging.getLogger(__name__)

TARGETS = ("auto", "cpu", "gpu")
# Where the official Triton container installs the server; its backends sit beside bin/.
NGC_TRITONSERVER = Path("/opt/tritonserver/bin/tritonserver")
SOURCE_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class EntrypointSettings:
    bundle: Path = Path("/opt/searchrank/bundle")
    repository: Path = Path("/var/run/searchrank/model_repository")
    engine_cache: Path = Path("/var/cache/searchrank/engines")
    target: str = "auto"
    # All interfaces: in a pod the kubelet's probes and the Services reach the container's IP.
    host: str = "0.0.0.0"
    ports: TritonPorts = field(default_factory=TritonPorts)
    exit_timeout_s: int = 30
    ort_threads: int = spec.DEFAULT_ORT_THREADS
    tritonserver: Path | None = None
    log_verbose: int = 0
    cpus: int | None = None  # GPU pods: the pod's CPUs (None: gpu_pod.pod_cpus())
    plan_instances: int = 2
    cuda_graphs: bool = True


def install_sigterm_handler() -> None:
    """SIGTERM/SIGINT end the start-up at once: partial engine files removed, exit 128 + signal.

    exec() resets handled signals to their defaults, so tritonserver installs its own drain."""
    def stop(signum, _frame):
        removed = engines.interrupt_cleanup()
        sys.stderr.write(f"{signal.Signals(signum).name} during start-up; stopping "
                         f"(removed {len(removed)} partial engine file(s))\n")
        sys.stderr.flush()
        os._exit(128 + signum)  # not sys.exit: the build thread must not keep the process alive

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)


def choose_target(requested: str) -> tuple[str, BuildTarget | None]:
    """('gpu', the node's GPU and TensorRT) or ('cpu', None). `gpu` fails where `auto` falls back."""
    if requested == "cpu":
        return "cpu", None
    try:
        target = probe_target()
    except TensorRTUnavailableError as e:
        if requested == "gpu":
            raise
        log.info("no usable GPU/TensorRT (%s); serving the CPU repository", e)
        return "cpu", None
    # Keyed on the TensorRT that Triton loads plans with; a wheel of another release fails here, also
    # under `auto`: that is a broken image, not a machine without a GPU.
    target = engines.server_target(target)
    log.info("GPU %s (compute %s), TensorRT %s", target.gpu_name, target.compute_capability, target.tensorrt_version)
    return "gpu", target


def engine_settings(bundle: Bundle, pipeline: spec.PipelineSpec) -> TrtBuildSettings:
    # The plan's batch range must cover what Triton may send: the encoder's max_batch_size.
    max_batch = pipeline.model(spec.QUERY_ENCODER).max_batch_size
    d = TrtBuildSettings()
    return TrtBuildSettings(precision=bundle.gpu_precision, max_batch=max_batch,
                            opt_batch=min(d.opt_batch, max_batch), seq_buckets=spec.SEQ_BUCKETS)


def prepare_repository(settings: EntrypointSettings, target: BuildTarget | None) -> Path:
    """Render the repository for this node (building the plan first on a GPU node)."""
    bundle = Bundle.load(settings.bundle)
    if target is None:
        pipeline = spec.build_spec(bundle.embedding_dim, ort_threads=settings.ort_threads)
        return render_repository(pipeline, bundle.artifacts, settings.repository)
    pipeline = spec.build_spec(bundle.embedding_dim, target=spec.GPU, ort_threads=settings.ort_threads)
    sizing = gpu_sizing(settings)
    pipeline = gpu_pod.apply_to_spec(pipeline, sizing)
    plan = ensure_engine(bundle.gpu_onnx, settings.engine_cache, engine_settings(bundle, pipeline), target)
    repository = render_repository(pipeline, bundle.artifacts, settings.repository, encoder_plan=plan)
    gpu_pod.tune_plan_config(repository, sizing)
    return repository


def gpu_sizing(settings: EntrypointSettings) -> gpu_pod.GpuPodSizing:
    cpus = settings.cpus if settings.cpus is not None else gpu_pod.pod_cpus()
    sizing = gpu_pod.size_for_cpus(cpus, settings.plan_instances, settings.cuda_graphs)
    log.info("GPU pod sizing for %d CPUs: %s", cpus, sizing)
    return sizing


def server_invocation(settings: EntrypointSettings, repository: Path, gpu: bool) -> tuple[list[str], dict[str, str]]:
    """tritonserver's argv and environment: the container's server if present, else the wheel's."""
    binary = settings.tritonserver or (NGC_TRITONSERVER if NGC_TRITONSERVER.is_file() else None)
    triton = TritonSettings(repository=repository, host=settings.host, ports=settings.ports,
                            log_verbose=settings.log_verbose, exit_timeout_s=settings.exit_timeout_s,
                            gpu_metrics=gpu, binary=binary)
    if binary is None:
        return server_command(triton, prepare_backends()), server_env()
    env = dict(os.environ)
    # The python-backend models import model_repository.backends from the bundle's source tree.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SOURCE_ROOT), env.get("PYTHONPATH")]))
    return server_command(triton, Path(binary).resolve().parent.parent / "backends"), env


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 1..65535, got {value}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive(text: str) -> int:
    if (value := _non_negative(text)) == 0:
        raise argparse.ArgumentTypeError("must be >= 1, got 0")
    return value


def parse_args(argv: list[str] | None) -> tuple[EntrypointSettings, bool]:
    d, dp = EntrypointSettings(), TritonPorts()
    p = OneLineParser(prog="python -m deploy.entrypoint", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=Path(os.environ.get("SEARCHRANK_BUNDLE", d.bundle)),
                   help=f"model bundle (python -m deploy.bundle); default $SEARCHRANK_BUNDLE or {d.bundle}")
    p.add_argument("--repository", type=Path, default=d.repository, help="where to render (a writable volume)")
    p.add_argument("--engine-cache", type=Path, default=d.engine_cache,
                   help="TensorRT plans, one folder per GPU model/compute capability/TensorRT version")
    p.add_argument("--target", choices=TARGETS, default=d.target,
                   help="auto: GPU when TensorRT and a GPU are usable, else CPU; gpu: fail without them")
    p.add_argument("--host", default=d.host, help="address Triton binds (default all interfaces)")
    p.add_argument("--http-port", type=_port, default=dp.http)
    p.add_argument("--grpc-port", type=_port, default=dp.grpc)
    p.add_argument("--metrics-port", type=_port, default=dp.metrics)
    p.add_argument("--exit-timeout-secs", type=_non_negative, default=d.exit_timeout_s,
                   help="how long Triton drains in-flight requests after SIGTERM")
    p.add_argument("--ort-threads", type=_positive, default=d.ort_threads, help="ONNX Runtime threads per instance")
    p.add_argument("--tritonserver", type=Path, help=f"server binary (default {NGC_TRITONSERVER} if present, "
                                                      "else the nvidia-pytriton wheel's)")
    p.add_argument("--log-verbose", type=_non_negative, default=d.log_verbose)
    p.add_argument("--cpus", type=_positive, default=None,
                   help=f"GPU target: the pod's CPUs to size the CPU steps for (default ${gpu_pod.CPUS_ENV}, "
                        "else this process's CPU set)")
    p.add_argument("--plan-instances", type=_positive, default=d.plan_instances,
                   help="GPU target: instances of the query encoder's TensorRT plan")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=d.cuda_graphs,
                   help="GPU target: CUDA graphs for batch-1 queries")
    p.add_argument("--print-command", action="store_true",
                   help="prepare the repository, print the tritonserver command line, do not start it")
    a = p.parse_args(argv)
    if len({a.http_port, a.grpc_port, a.metrics_port}) < 3:
        p.error("--http-port, --grpc-port and --metrics-port must differ")
    if a.tritonserver is not None and not a.tritonserver.is_file():
        p.error(f"argument --tritonserver: not a file: {a.tritonserver}")
    return EntrypointSettings(
        bundle=a.bundle, repository=a.repository, engine_cache=a.engine_cache, target=a.target, host=a.host,
        ports=TritonPorts(http=a.http_port, grpc=a.grpc_port, metrics=a.metrics_port),
        exit_timeout_s=a.exit_timeout_secs, ort_threads=a.ort_threads, tritonserver=a.tritonserver,
        log_verbose=a.log_verbose, cpus=a.cpus, plan_instances=a.plan_instances, cuda_graphs=a.cuda_graphs), \
        a.print_command


def main(argv: list[str] | None = None) -> int:
    install_sigterm_handler()  # first: as PID 1 without it, SIGTERM is dropped for the whole start-up
    settings, print_only = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        kind, target = choose_target(settings.target)
        repository = prepare_repository(settings, target)
        argv_, env = server_invocation(settings, repository, gpu=kind == "gpu")
    except TensorRTVersionMismatchError as e:
        sys.stderr.write(f"error: TensorRT version mismatch: {e}\n")
        return 2
    except TensorRTUnavailableError as e:
        sys.stderr.write(f"error: --target gpu but TensorRT/GPU not usable: {e}\n")
        return 2
    except FileNotFoundError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    except SettingsError as e:  # e.g. the bundle's precision label does not match its ONNX
        sys.stderr.write(f"error: TensorRT engine settings: {e}\n")
        return 2
    except TrtBuildError as e:
        sys.stderr.write(f"error: TensorRT engine: {e}\n")
        return 1
    if print_only:
        print(" ".join(argv_))
        return 0
    log.info("exec %s (%s target, repository %s)", argv_[0], kind, repository)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv_[0], argv_, env)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
