"""The client distribution: what its wheel holds and declares, that it imports no server code, and
that the server's spec takes the contract from it (one source of truth)."""
from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2 as mc

from client_install import CLIENT_DIR, build_wheel
from model_repository import render, spec
from model_repository.paths import REPO_ROOT
from search_rank_client import contract

pytestmark = pytest.mark.unit

PACKAGE = CLIENT_DIR / "search_rank_client"
# What a client module may import: the standard library, numpy, tritonclient (and grpc under it).
ALLOWED_THIRD_PARTY = {"numpy", "tritonclient", "search_rank_client"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("dist"))


def test_wheel_holds_only_the_client_package_with_its_typing_marker(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"search_rank_client"}, top
    for module in ("__init__.py", "__main__.py", "aio.py", "contract.py", "channel.py", "py.typed"):
        assert f"search_rank_client/{module}" in names, module


def test_wheel_metadata_python_3_9_and_only_tritonclient_grpc_and_numpy(wheel):
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    fields = [line.split(": ", 1) for line in meta.splitlines() if ": " in line]
    assert ["Requires-Python", ">=3.9"] in fields
    requires = sorted(v.split(">")[0].split("=")[0].replace(" ", "") for k, v in fields if k == "Requires-Dist")
    assert requires == ["numpy", "tritonclient[grpc]"], requires


def test_client_sources_import_only_the_standard_library_numpy_and_tritonclient():
    stdlib = set(sys.stdlib_module_names)
    for path in PACKAGE.rglob("*.py"):
        foreign = _imports(path) - stdlib - ALLOWED_THIRD_PARTY
        assert not foreign, f"{path.relative_to(REPO_ROOT)} imports {sorted(foreign)}"


def test_client_imports_with_server_code_and_heavy_runtimes_unimportable():
    blocked = ("model_repository", "conversion", "loadtests", "deploy", "torch", "onnxruntime", "tokenizers")
    probe = (
        "import sys, importlib.abc\n"
        f"BLOCKED = {blocked!r}\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED: raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import search_rank_client, search_rank_client.aio, search_rank_client.__main__ as cli\n"
        "try:\n"
        "    cli.main(['--help'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
    )
    r = subprocess.run([sys.executable, "-c", probe], cwd=CLIENT_DIR, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "python -m search_rank_client" in r.stdout


def test_server_spec_takes_the_public_contract_from_the_client():
    for name in ("SEARCH_RANK", "TEXT_EMBED", "QUERY", "USER_ID", "CANDIDATE_IDS", "TOP_K", "ITEM_IDS", "SCORES",
                 "TEXT", "MAX_CANDIDATES", "MAX_QUERY_BYTES", "ADMISSION_REFUSAL", "Tensor"):
        assert getattr(spec, name) is getattr(contract, name), name


def test_rendered_ensembles_declare_exactly_the_clients_contract():
    # Read back through Triton's own proto, independent of the spec objects that rendered it.
    dtypes = {contract.BYTES: mc.TYPE_STRING, contract.INT32: mc.TYPE_INT32, contract.INT64: mc.TYPE_INT64,
              contract.FP32: mc.TYPE_FP32}
    expected = {
        contract.SEARCH_RANK: ((contract.QUERY, contract.USER_ID, contract.CANDIDATE_IDS, contract.TOP_K),
                               (contract.ITEM_IDS, contract.SCORES)),
        contract.TEXT_EMBED: ((contract.TEXT,), (contract.text_embedding(384),)),
    }
    pipeline = spec.build_spec(384)
    for name, (inputs, outputs) in expected.items():
        cfg = render.ensemble_config(pipeline.ensemble(name))
        got_in = [(t.name, t.data_type, list(t.dims), t.optional) for t in cfg.input]
        got_out = [(t.name, t.data_type, list(t.dims)) for t in cfg.output]
        assert got_in == [(t.name, dtypes[t.dtype], list(t.dims), t.optional) for t in inputs], name
        assert got_out == [(t.name, dtypes[t.dtype], list(t.dims)) for t in outputs], name


def test_server_distribution_installs_no_top_level_packages():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert project["tool"]["setuptools"]["packages"] == []
    client = tomllib.loads((CLIENT_DIR / "pyproject.toml").read_text())
    assert client["project"]["requires-python"] == ">=3.9"
    assert client["tool"]["setuptools"]["packages"] == ["search_rank_client"]
