"""Start the real `tritonserver` (CPU: the binary inside the nvidia-pytriton wheel) on a repository.

`run_triton_server()` is what the demo, `make serve` and the server tests use: it binds to
loopback, polls readiness of the `search_rank` ensemble itself (not just the process), sends
one real request through it so the first caller is not the slow one, fails fast with the log
tail if the process dies, and stops the server with SIGINT (then SIGKILL) on exit.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from model_repository import spec
from model_repository.paths import REPO_ROOT, build_root

log = logging.getLogger(__name__)

PYTHON_STUB = "triton_python_backend_stub"


class TritonStartError(RuntimeError):
    """tritonserver exited or did not become ready; the message carries the log tail."""


@dataclass(frozen=True)
class TritonPorts:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002


ADMIN_KEY_HEADER = "admin-key"
# Triton expects restricted-protocol headers on gRPC under this prefix (HTTP takes the name as is);
# a request without it is answered UNAVAILABLE "This protocol is restricted".
ADMIN_KEY_GRPC_HEADER = f"triton-grpc-protocol-{ADMIN_KEY_HEADER}"
ADMIN_PROTOCOLS = ("model-repository", "shared-memory", "trace", "logging")


@dataclass(frozen=True)
class GrpcTls:
    """TLS on the gRPC endpoint (PEM files). With `client_ca`, mutual TLS: a client must present a
    certificate signed by it. HTTP (probes, metrics) stays plain: bind it to loopback or a pod
    network that only the kubelet and Prometheus reach."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def __post_init__(self):
        for name in ("cert", "key", "client_ca"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"TLS {name} file not found: {path}")

    def flags(self) -> list[str]:
        out = ["--grpc-use-ssl=true", f"--grpc-server-cert={Path(self.cert).resolve()}",
               f"--grpc-server-key={Path(self.key).resolve()}"]
        if self.client_ca is not None:
            out += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={Path(self.client_ca).resolve()}"]
        return out


@dataclass
class TritonSettings:
    repository: Path
    host: str = "127.0.0.1"
    ports: TritonPorts = field(default_factory=TritonPorts)
    startup_timeout_s: float = 180.0
    log_verbose: int = 0
    log_file: Path | None = None
    warm: bool = True
    # Seconds Triton waits for in-flight requests after SIGTERM/SIGINT before it exits; the
    # Kubernetes grace period must exceed it plus the preStop pause (deploy/k8s, tested).
    exit_timeout_s: int = 30
    gpu_metrics: bool = False
    # None: the binary inside the nvidia-pytriton wheel (the CPU default).
    binary: Path | None = None
    tls: GrpcTls | None = None
    # Admin endpoints (repository index and load/unload, shared memory, trace and log settings)
    # answer only requests carrying this value in the ADMIN_KEY_HEADER header, on gRPC and HTTP.
    # Load/unload stay refused either way (--model-control-mode=none); None leaves them open.
    admin_key: str | None = None
    # Pin the server and its backend stubs to these CPUs (None: all). Benchmarks pin the server to
    # part of the machine and the load generator to the rest, so one does not steal from the other.
    cpus: tuple[int, ...] | None = None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_ports(host: str = "127.0.0.1") -> TritonPorts:
    return TritonPorts(http=free_port(host), grpc=free_port(host), metrics=free_port(host))


def pytriton_root() -> Path:
    import pytriton

    return Path(pytriton.__file__).resolve().parent


def prepare_backends(dest: Path | None = None) -> Path:
    """A backend folder whose python backend has the stub for this interpreter beside it.

    The wheel keeps one stub per Python version in a separate folder; Triton looks for the stub
    next to libtriton_python.so. Linking them in a folder of our own leaves site-packages untouched.
    """
    root = pytriton_root() / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / PYTHON_STUB
    if not stub.is_file():
        raise TritonStartError(f"nvidia-pytriton has no python backend stub for Python {version} ({stub})")
    dest = dest or Path(tempfile.gettempdir()) / f"searchrank-triton-backends-{version}"
    python_dir = dest / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for src in [stub, *(root / "backends" / "python").glob("*.*")]:
        link = python_dir / src.name
        if not (link.is_symlink() and link.resolve() == src.resolve()):
            link.unlink(missing_ok=True)
            link.symlink_to(src)
    return dest


