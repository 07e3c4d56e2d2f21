"""The query encoder's embedding cache on the real server: a repeated text skips ONNX Runtime and
gets the embedding the model computes (the served ONNX file run by ONNX Runtime outside Triton),
a refused text is refused again, and the hits and misses show on Triton's metrics endpoint."""
from __future__ import annotations

import time
from pathlib import Path
import uuid

import numpy as np
import pytest

from search_rank_client import InvalidRequest, SearchClient
from loadtests.metrics import cache_lookups, fetch
from loadtests.overload import linked_copy
from model_repository import spec
from model_repository.triton_server import run_triton_server

pytestmark = pytest.mark.server


def with_encoder_parameters(repository, out, **params):
    def change(cfg) -> None:
        if cfg.name == spec.QUERY_ENCODER:
            for key, value in params.items():
                cfg.parameters[key].string_value = str(value)

    return linked_copy(repository, out, change)


@pytest.fixture(scope="module")
def counted(ci_repository, tmp_path_factory):
    """The CI repository with every lookup sent to the metrics endpoint at once."""
    repo = with_encoder_parameters(ci_repository, tmp_path_factory.mktemp("counted") / "repo", cache_metrics_every=1)
    with run_triton_server(repo) as server:
        yield server


def lookups(server) -> dict[str, float]:
    return cache_lookups(fetch(server.metrics_url, timeout_s=10), spec.QUERY_ENCODER)


def fresh_text() -> str:
    """A text no other test sends, so its first lookup misses in every instance."""
    return f"waterproof trail shoes {uuid.uuid4().hex[:8]}"


def test_repeats_are_hits_with_the_models_embedding(counted, onnx_encoder):
    text = fresh_text()
    before = lookups(counted)
    with SearchClient(counted.grpc_url) as client:
        answers = [client.embed(text) for _ in range(6)]
    after = lookups(counted)
    # each of the encoder's instances misses the text at most once; every other lookup hits
    misses, hits = after["miss"] - before["miss"], after["hit"] - before["hit"]
    assert 1 <= misses <= spec.CPU_ENCODER_INSTANCES and hits == 6 - misses, (misses, hits)
    for answer in answers:
        np.testing.assert_allclose(answer, onnx_encoder(text), atol=1e-5)


def test_search_rank_and_text_embed_share_the_cache(counted, onnx_encoder):
    query = fresh_text()
    with SearchClient(counted.grpc_url) as client:
        for _ in range(3):
            client.rank(query, 1, [1, 2, 3])
        before = lookups(counted)
        embedding = client.embed(query)
    after = lookups(counted)
    assert after["hit"] - before["hit"] + after["miss"] - before["miss"] == 1
    np.testing.assert_allclose(embedding, onnx_encoder(query), atol=1e-5)


def test_a_refused_text_is_refused_every_time(counted):
    # Triton's own response cache answered the second of these with an empty success
    with SearchClient(counted.grpc_url) as client:
        for _ in range(4):
            with pytest.raises(InvalidRequest, match="TEXT"):
                client.embed("   ")
            with pytest.raises(InvalidRequest, match="QUERY"):
                client.rank("", 1, [1, 2, 3])
        assert client.embed("tent").shape == (384,)


def test_a_zero_sized_cache_encodes_every_request(ci_repository, tmp_path, onnx_encoder):
    repo = with_encoder_parameters(ci_repository, tmp_path / "repo", cache_entries=0, cache_metrics_every=1)
    text = fresh_text()
    with run_triton_server(repo) as server, SearchClient(server.grpc_url) as client:
        answers = [client.embed(text) for _ in range(3)]
        time.sleep(0.1)
        counts = lookups(server)
    assert counts["hit"] == 0 and counts["miss"] >= 3
    for answer in answers:
        np.testing.assert_allclose(answer, onnx_encoder(text), atol=1e-5)


def test_the_encoder_honours_the_ort_rewrites_its_config_skips(ci_repository, tmp_path):
    """An operator can name ORT rewrites to skip (`ort_disabled_optimizers`, off by default:
    spec.CPU_ENCODER_DISABLED_OPTIMIZERS); the stub must build its session that way. The German
    text is one the CI encoder rounds differently without SkipLayerNormFusion (cosine about 0.996
    between the two evaluations), so it tells the two sessions apart."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    repo = with_encoder_parameters(ci_repository, tmp_path / "repo", ort_disabled_optimizers="SkipLayerNormFusion",
                                   cache_entries=0)
    folder = Path(ci_repository) / spec.QUERY_ENCODER / "1"
    session = ort.InferenceSession(str(folder / "encoder.onnx"), providers=["CPUExecutionProvider"],
                                   disabled_optimizers=["SkipLayerNormFusion"])
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    with run_triton_server(repo) as server, SearchClient(server.grpc_url) as client:
        for text in ["Laufschuhe für Damen – größe 40", "red running shoes"]:
            ids = np.array([tok.encode(text).ids], dtype=np.int64)
            expected = session.run(None, {spec.INPUT_IDS.name: ids, spec.ATTENTION_MASK.name: np.ones_like(ids)})[0][0]
            np.testing.assert_allclose(client.embed(text), expected, atol=1e-5)
