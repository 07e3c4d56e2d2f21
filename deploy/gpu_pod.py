"""Sizing of a GPU pod: the CPU steps from the pod's CPUs, the TensorRT plan's instances and CUDA graphs.

On a GPU node only the query encoder's graph moves to the GPU; the tokenizer and the ranker
(validation, catalog rows, scoring, top K) stay python-backend models on the pod's CPUs. The spec
(model_repository.spec) is tuned for the 2-core CPU target, so a GPU pod that requests more CPUs would leave them idle while its GPU
waits on one tokenizer and one ranker. Reasons for each number: docs/deploy.md ("Sizing a GPU pod").
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from model_repository import spec
from model_repository.render import CONFIG, read_config, write_config

log = logging.getLogger(__name__)

# The pod's CPU request, passed by the Kubernetes Downward API (deploy/k8s/overlays/gpu).
CPUS_ENV = "SEARCHRANK_CPUS"
# Intra-op threads per ranker instance: a 1000-row batch splits well over 2 threads, and more
# instances (not more threads) is what serves concurrent requests.
RANKER_THREADS = 2
# Buckets short search queries land in (spec.SEQ_BUCKETS): a query alone is batch 1 at one of these.
QUERY_BUCKETS = (8, 16)


@dataclass(frozen=True)
class GpuPodSizing:
    cpus: int
    tokenizer_instances: int
    ranker_instances: int
    ranker_threads: int = RANKER_THREADS
    # Two execution contexts on one GPU: one instance copies inputs / runs the python steps' handoff
    # while the other computes, so the GPU does not idle between batches.
    plan_instances: int = 2
    # CUDA graphs for batch-1 queries at QUERY_BUCKETS (docs/deploy.md has the reasoning).
    cuda_graphs: bool = True

    def __post_init__(self):
        for field in ("cpus", "tokenizer_instances", "ranker_instances", "ranker_threads",
                      "plan_instances"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")


def _share(cores: float) -> int:
    return max(1, int(cores + 0.5))  # round half up, at least one


def size_for_cpus(cpus: int, plan_instances: int = 2, cuda_graphs: bool = True) -> GpuPodSizing:
    """Split the pod's CPUs over the CPU steps.

    One core stays with tritonserver itself (gRPC/HTTP front ends, the ensemble scheduler, the plan
    instances' host threads). Of the rest, three quarters go to the ranker (catalog reads and ONNX
    Runtime, the heaviest CPU step at 1000 candidates) in instances of RANKER_THREADS threads, a
    quarter to the tokenizer (a single-threaded python stub, so one instance is one core)."""
    if cpus < 1:
        raise ValueError(f"cpus must be >= 1, got {cpus}")
    spare = max(cpus - 1, 1)
    return GpuPodSizing(cpus=cpus, tokenizer_instances=_share(spare / 4),
                        ranker_instances=_share(spare * 3 / 4 / RANKER_THREADS), plan_instances=plan_instances,
                        cuda_graphs=cuda_graphs)


def pod_cpus(environ: dict[str, str] | None = None) -> int:
    """The pod's CPUs: $SEARCHRANK_CPUS (the Downward API's requests.cpu), else this process's CPU set.

    A GPU pod has no CPU limit, so neither its cgroup quota nor its affinity mask says what it asked
    for; the affinity fallback is for `docker run` and tests."""
    environ = os.environ if environ is None else environ
    value = environ.get(CPUS_ENV, "").strip()
    if value:
        cpus = int(value)
        if cpus < 1:
            raise ValueError(f"{CPUS_ENV} must be >= 1, got {value!r}")
        return cpus
    return len(os.sched_getaffinity(0))


def apply_to_spec(pipeline: spec.PipelineSpec, sizing: GpuPodSizing) -> spec.PipelineSpec:
    """The CPU steps of `pipeline` with the sizing's instance counts and ranker threads."""
    counts = {spec.TOKENIZER: sizing.tokenizer_instances, spec.RANKER: sizing.ranker_instances,
              spec.QUERY_ENCODER: sizing.plan_instances}

    def sized(model: spec.Model) -> spec.Model:
        if model.name not in counts:
            return model
        params = dict(model.parameters)
        if model.name == spec.RANKER:
            params["intra_op_num_threads"] = str(sizing.ranker_threads)
        return dataclasses.replace(model, instance_count=counts[model.name], parameters=params)

    return dataclasses.replace(pipeline, models=tuple(sized(m) for m in pipeline.models))


def tune_plan_config(repository: Path, sizing: GpuPodSizing) -> Path:
    """Set the rendered query encoder's plan instances and CUDA graphs; returns its config path.

    Done on the rendered config (read back with Triton's proto) rather than in render.py, so the
    GPU pod's choices live with its sizing."""
    path = Path(repository) / spec.QUERY_ENCODER / CONFIG
    cfg = read_config(path)
    if cfg.platform != "tensorrt_plan":
        raise ValueError(f"{path} is not a TensorRT plan config (platform {cfg.platform!r})")
    for group in cfg.instance_group:
        group.count = sizing.plan_instances
    cfg.optimization.cuda.ClearField("graph_spec")
    cfg.optimization.cuda.graphs = sizing.cuda_graphs
    if sizing.cuda_graphs:
        inputs = [t.name for t in cfg.input]
        for width in QUERY_BUCKETS:
            graph = cfg.optimization.cuda.graph_spec.add(batch_size=1)
            for name in inputs:
                graph.input[name].dim.extend([width])
    write_config(cfg, path.parent)
    log.info("query encoder: %d plan instance(s), CUDA graphs %s", sizing.plan_instances,
             f"for batch 1 at {QUERY_BUCKETS}" if sizing.cuda_graphs else "off")
    return path