def server_command(settings: TritonSettings, backend_dir: Path) -> list[str]:
    p = settings.ports
    binary = settings.binary or pytriton_root() / "tritonserver" / "bin" / "tritonserver"
    return [
        str(binary),
        f"--model-repository={Path(settings.repository).resolve()}",
        f"--backend-directory={backend_dir}",
        f"--http-address={settings.host}", f"--http-port={p.http}",
        f"--grpc-address={settings.host}", f"--grpc-port={p.grpc}",
        f"--metrics-address={settings.host}", f"--metrics-port={p.metrics}",
        "--allow-metrics=true", f"--allow-gpu-metrics={str(settings.gpu_metrics).lower()}",
        f"--log-verbose={settings.log_verbose}",
        # A python model that fails to load must fail the start, not leave a half-served ensemble.
        "--exit-on-error=true", "--strict-readiness=true",
        # The repository is fixed at start: nothing may load or unload models behind the probes.
        "--model-control-mode=none", f"--exit-timeout-secs={settings.exit_timeout_s}",
        *(settings.tls.flags() if settings.tls else []),
        *([f"--grpc-restricted-protocol={','.join(ADMIN_PROTOCOLS)}:{ADMIN_KEY_HEADER}={settings.admin_key}",
           f"--http-restricted-api={','.join(ADMIN_PROTOCOLS)}:{ADMIN_KEY_HEADER}={settings.admin_key}"]
          if settings.admin_key else []),
    ]


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    libs = pytriton_root().parent / "nvidia_pytriton.libs"
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(libs), env.get("LD_LIBRARY_PATH")]))
    # The python-backend stub embeds Python and picks up this interpreter's environment (the venv
    # with onnxruntime, tokenizers, and this project) from VIRTUAL_ENV/PATH/PYTHONPATH.
    venv = Path(sys.prefix)
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = os.pathsep.join([str(venv / "bin"), env.get("PATH", "")])
    # The server code runs from the checkout (it installs no packages), and the contract comes from
    # the client distribution's sources beside it.
    repo_root = REPO_ROOT
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo_root), str(repo_root / "client"),
                                                      env.get("PYTHONPATH")]))
    return env


@dataclass(frozen=True)
class ProcStat:
    comm: str  # cut to 15 characters by the kernel
    state: str  # 'Z': a zombie, dead but not reaped
    ppid: int
    cpu_s: float  # user + system


