"""Per-process CPU accounting of a server tree (model_repository.triton_server.tree_cpu_by_part), on
real processes shaped like Triton's: a parent, and children whose first argument is a
`<model>/<version>/model.py` path, as a python-backend stub's is."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from model_repository.triton_server import process_part, process_table, process_tree, tree_cpu_by_part

pytestmark = pytest.mark.unit

# Burns argv[1] seconds of CPU, says so, then waits to be killed (so its CPU time is still readable).
BURN = """
import sys, time
end = time.process_time() + float(sys.argv[1])
while time.process_time() < end:
    pass
print("done", flush=True)
time.sleep(60)
"""

# The tree's root (tritonserver's place): starts one stub-shaped child per (script, seconds) pair.
PARENT = """
import subprocess, sys, time
args = sys.argv[1:]
kids = [subprocess.Popen([sys.executable, args[i], args[i + 1]]) for i in range(0, len(args), 2)]
time.sleep(60)
"""


def _stub_script(tmp_path: Path, model: str) -> Path:
    script = tmp_path / model / "1" / "model.py"
    script.parent.mkdir(parents=True)
    script.write_text(BURN)
    return script


@pytest.fixture()
def server_like_tree(tmp_path):
    """A parent (not this test process: pytest's own tree may hold a live Triton server) with two
    stub-shaped children that burn 0.4 s and 0.1 s of CPU."""
    scripts = [str(_stub_script(tmp_path, "query_encoder")), "0.4", str(_stub_script(tmp_path, "ranker")), "0.1"]
    parent = subprocess.Popen([sys.executable, "-c", PARENT, *scripts], stdout=subprocess.PIPE, text=True)
    try:
        assert [parent.stdout.readline().strip() for _ in range(2)] == ["done", "done"]
        yield parent
    finally:
        table = process_table()
        for pid in process_tree(parent.pid, table) - {parent.pid}:
            os.kill(pid, 9)
        parent.kill()
        parent.wait()


def test_cpu_is_split_by_model_for_stub_shaped_children(server_like_tree):
    root = server_like_tree.pid
    parts = tree_cpu_by_part(root)
    table = process_table()
    kids = {process_part(pid, table): pid for pid in process_tree(root, table) - {root}}
    assert set(kids) == {"query_encoder", "ranker"}
    assert set(parts) == {"query_encoder", "ranker", table[root].comm}
    # each child's own CPU time under its model's name (clock ticks: 10 ms resolution)
    assert parts["query_encoder"] == pytest.approx(table[kids["query_encoder"]].cpu_s, abs=0.02)
    assert parts["ranker"] == pytest.approx(table[kids["ranker"]].cpu_s, abs=0.02)
    assert parts["query_encoder"] >= 0.35 and 0.05 <= parts["ranker"] < parts["query_encoder"]

