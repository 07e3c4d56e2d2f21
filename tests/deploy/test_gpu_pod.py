"""GPU pod sizing (issue 18, defect 6): CPU steps from the pod's CPUs, 2 plan instances, CUDA graphs for
batch-1 queries; checked on the repository the entrypoint renders, read back with Triton's own proto."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from conversion.build_trt_engine import TrtBuildSettings
from conversion.stages import REPO_ROOT
from deploy import engines, entrypoint, gpu_pod
from model_repository import spec
from model_repository.render import CONFIG, read_config

sys.path.insert(0, str(Path(__file__).parent))
from standin_builder import A10G, FakeBuilder  # noqa: E402

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("cpus, expected", [
    (1, (1, 1)), (2, (1, 1)), (4, (1, 1)), (8, (2, 3)), (16, (4, 6)), (32, (8, 12))])
def test_cpu_steps_follow_the_pods_cpus(cpus, expected):
    s = gpu_pod.size_for_cpus(cpus)
    assert (s.tokenizer_instances, s.ranker_instances) == expected
    assert s.ranker_threads == 2 and s.plan_instances == 2 and s.cuda_graphs
    if cpus >= 8:  # never more than the pod has, give or take the one core rounding may add
        assert 1 + s.tokenizer_instances + 2 * s.ranker_instances <= cpus + 1


def test_pod_cpus_come_from_the_downward_api_value():
    assert gpu_pod.pod_cpus({gpu_pod.CPUS_ENV: "8"}) == 8
    assert gpu_pod.pod_cpus({}) >= 1
    with pytest.raises(ValueError):
        gpu_pod.pod_cpus({gpu_pod.CPUS_ENV: "0"})


@pytest.fixture()
def gpu_repository(ci_bundle, tmp_path, monkeypatch):
    """The entrypoint's GPU rendering for a 16-CPU pod, with the stand-in builder's plan."""
    def ensure(onnx, cache, settings, target):
        return engines.ensure_engine(onnx, cache, settings, target, build=FakeBuilder(), deserializes=lambda p: True)

    monkeypatch.setattr(entrypoint, "ensure_engine", ensure)
    settings = entrypoint.EntrypointSettings(bundle=ci_bundle.root, repository=tmp_path / "repo",
                                             engine_cache=tmp_path / "engines", cpus=16)
    repo = entrypoint.prepare_repository(settings, A10G)
    return {p.parent.name: read_config(p) for p in repo.glob(f"*/{CONFIG}")}


def test_rendered_gpu_repository_is_sized(gpu_repository):
    cfg = gpu_repository
    counts = {name: sum(g.count for g in c.instance_group) for name, c in cfg.items() if c.platform != "ensemble"}
    assert counts == {spec.TOKENIZER: 4, spec.RANKER: 6, spec.QUERY_ENCODER: 2}
    assert cfg[spec.RANKER].parameters["intra_op_num_threads"].string_value == "2"


def test_plan_has_two_instances_and_cuda_graphs_for_batch_1_queries(gpu_repository):
    enc = gpu_repository[spec.QUERY_ENCODER]
    assert enc.platform == "tensorrt_plan"
    (group,) = enc.instance_group
    assert group.count == 2 and group.kind == group.KIND_GPU
    assert enc.optimization.cuda.graphs
    graphs = [(g.batch_size, {k: list(v.dim) for k, v in g.input.items()}) for g in enc.optimization.cuda.graph_spec]
    inputs = {t.name for t in enc.input}
    assert graphs == [(1, {n: [w] for n in inputs}) for w in gpu_pod.QUERY_BUCKETS]
    assert all(w in spec.SEQ_BUCKETS for w in gpu_pod.QUERY_BUCKETS), "a graph for a shape the tokenizer never sends"
    # the plan's profile covers those shapes
    s = TrtBuildSettings()
    assert all(s.min_batch <= 1 and s.seq_buckets[0] <= w <= s.seq_buckets[-1] for w in gpu_pod.QUERY_BUCKETS)


def test_cuda_graphs_can_be_switched_off(ci_bundle, tmp_path):
    from model_repository.render import render_repository

    plan = tmp_path / "x.plan"
    plan.write_bytes(b"plan")
    pipeline = spec.build_spec(ci_bundle.embedding_dim, target=spec.GPU)
    repo = render_repository(pipeline, ci_bundle.artifacts, tmp_path / "repo", encoder_plan=plan)
    path = gpu_pod.tune_plan_config(repo, gpu_pod.size_for_cpus(4, plan_instances=3, cuda_graphs=False))
    cfg = read_config(path)
    assert not cfg.optimization.cuda.graphs and not cfg.optimization.cuda.graph_spec
    assert cfg.instance_group[0].count == 3


def test_cpu_rendering_is_not_resized(ci_bundle, tmp_path):
    settings = entrypoint.EntrypointSettings(bundle=ci_bundle.root, repository=tmp_path / "repo", cpus=32)
    repo = entrypoint.prepare_repository(settings, None)
    counts = {p.parent.name: read_config(p).instance_group[0].count
              for p in repo.glob(f"*/{CONFIG}") if read_config(p).platform != "ensemble"}
    # the spec's tuned counts, whatever the pod's 32 CPUs
    assert counts == {spec.QUERY_ENCODER: spec.CPU_ENCODER_INSTANCES, spec.RANKER: spec.CPU_RANKER_INSTANCES}, counts


def test_gpu_extra_pins_the_images_tensorrt():
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    (pinned,) = re.findall(r'^gpu = \["tensorrt-cu12==([\d.]+)"\]$', pyproject, flags=re.M)
    (image,) = re.findall(r"^ARG TENSORRT_VERSION=([\d.]+)$", (REPO_ROOT / "deploy/docker/Dockerfile").read_text(),
                          flags=re.M)
    assert pinned == image
