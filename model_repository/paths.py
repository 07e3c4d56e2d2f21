"""Where this checkout keeps generated files. Serving code and the conversion stages both use it,
so it lives on the serving side (conversion may import serving code, never the other way round)."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def build_root() -> Path:
    """Where generated artifacts go; SEARCHRANK_BUILD overrides the ignored ./build."""
    return Path(os.environ.get("SEARCHRANK_BUILD", REPO_ROOT / "build")).resolve()
