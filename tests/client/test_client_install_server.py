"""The client as a backend service gets it: the wheel alone in a fresh venv of Python 3.9 and 3.13,
no server code or heavy runtime beside it, blocking and asyncio calls against the real server."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from search_rank_client import SearchClient
from client_install import build_wheel, client_venv, find_python

PROBE = Path(__file__).with_name("client_probe.py")
# The oldest and newest Pythons a service runs; both are installed on these machines (pyenv).
PYTHONS = ("3.9", "3.13")


@pytest.fixture(scope="module")
def client_wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("dist"))


@pytest.mark.server
@pytest.mark.parametrize("version", PYTHONS)
def test_wheel_alone_calls_the_real_server_blocking_and_asyncio(version, client_wheel, triton, ci_models):
    python = find_python(version)
    if python is None:
        if os.environ.get("CI"):
            pytest.fail(f"Python {version} not found on this machine; CI must test it", pytrace=False)
        pytest.skip(f"Python {version} is not installed here")
    venv_python = client_venv(python, client_wheel)
    ids = [int(i) for i in np.load(ci_models["catalog_artifact"] / "item_ids.npy")[:50]]
    result = subprocess.run([str(venv_python), "-I", str(PROBE), triton.grpc_url, json.dumps(ids)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout)
    assert got["python"].startswith(version + ".")
    assert all(got["absent"].values()), {k: v for k, v in got["absent"].items() if not v}

    # The reference: the same calls from this venv's client (Python 3.11, numpy 1.26) on the same server.
    with SearchClient(triton.grpc_url, timeout_s=30.0) as c:
        ref_rank = c.rank("waterproof hiking boots", 3, ids, top_k=5)
        ref_emb = c.embed("waterproof hiking boots")
    for flavour in ("blocking", "asyncio"):
        out = got[flavour]
        assert [i for i, _ in out["rank"]] == [r.item_id for r in ref_rank], flavour
        np.testing.assert_allclose([s for _, s in out["rank"]], [r.score for r in ref_rank], rtol=1e-6)
        emb = np.array(out["embed"])
        assert emb.shape == ref_emb.shape and abs(np.linalg.norm(emb) - 1.0) < 1e-4
        np.testing.assert_allclose(emb, ref_emb, atol=1e-6)
        assert out["invalid"] is not None, f"{flavour}: duplicate ids were not refused as InvalidRequest"
        assert out["invalid"]["code"] == "INVALID_ARGUMENT" and "CANDIDATE_IDS" in out["invalid"]["message"]
