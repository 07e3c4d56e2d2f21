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
from model_repository.render import CONFIG, TRT_PLAN, ensemble_config, model_config, read_config, \
    render_gpu_repository, tensorrt_config, text_label

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
        extra = {"text_label": text_label(pipeline)} if m.name == spec.TOKENIZER else None
        assert read_config(cpu_repository / m.name / CONFIG) == model_config(m, extra), m.name
    for e in pipeline.ensembles:
        assert read_config(cpu_repository / e.name / CONFIG) == ensemble_config(e), e.name


def _onnx_inputs(path) -> dict[str, list]:
    g = onnx.load(str(path), load_external_data=False).graph
    return {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in g.input}


def test_served_files_match_the_spec_tensors(cpu_repository, pipeline):
    ranker = pipeline.model(spec.CTR_RANKER)
    inputs = _onnx_inputs(cpu_repository / spec.CTR_RANKER / "1" / runtime.RANKER_FILE)
    assert set(inputs) == {t.name for t in ranker.inputs}
    for t in ranker.inputs:  # per-candidate width (the batch axis is the candidates)
        assert inputs[t.name][1:] == list(t.dims), t.name
    encoder = pipeline.model(spec.QUERY_ENCODER)
    assert set(_onnx_inputs(cpu_repository / spec.QUERY_ENCODER / "1" / runtime.ENCODER_FILE)) == \
        {t.name for t in encoder.inputs}
    tables = runtime.CatalogTables.load(runtime.served_catalog_dir(cpu_repository))
    assert tables.item_features.shape[1] == len(spec.ITEM_FEATURE_COLUMNS)
    assert tables.user_features.shape[1] == len(spec.USER_FEATURE_COLUMNS)
    assert tables.embedding_dim == pipeline.model(spec.QUERY_ENCODER).outputs[0].dims[0]


def test_gpu_onnx_has_the_encoder_contract(ci_bundle, pipeline):
    assert set(_onnx_inputs(ci_bundle.gpu_onnx)) == {t.name for t in pipeline.model(spec.QUERY_ENCODER).inputs}


def test_gpu_rendering_swaps_only_the_encoder(ci_bundle, pipeline, cpu_repository, tmp_path):
    plan = tmp_path / "encoder.plan"
    plan.write_bytes(np.arange(16, dtype=np.uint8).tobytes())  # render places the file, it does not parse it
    gpu = render_gpu_repository(pipeline, ci_bundle.artifacts, tmp_path / "gpu", encoder_plan=plan)
    assert read_config(gpu / spec.QUERY_ENCODER / CONFIG) == tensorrt_config(pipeline.model(spec.QUERY_ENCODER))
    assert (gpu / spec.QUERY_ENCODER / "1" / TRT_PLAN).read_bytes() == plan.read_bytes()
    for name in [m.name for m in pipeline.models if m.name != spec.QUERY_ENCODER] + [e.name for e in pipeline.ensembles]:
        assert read_config(gpu / name / CONFIG) == read_config(cpu_repository / name / CONFIG), name
