"""The container image definition: lint (hadolint), one pinned Triton release with its TensorRT
and ONNX Runtime versions beside it, non-root, no secrets, and that the code it copies is enough
to import the entrypoint and the python-backend models."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conversion.stages import REPO_ROOT
from deploy.bundle import IMAGE_BUNDLE


pytestmark = pytest.mark.unit

DOCKERFILE = REPO_ROOT / "deploy" / "docker" / "Dockerfile"
IMAGE_ROOT = "/opt/searchrank"


def _lines() -> list[str]:
    # Join continuation lines so each instruction is one string.
    return [re.sub(r"\s+", " ", i).strip() for i in DOCKERFILE.read_text().replace("\\\n", " ").splitlines()
            if i.strip() and not i.lstrip().startswith("#")]


def _instructions(kind: str) -> list[str]:
    return [line[len(kind) + 1:] for line in _lines() if line.upper().startswith(kind + " ")]


def test_hadolint_passes(require_tool):
    hadolint = require_tool("hadolint")
    r = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_really_lints(tmp_path, require_tool):
    # A linter that accepts everything would make the test above worthless.
    hadolint = require_tool("hadolint")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install curl\n")
    r = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True)
    assert r.returncode != 0 and "DL3006" in r.stdout


def test_release_pinned_once_with_its_tensorrt_and_onnxruntime_versions():
    text = DOCKERFILE.read_text()
    releases = re.findall(r"^ARG TRITON_RELEASE=(\d{2}\.\d{2})$", text, flags=re.M)
    assert len(releases) == 1, "the Triton release must be pinned in exactly one place"
    (from_line,) = _instructions("FROM")
    assert from_line == "nvcr.io/nvidia/tritonserver:${TRITON_RELEASE}-py3"
    trt = re.search(r"^ARG TENSORRT_VERSION=(\d+\.\d+\.\d+\.\d+)$", text, flags=re.M)
    assert trt, "TENSORRT_VERSION is pinned next to the release"
    header = text.split("FROM", 1)[0]
    assert f"TensorRT {trt.group(1)}" in header and re.search(r"ONNX Runtime \d+\.\d+\.\d+", header)
    assert "${TENSORRT_VERSION}" in " ".join(_instructions("RUN")), "the bindings are installed at that version"
    assert not re.search(r"tritonserver:\d{2}\.\d{2}", text), "a second, literal release"


def test_runs_as_non_root():
    users = _instructions("USER")
    assert users, "no USER instruction: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid not in ("0", "root")
    assert _lines()[-1].startswith("ENTRYPOINT") or users[-1] in " ".join(_lines()[-4:])


def test_no_secrets_in_layers():
    secret = re.compile(r"(secret|token|passw|api[_-]?key|credential|ngc_api)", re.I)
    for kind in ("ENV", "ARG", "LABEL"):
        for line in _instructions(kind):
            assert not secret.search(line), f"{kind} {line}"
    for line in _instructions("COPY") + _instructions("ADD"):
        assert not re.search(r"(\.env|\.netrc|\.ssh|\.docker|id_rsa|\.pem|\.key)\b", line), line
    assert not _instructions("ADD"), "ADD can fetch URLs into a layer; COPY only"


def test_copies_the_bundle_deploy_bundle_stages_and_no_engines():
    copies = _instructions("COPY")
    staged = IMAGE_BUNDLE.as_posix()
    assert any(c.split()[0].rstrip("/") == staged for c in copies), "the Dockerfile copies another bundle path"
    assert f"SEARCHRANK_BUNDLE={IMAGE_ROOT}/bundle" in " ".join(_instructions("ENV"))
    assert not any(".plan" in c or "engine" in c.split()[0] for c in copies), "engines are built on the node"
    ignore = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    assert f"!{staged}/" in ignore and "*" in ignore


def _copied_sources(dest: Path) -> None:
    """Lay out /opt/searchrank/src as the Dockerfile's COPY lines would (except the bundle)."""
    for line in _instructions("COPY"):
        *sources, target = line.split()
        if not target.startswith(f"{IMAGE_ROOT}/src/"):
            continue
        out = dest / target.removeprefix(f"{IMAGE_ROOT}/src/")
        for src in sources:
            path = REPO_ROOT / src
            if path.is_dir():
                shutil.copytree(path, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                out.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, out / path.name)


def test_copied_code_is_enough_for_the_entrypoint_and_backends(tmp_path):
    src = tmp_path / "src"
    _copied_sources(src)
    # deploy.probe: the liveness probe runs inside the container (deploy/k8s)
    # conversion.encode_items: the item-encoding RayJob's entrypoint (deploy/k8s/rayjob)
    modules = ["deploy.entrypoint", "deploy.probe", "deploy.bundle", "deploy.engines", "deploy.gpu_pod",
               "model_repository.render",
               "model_repository.runtime", "model_repository.spec", "conversion.encode_items"]
    # Backends import triton_python_backend_utils, which only exists inside Triton: check they
    # are present as files, and import everything else from the copied tree only.
    for model in ("text_encoder", "tokenizer", "candidates", "ranker", "top_k"):
        assert (src / "model_repository" / "backends" / f"{model}.py").is_file()
    probe = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
             "own = [n for n in sys.modules if n.split('.')[0] in ('deploy', 'conversion', 'model_repository', 'search_rank_client')]\n"
             "where = lambda m: m.__file__ or list(m.__path__)[0]  # namespace packages have no __file__\n"
             f"bad = [n for n in own if not where(sys.modules[n]).startswith({str(src)!r})]\n"
             "assert not bad, bad\n"
             "heavy = [n for n in ('torch', 'transformers', 'sklearn') if n in sys.modules]\n"
             "assert not heavy, heavy\n")
    env = dict(os.environ, PYTHONPATH=str(src))
    r = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


def test_dockerignore_lets_in_every_copied_source():
    # The context starts from "*": a COPY source that .dockerignore does not re-include is missing
    # from the build context, and the docker build fails (or, for a folder, copies nothing).
    allowed = {line[1:].rstrip("/") for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    for line in _instructions("COPY"):
        for src in line.split()[:-1]:
            assert src.rstrip("/") in allowed, f"{src} is excluded from the build context"
            assert (REPO_ROOT / src).exists() or src.rstrip("/") == IMAGE_BUNDLE.as_posix(), src


def test_entrypoint_runs_through_nvidia_entrypoint():
    # NVIDIA's script sets up CUDA forward compatibility on older drivers and then exec's its arguments,
    # so our entrypoint (and, after its exec, tritonserver) is still PID 1.
    (entrypoint,) = _instructions("ENTRYPOINT")
    import json

    assert json.loads(entrypoint) == ["/opt/nvidia/nvidia_entrypoint.sh", "python3", "-m", "deploy.entrypoint"]
    assert not _instructions("CMD"), "a CMD would be appended to the entrypoint's arguments"


def test_image_build_fails_on_a_tensorrt_version_mismatch():
    # The check runs after the wheel is installed and the code copied, as root, before the image is usable.
    lines = _lines()
    check = next(i for i, line in enumerate(lines) if line == "RUN python3 -m deploy.engines check-versions")
    pip = next(i for i, line in enumerate(lines) if "tensorrt-cu12==${TENSORRT_VERSION}" in line)
    code = next(i for i, line in enumerate(lines) if line.startswith("COPY") and "deploy/engines.py" in line)
    assert pip < check and code < check
    assert "deploy/gpu_pod.py" in lines[code], "the entrypoint imports deploy.gpu_pod"
