"""The client and its CLI: argument handling without a server, and the CLI against the real one."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from search_rank_client import InvalidRequest, SearchClient, SearchError
from conversion.stages import REPO_ROOT
from model_repository.triton_server import free_port


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "search_rank_client", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.unit
def test_non_integer_candidates_rejected_before_sending():
    with SearchClient(f"127.0.0.1:{free_port()}") as c, pytest.raises(TypeError, match="integers"):
        c.rank("shoes", 1, [1.5, 2.0])


@pytest.mark.unit
def test_no_server_is_unavailable_within_deadline():
    with SearchClient(f"127.0.0.1:{free_port()}", timeout_s=0.5) as c:
        start = time.monotonic()
        with pytest.raises(SearchError) as err:
            c.rank("shoes", 1, [1, 2])
        assert err.value.code in {"UNAVAILABLE", "DEADLINE_EXCEEDED"}
        assert not isinstance(err.value, InvalidRequest)
        assert time.monotonic() - start < 5
        assert c.is_ready() is False


@pytest.mark.unit
def test_cli_rejects_malformed_candidates():
    result = _cli("rank", "shoes", "--user", "1", "--candidates", "1,x,3")
    assert result.returncode == 2
    assert "--candidates" in result.stderr and "1,x,3" in result.stderr


@pytest.mark.server
def test_cli_rank_embed_health_against_server(triton, ci_models):
    import numpy as np

    ids = np.load(ci_models["catalog_artifact"] / "item_ids.npy")[:20]
    result = _cli("--url", triton.grpc_url, "--timeout", "30", "rank", "red running shoes", "--user", "7",
                  "--candidates", ",".join(map(str, ids)), "--top-k", "3")
    assert result.returncode == 0, result.stderr
    rows = [line.split("\t") for line in result.stdout.strip().splitlines()]
    assert len(rows) == 3 and all(int(r[0]) in set(ids.tolist()) for r in rows)
    scores = [float(r[1]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert _cli("--url", triton.grpc_url, "health").returncode == 0
    emb = _cli("--url", triton.grpc_url, "--timeout", "30", "embed", "red running shoes")
    assert emb.returncode == 0 and len(emb.stdout.strip().strip("[]").split(",")) == 384


@pytest.mark.server
def test_cli_bad_request_is_one_line_and_non_zero(triton):
    result = _cli("--url", triton.grpc_url, "--timeout", "30", "rank", "shoes", "--user", "1", "--candidates", "4,4")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "INVALID_ARGUMENT" in lines[0] and "CANDIDATE_IDS" in lines[0]


@pytest.mark.server
def test_demo_ranks_sample_queries_and_stops(ci_repository):
    from model_repository.demo import SAMPLE_QUERIES

    result = subprocess.run([sys.executable, "-m", "model_repository.demo", "--repository", str(ci_repository),
                             "--candidates", "50", "--top-k", "3"], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    for query, _ in SAMPLE_QUERIES:
        at = next(i for i, line in enumerate(lines) if line.startswith(f'query "{query}"'))
        ranked = lines[at + 1:at + 4]
        assert [r.split(".")[0].strip() for r in ranked] == ["1", "2", "3"]
        scores = [float(r.split()[1]) for r in ranked]
        assert scores == sorted(scores, reverse=True)
        assert all("<cold start>" not in r and len(r.split()) >= 4 for r in ranked)  # titles are printed
    assert lines[-1] == "tritonserver stopped"
