"""The `loadtests` package is not installed (only its dependencies are): make it importable however
pytest is started (`python -m pytest` puts the working directory on sys.path, `pytest` does not)."""
from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
