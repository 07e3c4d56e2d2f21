"""`make serve`'s entry point: ready only when search_rank answers, Ctrl-C stops it cleanly."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from search_rank_client import SearchClient
from conversion.stages import REPO_ROOT
from model_repository.triton_server import free_ports, process_table

pytestmark = pytest.mark.server


def _start_serve(repository, ports, log_file) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "model_repository.triton_server", "--repository", str(repository),
         "--grpc-port", str(ports.grpc), "--http-port", str(ports.http), "--metrics-port", str(ports.metrics),
         "--log-file", str(log_file)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _ready_line(proc: subprocess.Popen, timeout_s: float = 240) -> str:
    deadline = time.monotonic() + timeout_s
    line = ""
    while "ready" not in line:
        assert proc.poll() is None, f"server CLI exited early: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "no ready line"
        line = proc.stdout.readline()
    return line


def test_serve_reports_ready_then_stops_on_sigint(ci_repository, tmp_path):
    ports = free_ports()
    proc = _start_serve(ci_repository, ports, tmp_path / "triton.log")
    try:
        line = _ready_line(proc)
        assert f"127.0.0.1:{ports.grpc}" in line
        # "ready" is only printed after a real search_rank request went through.
        with SearchClient(f"127.0.0.1:{ports.grpc}", timeout_s=30) as c:
            assert c.is_ready()
            assert len(c.rank("desk lamp", 1, [1, 2, 3], top_k=2)) == 2
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=180) == 0
        with SearchClient(f"127.0.0.1:{ports.grpc}", timeout_s=1) as c:
            assert not c.is_live()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_fails_fast_on_missing_repository(tmp_path):
    result = subprocess.run([sys.executable, "-m", "model_repository.triton_server", "--repository",
                             str(tmp_path / "nope")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    assert "not a rendered model repository" in result.stderr


def _bindable(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _server_pids(grpc_port: int) -> list[int]:
    """tritonserver processes serving this port, found through /proc, not through our own code."""
    from pathlib import Path

    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"--grpc-port={grpc_port}" in (proc / "cmdline").read_bytes().decode(errors="replace").replace("\0", " "):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def test_serve_command_killed_frees_its_ports(ci_repository, tmp_path):
    """SIGKILL on the serve command (no handler runs) still ends tritonserver and its stubs."""
    ports = free_ports()
    proc = _start_serve(ci_repository, ports, tmp_path / "triton.log")
    try:
        _ready_line(proc)
        servers = _server_pids(ports.grpc)
        assert servers, "no tritonserver found for the port: the test would prove nothing"
        stubs = [pid for pid, st in process_table().items() if st.ppid in servers]
        assert stubs, "no python-backend stub found under tritonserver"
        assert not _bindable(ports.grpc)
        proc.kill()
        proc.wait()
        killed_at = time.monotonic()
        while time.monotonic() - killed_at < 10 and (_server_pids(ports.grpc) or not _bindable(ports.grpc)):
            time.sleep(0.1)
        freed_s = time.monotonic() - killed_at
        print(f"\nserve command SIGKILLed: server and ports gone after {freed_s:.2f} s")
        assert not _server_pids(ports.grpc), "tritonserver outlived its serve command"
        time.sleep(1)  # orphaned stubs, if any, are reparented and would still run
        table = process_table()
        assert not [k for k in stubs if k in table and table[k].state != "Z"], \
            "python-backend stubs outlived their server"
        assert all(_bindable(p) for p in (ports.grpc, ports.http, ports.metrics)), "ports still held"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in _server_pids(ports.grpc):
            os.kill(pid, signal.SIGKILL)
