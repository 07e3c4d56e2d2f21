"""Per-process CPU accounting of a server tree (model_repository.triton_server.tree_cpu_by_part), on
real child processes shaped like Triton's: a parent, and children whose first argument is a
`<model>/<version>/model.py` path, as a python-backend stub's is."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from model_repository.triton_server import process_table, process_tree, tree_cpu_by_part

pytestmark = pytest.mark.unit

# Burns `seconds` of CPU, then waits to be killed (so its CPU time is still readable).
BURN = """
import sys, time
end = time.process_time() + float(sys.argv[1])
while time.process_time() < end:
    pass
print("done", flush=True)
time.sleep(60)
"""


def _stub_like(tmp_path: Path, model: str, seconds: float) -> subprocess.Popen:
    script = tmp_path / model / "1" / "model.py"
    script.parent.mkdir(parents=True)
    script.write_text(BURN)
    # argv[1] is the model.py path, as in `triton_python_backend_stub <repo>/<model>/1/model.py <shm> ...`
    return subprocess.Popen([sys.executable, str(script), str(seconds)], stdout=subprocess.PIPE, text=True)


def test_cpu_is_split_by_model_for_stub_shaped_children(tmp_path):
    kids = [_stub_like(tmp_path, "query_encoder", 0.4), _stub_like(tmp_path, "ranker", 0.1)]
    try:
        for k in kids:
            assert k.stdout.readline().strip() == "done"
        parts = tree_cpu_by_part(os.getpid())
        table = process_table()
        assert {k.pid for k in kids} <= process_tree(os.getpid(), table)
        # each child's own CPU time under its model's name (clock ticks: 10 ms resolution)
        assert parts["query_encoder"] == pytest.approx(table[kids[0].pid].cpu_s, abs=0.02)
        assert parts["ranker"] == pytest.approx(table[kids[1].pid].cpu_s, abs=0.02)
        assert parts["query_encoder"] >= 0.35 and 0.05 <= parts["ranker"] < parts["query_encoder"]
        # this process (pytest) is accounted under its command name, not lost
        assert table[os.getpid()].comm in parts
    finally:
        for k in kids:
            k.kill()
            k.wait()


def test_a_process_that_has_exited_is_not_counted():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert child.pid not in process_tree(os.getpid())
    assert all(v >= 0 for v in tree_cpu_by_part(os.getpid()).values())
