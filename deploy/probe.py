"""Liveness probe for the container: Triton answers /v2/health/live AND every python-backend stub
it started is still running.

Triton 2.51 never recovers from a dead stub: the model stays ready, /v2/health/live stays 200 and
every request through that model fails INTERNAL (docs/deploy.md). Outside a container the serve
CLIs restart such a server; in a pod, where tritonserver is PID 1, this exec probe fails instead,
and the kubelet restarts the container. It reads /proc only and sends no inference request, so an
overloaded server (whose queues refuse work by design) is never mistaken for a dead one.

    python3 -m deploy.probe --repository /var/run/searchrank/model_repository

Exit 0 and one line when live; exit 1 and one line naming what is wrong otherwise.
"""
from __future__ import annotations

import sys
import urllib.error
import urllib.request
from pathlib import Path

from deploy.cli import OneLineParser
from model_repository import spec
from model_repository.render import CONFIG, read_config
from model_repository.triton_server import backend_stubs


def expected_stubs(repository: Path) -> int:
    """One stub per instance of every python-backend model in the rendered repository."""
    total = 0
    for path in Path(repository).glob(f"*/{CONFIG}"):
        cfg = read_config(path)
        if cfg.backend == "python":
            total += sum(group.count or 1 for group in cfg.instance_group) or 1
    return total


def check(server_pid: int, http_url: str, repository: Path | None, timeout_s: float = 3.0) -> str | None:
    """None when live, else what is wrong."""
    try:
        with urllib.request.urlopen(f"{http_url}/v2/health/live", timeout=timeout_s) as r:
            if r.status != 200:
                return f"{http_url}/v2/health/live answered {r.status}"
    except (urllib.error.URLError, OSError) as e:
        return f"{http_url}/v2/health/live: {getattr(e, 'reason', e)}"
    stubs = backend_stubs(server_pid)
    dead = sorted(pid for pid, state in stubs.items() if state == "Z")
    if dead:
        return f"python-backend stub(s) {dead} of tritonserver {server_pid} died; Triton does not restart them"
    if repository is not None:
        want = expected_stubs(repository)
        if len(stubs) < want:
            return f"tritonserver {server_pid} runs {len(stubs)} python-backend stubs, the repository needs {want}"
    return None


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="python -m deploy.probe", description=__doc__.splitlines()[0])
    p.add_argument("--server-pid", type=int, default=1, help="tritonserver's PID (1 in the container)")
    p.add_argument("--http-url", default="http://127.0.0.1:8000", help="Triton's HTTP endpoint")
    p.add_argument("--repository", type=Path,
                   help="the rendered repository: also require one running stub per python model instance")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds for the HTTP check")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if not Path(f"/proc/{args.server_pid}").is_dir():
        print(f"not live: no process {args.server_pid}", file=sys.stderr)
        return 1
    if args.repository is not None and not (args.repository / spec.SEARCH_RANK / CONFIG).is_file():
        p.error(f"--repository {args.repository} is not a rendered model repository")
    problem = check(args.server_pid, args.http_url.rstrip("/"), args.repository, args.timeout)
    if problem:
        print(f"not live: {problem}", file=sys.stderr)
        return 1
    print(f"live: tritonserver {args.server_pid}, {len(backend_stubs(args.server_pid))} backend stubs running")
    return 0


if __name__ == "__main__":
    sys.exit(main())
