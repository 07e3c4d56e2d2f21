"""Admin endpoints behind a key, model control off, inference open: against the real server."""
from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from search_rank_client import SearchClient
from conversion.stages import REPO_ROOT
from model_repository import spec
from model_repository.triton_server import ADMIN_KEY_GRPC_HEADER, ADMIN_KEY_HEADER, run_triton_server

pytestmark = pytest.mark.server
KEY = "s3cret-admin-key"


def test_admin_endpoints_need_the_key_and_load_unload_stay_off(ci_repository):
    with run_triton_server(ci_repository, admin_key=KEY) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            with pytest.raises(InferenceServerException) as err:
                client.get_model_repository_index()
            assert "restricted" in err.value.message() and ADMIN_KEY_GRPC_HEADER in err.value.message()
            with pytest.raises(InferenceServerException):
                client.get_model_repository_index(headers={ADMIN_KEY_GRPC_HEADER: "wrong"})
            index = client.get_model_repository_index(headers={ADMIN_KEY_GRPC_HEADER: KEY})
            assert spec.SEARCH_RANK in {m.name for m in index.models}
            # even with the key, the repository cannot be changed at run time
            with pytest.raises(InferenceServerException, match="(?i)explicit|not allowed|polling"):
                client.unload_model(spec.RANKER, headers={ADMIN_KEY_GRPC_HEADER: KEY})
            assert client.is_model_ready(spec.SEARCH_RANK)
        finally:
            client.close()
        # HTTP is restricted the same way; probes and inference are not
        def http_index(headers):
            request = urllib.request.Request(f"{server.http_url}/v2/repository/index", data=b"{}", method="POST",
                                             headers=headers)
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.status

        with pytest.raises(urllib.error.HTTPError):
            http_index({})
        assert http_index({ADMIN_KEY_HEADER: KEY}) == 200
        with urllib.request.urlopen(f"{server.http_url}/v2/models/{spec.SEARCH_RANK}/ready", timeout=10) as r:
            assert r.status == 200
        with SearchClient(server.grpc_url, timeout_s=30) as c:
            assert len(c.rank("desk lamp", 1, [1, 2, 3], top_k=2)) == 2


def test_without_a_key_load_and_unload_are_still_refused(triton):
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        with pytest.raises(InferenceServerException, match="(?i)explicit|not allowed|polling"):
            client.unload_model(spec.RANKER)
        assert client.is_model_ready(spec.SEARCH_RANK)
    finally:
        client.close()


@pytest.mark.unit
def test_admin_key_file_is_validated(tmp_path):
    bad = tmp_path / "key"
    bad.write_text("a,b")
    for args in (["--admin-key-file", str(tmp_path / "missing")], ["--admin-key-file", str(bad)]):
        result = subprocess.run([sys.executable, "-m", "model_repository.triton_server", *args], cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and "--admin-key-file" in result.stderr.strip().splitlines()[-1]
