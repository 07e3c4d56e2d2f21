"""Stage folders: named after the settings hash, complete only when the stage finished."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from conversion import stages

pytestmark = pytest.mark.unit


@dataclass(frozen=True)
class S:
    a: int = 1
    b: str = "x"


def test_folder_name_follows_settings(tmp_path):
    assert stages.stage_dir("01-x", S(), tmp_path) == stages.stage_dir("01-x", S(), tmp_path)
    assert stages.stage_dir("01-x", S(), tmp_path) != stages.stage_dir("01-x", S(a=2), tmp_path)
    assert stages.stage_dir("01-x", S(), tmp_path).name.startswith("01-x-")


def test_interrupted_stage_leaves_nothing(tmp_path):
    out = tmp_path / "stage"
    with pytest.raises(RuntimeError):
        with stages.atomic_stage(out, S()) as tmp:
            (tmp / "half.bin").write_bytes(b"123")
            raise RuntimeError("killed mid-way")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_completed_stage_has_settings_and_files(tmp_path):
    out = tmp_path / "stage"
    with stages.atomic_stage(out, S(a=3)) as tmp:
        (tmp / "model.onnx").write_bytes(b"x")
    assert stages.is_complete(out)
    assert (out / "model.onnx").read_bytes() == b"x"
    assert '"a": 3' in (out / stages.SETTINGS_FILE).read_text()
