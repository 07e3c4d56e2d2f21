"""Build the client wheel and install it, alone, into a fresh venv of another Python (as a
backend service would): shared by the packaging tests."""
from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from model_repository.paths import REPO_ROOT, build_root

CLIENT_DIR = REPO_ROOT / "client"


def build_wheel(out: Path) -> Path:
    """`make client-wheel`'s command, into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    str(CLIENT_DIR), "-w", str(out)], check=True, capture_output=True, text=True)
    (wheel,) = out.glob("search_rank_client-*.whl")
    return wheel


def find_python(version: str) -> Path | None:
    """An interpreter of `version` ("3.9"): on PATH unless it is a pyenv shim, else under pyenv's root."""
    roots = [os.environ.get("PYENV_ROOT", ""), str(Path.home() / ".pyenv")]
    try:
        roots.insert(0, subprocess.run(["pyenv", "root"], capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    for root in filter(None, roots):
        found = sorted(glob.glob(f"{root}/versions/{version}.*/bin/python{version}"))
        if found:
            return Path(found[-1])
    on_path = shutil.which(f"python{version}")
    if on_path and "/shims/" not in on_path:
        return Path(on_path)
    return None


def client_venv(python: Path, wheel: Path) -> Path:
    """A venv with only the wheel and its dependencies, cached under the build root by interpreter
    and wheel content (a changed client gets a fresh venv). Returns its python."""
    key = hashlib.sha256(wheel.read_bytes() + str(python).encode()).hexdigest()[:12]
    venv = build_root() / "client-venvs" / f"{python.name}-{key}"
    py = venv / "bin" / "python"
    if (venv / ".installed").is_file():
        return py
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([str(python), "-m", "venv", str(venv)], check=True, capture_output=True, text=True)
    result = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"pip install of {wheel.name} into {python.name} failed:\n{result.stderr[-3000:]}")
    (venv / ".installed").write_text(wheel.name)
    return py