def process_table() -> dict[int, ProcStat]:
    """Every process's /proc/PID/stat, read once (processes that vanish meanwhile are skipped)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            head, rest = (entry / "stat").read_text().rsplit(")", 1)
            fields = rest.split()
            out[int(entry.name)] = ProcStat(head.split("(", 1)[1], fields[0], int(fields[1]),
                                            (int(fields[11]) + int(fields[12])) / tick)
        except (OSError, ValueError, IndexError):
            continue
    return out


def process_tree(pid: int, table: dict[int, ProcStat] | None = None) -> set[int]:
    """`pid` and its live descendants (tritonserver and its backend stubs)."""
    table = process_table() if table is None else table
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        kids = [c for c, p in table.items() if p.ppid == parent and c not in tree]
        tree.update(kids)
        frontier.extend(kids)
    return {p for p in tree if p in table}


def tree_memory(pid: int) -> dict[str, int]:
    """Bytes of memory of `pid`'s process tree from /proc/PID/smaps_rollup: `rss` counts a page
    shared by several processes (a memory-mapped catalog) once per process, `pss` splits it
    between them (the sum is what the tree really holds), `anon` is private heap."""
    keys = {"Rss": "rss", "Pss": "pss", "Anonymous": "anon"}
    total = dict.fromkeys(keys.values(), 0)
    for p in process_tree(pid):
        try:
            lines = Path(f"/proc/{p}/smaps_rollup").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            name, _, rest = line.partition(":")
            if name in keys:
                total[keys[name]] += int(rest.split()[0]) * 1024
    return total


def process_part(pid: int, table: dict[int, ProcStat]) -> str:
    """What a process of a server tree is, for per-step accounting: a backend stub is named after the
    model it serves (its first argument is that model's `<model>/<version>/model.py`), any other
    process by its command name."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        args = []
    if len(args) > 1 and args[1].endswith(b"/model.py"):
        return Path(args[1].decode(errors="replace")).parent.parent.name
    return table[pid].comm


def tree_cpu_by_part(pid: int) -> dict[str, float]:
    """User + system CPU seconds of `pid`'s live process tree, summed by `process_part` (for a
    Triton server: tritonserver itself, gRPC, ensemble and batching included, and one entry per
    python model). Processes that exit between two readings drop out of the later one."""
    table = process_table()
    out: dict[str, float] = {}
    for p in process_tree(pid, table):
        part = process_part(p, table)
        out[part] = out.get(part, 0.0) + table[p].cpu_s
    return out


def backend_stubs(server_pid: int) -> dict[int, str]:
    """The python-backend stubs tritonserver `server_pid` started (its children): PID -> the state
    letter from /proc ('Z' for a dead one: Triton does not reap a stub that died)."""
    return {pid: p.state for pid, p in process_table().items()
            if p.ppid == server_pid and PYTHON_STUB.startswith(p.comm)}


def running_stubs(server_pid: int) -> set[int]:
    return {pid for pid, state in backend_stubs(server_pid).items() if state != "Z"}


# Runs beside every server: when the process that started the server dies (SIGKILL included, which
# no handler sees), it SIGKILLs the server's whole process group, tritonserver and its stubs, so the
# ports are free again at once. It leaves by itself once the group is gone (a normal stop).
# A separate process, not PR_SET_PDEATHSIG on tritonserver: that would spare the stubs, which
# tritonserver spawns and which outlive it (test_serve_command_killed_frees_its_ports).
_WATCHDOG = """
import os, signal, sys, time
parent, group = int(sys.argv[1]), int(sys.argv[2])
while True:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        sys.exit(0)
    if os.getppid() != parent:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
        sys.exit(0)
    time.sleep(0.2)
"""


def start_watchdog(server_pid: int) -> subprocess.Popen:
    """Tie the server's process group (led by `server_pid`) to this process's life."""
    # Its own session: a Ctrl-C meant for the serve command must not reach it first.
    return subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(server_pid)],
                            stdin=subprocess.DEVNULL, start_new_session=True)


