"""Shared fixtures: the CI-profile models (built once, cached by settings hash under build/),
a repository rendered from them, and the real tritonserver serving it.

Server tests never skip: if Triton cannot start, they fail with its log tail.
"""
from __future__ import annotations

import logging

import pytest

from conversion.build_models import build, profile_settings
from conversion.export_encoder import read_embedding_dim
from model_repository import spec
from model_repository.render import Artifacts, render_cpu_repository
from model_repository.triton_server import TritonStartError, run_triton_server

logging.getLogger("conversion").setLevel(logging.INFO)

CI_PROFILE = "ci"


@pytest.fixture(scope="session")
def ci_models() -> dict:
    """Folders of every stage for the CI profile (built on first use, then cached)."""
    return build(profile_settings(CI_PROFILE))


@pytest.fixture(scope="session")
def ci_pipeline(ci_models) -> spec.PipelineSpec:
    return spec.build_spec(read_embedding_dim(ci_models["encoder"]))


@pytest.fixture(scope="session")
def ci_repository(ci_models, ci_pipeline, tmp_path_factory):
    artifacts = Artifacts(encoder_dir=ci_models["encoder"], catalog_dir=ci_models["catalog_artifact"],
                          ranker_dir=ci_models["ranker"])
    return render_cpu_repository(ci_pipeline, artifacts, tmp_path_factory.mktemp("triton") / "model_repository")


@pytest.fixture(scope="session")
def triton(ci_repository):
    try:
        with run_triton_server(ci_repository) as server:
            yield server
    except TritonStartError as e:
        pytest.fail(f"tritonserver could not start: {e}", pytrace=False)


@pytest.fixture(scope="session")
def onnx_encoder(ci_models):
    """The served encoder file run by ONNX Runtime outside Triton, one unpadded text at a time:
    the reference a served embedding is compared with."""
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    from conversion.export_encoder import ENCODER_ONNX, TOKENIZER_JSON

    session = ort.InferenceSession(str(ci_models["encoder"] / ENCODER_ONNX), providers=["CPUExecutionProvider"])
    tok = Tokenizer.from_file(str(ci_models["encoder"] / TOKENIZER_JSON))

    def embed(text: str) -> np.ndarray:
        ids = np.array([tok.encode(text).ids], dtype=np.int64)
        return session.run(None, {spec.INPUT_IDS.name: ids, spec.ATTENTION_MASK.name: np.ones_like(ids)})[0][0]

    return embed


@pytest.fixture()
def search_client(triton):
    from search_rank_client import SearchClient

    with SearchClient(triton.grpc_url, timeout_s=30.0) as c:
        yield c


def pytest_collection_modifyitems(config, items):
    # CI must exercise the real server; a selection that silently drops those tests is an error.
    import os

    if os.environ.get("CI") and not any(item.get_closest_marker("server") for item in items):
        raise pytest.UsageError("CI=true but no server-marked test was collected; the suite must run them")
