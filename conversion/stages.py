"""Resumable stage folders named after a hash of their settings.

A stage writes into a temporary sibling folder and renames it into place only when it
finished, so an interrupted run never leaves a folder that looks complete, and a change of
settings lands in a new folder instead of silently reusing a stale one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from model_repository.paths import REPO_ROOT, build_root  # noqa: F401  (re-exported for the stages)

log = logging.getLogger(__name__)

SETTINGS_FILE = "settings.json"


def _jsonable(settings: Any) -> Any:
    if dataclasses.is_dataclass(settings):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(settings).items()}
    if isinstance(settings, dict):
        return {str(k): _jsonable(v) for k, v in settings.items()}
    if isinstance(settings, (list, tuple)):
        return [_jsonable(v) for v in settings]
    if isinstance(settings, Path):
        return str(settings)
    return settings


def settings_hash(settings: Any) -> str:
    blob = json.dumps(_jsonable(settings), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def stage_dir(name: str, settings: Any, root: Path | None = None) -> Path:
    return (root or build_root()) / "artifacts" / f"{name}-{settings_hash(settings)}"


def is_complete(path: Path) -> bool:
    return (path / SETTINGS_FILE).is_file()


@contextmanager
def atomic_folder(out_dir: Path) -> Iterator[Path]:
    """Yield a scratch sibling folder; on success it replaces `out_dir`, on failure it is removed,
    so `out_dir` is never seen half-written."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_stage(out_dir: Path, settings: Any) -> Iterator[Path]:
    """Yield a scratch folder; on success it becomes `out_dir` with settings.json inside."""
    with atomic_folder(out_dir) as tmp:
        yield tmp
        (tmp / SETTINGS_FILE).write_text(json.dumps(_jsonable(settings), indent=2, sort_keys=True))
    log.info("stage complete: %s", out_dir)
