"""The repository the image would serve, rendered from the staged bundle by the entrypoint's own
code, matches the pipeline spec: every model and ensemble, their configs, and the ONNX/catalog
shapes behind them. Engines never travel in the bundle."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from deploy.bundle import Bundle
from deploy.entrypoint import EntrypointSettings, prepare_repository
from model_repository import runtime, spec
from model_repository.render import CONFIG, TRT_PLAN, config_for, ensemble_config, read_config, \
    render_gpu_repository, tensorrt_config

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def pipeline(ci_bundle) -> spec.PipelineSpec:
    return spec.build_spec(ci_bundle.embedding_dim)


@pytest.fixture(scope="module")
def cpu_repository(ci_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("image-repo") / "model_repository"
    return prepare_repository(EntrypointSettings(bundle=ci_bundle.root, repository=out, target="cpu"), None)


def test_bundle_loads_and_carries_no_engines(ci_bundle):
    again = Bundle.load(ci_bundle.root)
    assert again == ci_bundle
    assert not list(ci_bundle.root.rglob("*.plan")) and not list(ci_bundle.root.rglob("*.engine"))
    assert ci_bundle.gpu_precision in ("int8-qdq", "fp16", "fp32")


def test_cpu_repository_holds_exactly_the_spec(cpu_repository, pipeline):
    folders = {p.name for p in cpu_repository.iterdir() if p.is_dir()}
    assert folders == {m.name for m in pipeline.models} | {e.name for e in pipeline.ensembles}
    for m in pipeline.models:
        assert read_config(cpu_repository / m.name / CONFIG) == config_for(pipeline, m), m.name
    for e in pipeline.ensembles:
        assert read_config(cpu_repository / e.name / CONFIG) == ensemble_config(e), e.name


def _onnx_inputs(path) -> dict[str, list]:
    g = onnx.load(str(path), load_external_data=False).graph
    return {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in g.input}


def test_served_files_match_the_spec_tensors(cpu_repository, pipeline):
    dim = pipeline.model(spec.QUERY_ENCODER).outputs[0].dims[0]
    inputs = _onnx_inputs(cpu_repository / spec.RANKER / "1" / runtime.RANKER_FILE)
    graph = {t.name: list(t.dims) for t in (spec.query_embedding(dim), spec.item_embedding(dim),
                                            spec.ITEM_FEATURES, spec.USER_FEATURES)}
    assert set(inputs) == set(graph)
    for name, dims in graph.items():  # per-candidate width (the graph's batch axis is the candidates)
        assert inputs[name][1:] == dims, name
    assert pipeline.model(spec.RANKER).tensor(spec.query_embedding(0).name).dims == (dim,)
    assert set(_onnx_inputs(cpu_repository / spec.QUERY_ENCODER / "1" / runtime.ENCODER_FILE)) == \
        {spec.INPUT_IDS.name, spec.ATTENTION_MASK.name}
    tables = runtime.CatalogTables.load(runtime.served_catalog_dir(cpu_repository))
    assert tables.item_features.shape[1] == len(spec.ITEM_FEATURE_COLUMNS)
    assert tables.user_features.shape[1] == len(spec.USER_FEATURE_COLUMNS)
    assert tables.embedding_dim == pipeline.model(spec.QUERY_ENCODER).outputs[0].dims[0]


def _gpu_pipeline(pipeline):
    return spec.build_spec(pipeline.model(spec.QUERY_ENCODER).outputs[0].dims[0], target=spec.GPU)


def test_gpu_onnx_has_the_encoder_contract(ci_bundle, pipeline):
    assert set(_onnx_inputs(ci_bundle.gpu_onnx)) == {t.name for t in _gpu_pipeline(pipeline).model(spec.QUERY_ENCODER).inputs}


def test_gpu_rendering_keeps_the_ranker_and_contract(ci_bundle, pipeline, cpu_repository, tmp_path):
    plan = tmp_path / "encoder.plan"
    plan.write_bytes(np.arange(16, dtype=np.uint8).tobytes())  # render places the file, it does not parse it
    gpu_pipeline = _gpu_pipeline(pipeline)
    gpu = render_gpu_repository(gpu_pipeline, ci_bundle.artifacts, tmp_path / "gpu", encoder_plan=plan)
    assert read_config(gpu / spec.QUERY_ENCODER / CONFIG) == tensorrt_config(gpu_pipeline.model(spec.QUERY_ENCODER))
    assert (gpu / spec.QUERY_ENCODER / "1" / TRT_PLAN).read_bytes() == plan.read_bytes()
    assert read_config(gpu / spec.RANKER / CONFIG) == read_config(cpu_repository / spec.RANKER / CONFIG)
    for e in pipeline.ensembles:  # same public inputs and outputs, whatever runs behind them
        cpu_cfg, gpu_cfg = read_config(cpu_repository / e.name / CONFIG), read_config(gpu / e.name / CONFIG)
        assert (list(cpu_cfg.input), list(cpu_cfg.output)) == (list(gpu_cfg.input), list(gpu_cfg.output)), e.name
