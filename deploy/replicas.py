"""N real Triton replicas of one repository on loopback ports: scale-out on one machine.

Replica i listens on base+10*i (HTTP), base+10*i+1 (gRPC), base+10*i+2 (metrics), so with the
default base the first replica has Triton's usual 8000/8001/8002. Each is a full `tritonserver`
started by `model_repository.triton_server` (same flags, same readiness check), so stopping one
is exactly what a pod going away looks like to a client balancing over the set.
"""
from __future__ import annotations

import logging
import signal
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from deploy.cli import OneLineParser
from model_repository.triton_server import (TritonPorts, TritonServer, TritonSettings, TritonStartError, free_ports,
                                            serve_until_interrupted)

log = logging.getLogger(__name__)

PORT_STRIDE = 10


def replica_ports(n: int, base: int | None) -> list[TritonPorts]:
    """Fixed ports from `base`, or free ones when base is None (tests)."""
    if base is None:
        return [free_ports() for _ in range(n)]
    return [TritonPorts(http=base + PORT_STRIDE * i, grpc=base + PORT_STRIDE * i + 1,
                        metrics=base + PORT_STRIDE * i + 2) for i in range(n)]


def grpc_targets(servers: Sequence[TritonServer]) -> str:
    """"host:port,host:port": what SearchClient and `make loadtest TARGET=` take."""
    return ",".join(s.grpc_url for s in servers)


@contextmanager
def run_replicas(repository: Path, n: int, base_port: int | None = None, host: str = "127.0.0.1",
                 **settings) -> Iterator[list[TritonServer]]:
    """Start n servers (all launched before waiting, so they load in parallel), yield them ready,
    always stop every one still running."""
    if n < 1:
        raise ValueError(f"replicas must be >= 1, got {n}")
    servers = [TritonServer(TritonSettings(repository=Path(repository), host=host, ports=p, **settings))
               for p in replica_ports(n, base_port)]
    with ExitStack() as stack:
        for server in servers:
            stack.callback(server.stop)
            server.start()
        for server in servers:
            server.wait_ready()
        log.info("%d replicas ready: %s", n, grpc_targets(servers))
        yield servers


def replace_replica(old: TritonServer, repository: Path, ports: TritonPorts, settle_s: float = 2.0,
                    **settings) -> TritonServer:
    """Roll one replica to a new model version without failing a request, the way the Deployment's
    RollingUpdate (maxSurge 1, maxUnavailable 0) with readiness probes and a preStop pause does:

    1. start the new version on `ports` beside the old one and wait until it is ready and warm;
    2. wait `settle_s` so balancing clients connect to it (round_robin picks a subchannel only once
       it is READY; the client's reconnect backoff is capped at 1 s) -- the preStop pause's role;
    3. stop the old replica gracefully: calls it admitted finish, new ones fail fast with
       UNAVAILABLE/NOT_FOUND and the client retries them on the new replica.

    Returns the new server; the caller owns stopping it. If the new one fails to start, the old
    one keeps serving and TritonStartError propagates.
    """
    new = TritonServer(TritonSettings(repository=Path(repository), host=old.settings.host, ports=ports, **settings))
    try:
        new.start()
        new.wait_ready()
    except BaseException:
        new.stop()
        raise
    time.sleep(settle_s)
    old.stop()
    log.info("replica %s replaced by %s (%s)", old.grpc_url, new.grpc_url, repository)
    return new


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    from conversion.stages import build_root

    p = OneLineParser(prog="python -m deploy.replicas", description=__doc__.splitlines()[0])
    p.add_argument("--repository", type=Path, default=build_root() / "model_repository")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--base-port", type=int, default=TritonPorts().http,
                   help=f"replica i uses base+{PORT_STRIDE}*i (+0 HTTP, +1 gRPC, +2 metrics)")
    p.add_argument("--host", default="127.0.0.1")
    args = p.parse_args(argv)
    if args.replicas < 1:
        p.error(f"--replicas must be >= 1, got {args.replicas}")
    if not 0 < args.base_port <= 65535 - PORT_STRIDE * args.replicas:
        p.error(f"--base-port {args.base_port} leaves no room for {args.replicas} replicas")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Stop the servers on SIGTERM too (kill, process managers), and on SIGINT even when a
    # non-interactive shell started us in the background with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with run_replicas(args.repository, args.replicas, args.base_port, args.host) as servers:
            print(f"{len(servers)} replicas ready; client target: {grpc_targets(servers)}", flush=True)
            for s in servers:
                print(f"  grpc {s.grpc_url}  metrics {s.metrics_url}", flush=True)
            return serve_until_interrupted(servers, "stopping replicas ...")
    except TritonStartError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
