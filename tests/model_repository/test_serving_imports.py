"""Serving code imports no training code: the arrows point conversion -> model_repository only.

A node that only serves renders its repository from the artifacts manifest the build wrote, with
neither torch nor conversion/ importable."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conversion.build_models import built_artifacts
from model_repository.paths import REPO_ROOT
from model_repository.render import CONFIG, write_artifacts_manifest

pytestmark = pytest.mark.unit

SERVING = REPO_ROOT / "model_repository"
TRAINING = ("conversion", "loadtests", "torch", "transformers", "sklearn", "modelopt")
SERVING_MODULES = ("model_repository.render", "model_repository.runtime", "model_repository.spec",
                   "model_repository.triton_server", "model_repository.catalog_store", "model_repository.demo",
                   "model_repository.paths")


def _imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):  # every import, lazy ones inside functions too
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_serving_module_imports_training_code_anywhere():
    for path in SERVING.rglob("*.py"):
        bad = _imported(path) & set(TRAINING)
        assert not bad, f"{path.relative_to(REPO_ROOT)} imports {sorted(bad)}"


def _blocked_probe(body: str) -> str:
    return ("import sys, importlib.abc\n"
            f"BLOCKED = {TRAINING!r}\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in BLOCKED: raise ImportError('blocked: ' + name)\n"
            "sys.meta_path.insert(0, Block())\n" + body)


def test_serving_modules_import_and_render_with_torch_and_conversion_unimportable(ci_models, tmp_path):
    artifacts, dim = built_artifacts("ci")
    manifest = write_artifacts_manifest(tmp_path / "served.json", artifacts, dim)
    out = tmp_path / "repo"
    body = (f"import importlib\nfor m in {SERVING_MODULES!r}: importlib.import_module(m)\n"
            "from model_repository import render\n"
            f"assert render.main(['--artifacts', {str(manifest)!r}, '--out', {str(out)!r}]) == 0\n")
    r = subprocess.run([sys.executable, "-c", _blocked_probe(body)], cwd=REPO_ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rendered = json.loads((out / "MANIFEST.json").read_text())
    assert rendered["artifacts"]["encoder_dir"] == str(artifacts.encoder_dir)
    assert (out / "search_rank" / CONFIG).is_file() and (out / "text_embed" / CONFIG).is_file()


def test_render_cli_names_a_missing_or_malformed_manifest(tmp_path):
    missing = subprocess.run([sys.executable, "-m", "model_repository.render", "--artifacts", str(tmp_path / "no.json")],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "no.json" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
    bad = tmp_path / "bad.json"
    bad.write_text('{"encoder_dir": "x"}')
    malformed = subprocess.run([sys.executable, "-m", "model_repository.render", "--artifacts", str(bad)],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert malformed.returncode == 2 and "bad.json" in malformed.stderr and "malformed" in malformed.stderr