class TritonServer:
    def __init__(self, settings: TritonSettings):
        self.settings = settings
        self.process: subprocess.Popen | None = None
        self._watchdog: subprocess.Popen | None = None
        self._log_path = settings.log_file
        self._log_handle = None

    @property
    def grpc_url(self) -> str:
        return f"{self.settings.host}:{self.settings.ports.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.ports.metrics}/metrics"

    def log_tail(self, lines: int = 40) -> str:
        if self._log_path is None or not Path(self._log_path).exists():
            return ""
        return "\n".join(Path(self._log_path).read_text(errors="replace").splitlines()[-lines:])

    def start(self) -> None:
        repo = Path(self.settings.repository)
        if not (repo / spec.SEARCH_RANK / "config.pbtxt").is_file():
            raise TritonStartError(f"{repo} is not a rendered model repository (run `make models`)")
        if self._log_path is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self._log_path = Path(name)
        # a restart appends, so the log keeps what happened before it
        self._log_handle = open(self._log_path, "a" if self._log_handle is not None else "w")
        cmd = server_command(self.settings, prepare_backends())
        log.info("starting tritonserver (grpc %s, log %s)", self.grpc_url, self._log_path)
        # Its own process group: the python-backend stubs it spawns join it, so stop() and kill()
        # can reach them too (a SIGKILLed tritonserver otherwise leaves its stubs running).
        cpus = self.settings.cpus
        self.process = subprocess.Popen(cmd, stdout=self._log_handle, stderr=subprocess.STDOUT, env=server_env(),
                                        stdin=subprocess.DEVNULL, start_new_session=True,
                                        preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus))
        self._watchdog = start_watchdog(self.process.pid)

    @property
    def http_url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.ports.http}"

    def _ready_over_http(self) -> bool:
        import urllib.error
        import urllib.request

        try:
            for model in (spec.SEARCH_RANK, spec.TEXT_EMBED):
                with urllib.request.urlopen(f"{self.http_url}/v2/models/{model}/ready", timeout=2) as r:
                    if r.status != 200:
                        return False
            return True
        except (urllib.error.URLError, OSError):  # not listening yet, or 400 "not ready"
            return False

    def wait_ready(self) -> None:
        # Probed over HTTP (on the launcher's own loopback), like the Kubernetes probes: the gRPC
        # endpoint may require a client certificate the launcher does not hold.
        deadline = time.monotonic() + self.settings.startup_timeout_s
        while not self._ready_over_http():
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise TritonStartError(f"tritonserver exited with code {code} before it was ready:\n"
                                       f"{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TritonStartError(f"tritonserver not ready after {self.settings.startup_timeout_s:.0f} s:\n"
                                       f"{self.log_tail()}")
            time.sleep(0.25)
        if self.settings.warm:
            self._warm()
        self._stubs = running_stubs(self.process.pid)

    def dead_stubs(self) -> set[int]:
        """Backend stubs that were running when the server became ready and are gone now. Triton
        does not restart a dead stub: the model stays "ready" and every request through it fails
        INTERNAL "Stub process ... is not healthy", so only a restart brings the server back."""
        return set(getattr(self, "_stubs", set())) - running_stubs(self.process.pid)

    def restart(self) -> None:
        """Kill (a broken server has nothing worth draining) and start again on the same ports."""
        self.kill()
        if self._log_handle is not None:
            self._log_handle.close()
        self.start()
        self.wait_ready()

    def _warm(self) -> None:
        """One full pass through each ensemble (KServe v2 JSON over HTTP, so it works whatever
        TLS the gRPC endpoint requires). Ids need not exist: unknown candidates take the
        cold-start path, which is still a full pass."""
        import json
        import urllib.error
        import urllib.request

        def tensor(t: spec.Tensor, data: list) -> dict:
            return {"name": t.name, "datatype": t.dtype, "shape": [len(data)], "data": data}

        calls = {
            spec.SEARCH_RANK: [tensor(spec.QUERY, ["warm up the search ranking path"]), tensor(spec.USER_ID, [0]),
                               tensor(spec.CANDIDATE_IDS, list(range(1, 101)))],
            spec.TEXT_EMBED: [tensor(spec.TEXT, ["warm up the text embedding path"])],
        }
        deadline = time.monotonic() + self.settings.startup_timeout_s
        for model, inputs in calls.items():
            body = json.dumps({"inputs": inputs}).encode()
            request = urllib.request.Request(f"{self.http_url}/v2/models/{model}/infer", data=body,
                                             headers={"Content-Type": "application/json"})
            while True:
                try:
                    with urllib.request.urlopen(request, timeout=60) as r:
                        r.read()
                    break
                except urllib.error.HTTPError as e:
                    # The first pass initialises every session; on a loaded machine it can run
                    # past the queue timeout and be refused. That is admission, not a failure.
                    message = e.read().decode(errors="replace")
                    if e.code != 503 or spec.ADMISSION_REFUSAL not in message or time.monotonic() > deadline:
                        raise TritonStartError(f"warm-up call to {model} failed: HTTP {e.code} {message}") from None
                    log.info("warm-up call to %s refused by the queue policy; retrying", model)
                    time.sleep(0.2)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not stop after SIGINT within %.0f s; killing it", timeout_s)
                self.process.kill()
                self.process.wait()
        self._kill_group()
        self._reap_watchdog()
        if self._log_handle is not None:
            self._log_handle.close()
        log.info("tritonserver stopped (exit code %s)", self.process.returncode)
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the server and its backend stubs at once (a crash, for fault tests)."""
        if self.process is not None:
            self._kill_group()
            self.process.wait()
            self._reap_watchdog()

    def _kill_group(self) -> None:
        # After a clean exit the group is empty; after a crash or a timeout it holds orphaned stubs.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _reap_watchdog(self) -> None:
        # Once the server is reaped and its group empty, the watchdog sees it within 0.2 s and exits.
        if self._watchdog is not None:
            try:
                self._watchdog.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._watchdog.kill()
                self._watchdog.wait()
            self._watchdog = None


def serve_until_interrupted(servers: Sequence[TritonServer], stopping: str) -> int:
    """Block until Ctrl-C (0; the callers' context managers then stop the servers) or until a
    server exits on its own (1, with its log tail on stderr): the foreground loop of the serve CLIs.
    A server that lost a backend stub is restarted (see TritonServer.dead_stubs)."""
    try:
        while all(s.process.poll() is None for s in servers):
            time.sleep(0.5)
            for s in servers:
                dead = s.dead_stubs()
                if dead and s.process.poll() is None:
                    log.error("tritonserver %s lost backend stub(s) %s; restarting it", s.grpc_url, sorted(dead))
                    started = time.monotonic()
                    s.restart()
                    log.info("tritonserver %s serving again after %.1f s", s.grpc_url, time.monotonic() - started)
    except KeyboardInterrupt:
        print(stopping, flush=True)
        return 0
    dead = next(s for s in servers if s.process.poll() is not None)
    print(f"error: tritonserver {dead.grpc_url} exited with code {dead.process.returncode}:\n{dead.log_tail()}",
          file=sys.stderr)
    return 1


@contextmanager
def run_triton_server(repository: Path, ports: TritonPorts | None = None, **kwargs) -> Iterator[TritonServer]:
    """Start Triton on free loopback ports (unless given), wait until ready, always stop it."""
    settings = TritonSettings(repository=Path(repository), ports=ports or free_ports(), **kwargs)
    server = TritonServer(settings)
    try:
        server.start()
        server.wait_ready()
        yield server
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    d = TritonPorts()
    p = argparse.ArgumentParser(prog="python -m model_repository.triton_server",
                                description="Serve the rendered repository with tritonserver until Ctrl-C.")
    p.add_argument("--repository", type=Path, default=build_root() / "model_repository")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    p.add_argument("--http-port", type=int, default=d.http)
    p.add_argument("--grpc-port", type=int, default=d.grpc)
    p.add_argument("--metrics-port", type=int, default=d.metrics)
    p.add_argument("--log-file", type=Path, help="tritonserver log (default: a temporary file)")
    p.add_argument("--grpc-tls-cert", type=Path, help="TLS on gRPC: the server's PEM certificate chain")
    p.add_argument("--grpc-tls-key", type=Path, help="TLS on gRPC: the server's PEM private key")
    p.add_argument("--grpc-tls-client-ca", type=Path,
                   help="mutual TLS: clients must present a certificate signed by this PEM CA")
    p.add_argument("--admin-key-file", type=Path,
                   help=f"restrict the admin endpoints ({', '.join(ADMIN_PROTOCOLS)}) to requests with this "
                        f"file's content in the {ADMIN_KEY_HEADER!r} header (read from a file to keep it out of shell "
                        f"history; tritonserver still receives it as an argument)")
    args = p.parse_args(argv)
    admin_key = None
    if args.admin_key_file:
        if not args.admin_key_file.is_file():
            p.error(f"--admin-key-file {args.admin_key_file}: no such file")
        admin_key = args.admin_key_file.read_text().strip()
        if not admin_key or any(c in admin_key for c in ",:= \n"):
            p.error("--admin-key-file must hold one non-empty key without ',', ':', '=' or whitespace")
    tls = None
    if args.grpc_tls_cert or args.grpc_tls_key or args.grpc_tls_client_ca:
        if not (args.grpc_tls_cert and args.grpc_tls_key):
            p.error("TLS needs both --grpc-tls-cert and --grpc-tls-key")
        try:
            tls = GrpcTls(args.grpc_tls_cert, args.grpc_tls_key, args.grpc_tls_client_ca)
        except ValueError as e:
            p.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ports = TritonPorts(http=args.http_port, grpc=args.grpc_port, metrics=args.metrics_port)
    try:
        with run_triton_server(args.repository, ports=ports, host=args.host, log_file=args.log_file,
                               tls=tls, admin_key=admin_key) as server:
            print(f"search_rank ready: grpc {server.grpc_url}, metrics {server.metrics_url} (Ctrl-C stops)", flush=True)
            return serve_until_interrupted([server], "stopping tritonserver ...")
    except TritonStartError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
