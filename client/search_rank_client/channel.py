"""gRPC targets and channel arguments for one server or a set of replicas.

A plain ClusterIP Service (or any single address in front of several servers) pins a client's one
HTTP/2 connection to one replica, so replicas added later get no traffic. The client therefore
balances itself: it resolves every replica's address and spreads calls with gRPC's `round_robin`
policy, which keeps one subchannel per address and only picks READY ones, so a stopped replica
stops receiving new calls as soon as its connection drops.

Targets:
- "host:port": one server (balancing is a no-op).
- "dns:///search-rank-grpc.search.svc.cluster.local:8001": every A record of a name, e.g. a
  Kubernetes headless Service. gRPC re-resolves when a connection fails; it does not poll DNS,
  so pods added by the autoscaler reach long-lived clients only after a re-resolution (docs/deploy.md).
- "127.0.0.1:8001,127.0.0.1:8011" or a list of such addresses: a fixed replica set (IP literals
  or names, resolved once here).
"""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

# tritonclient's own defaults, kept because passing channel_args replaces all of them: Triton
# allows messages up to INT32_MAX, and a 1000-candidate request is far above gRPC's 4 MiB default.
_INT32_MAX = 2 ** 31 - 1
SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:")


@dataclass(frozen=True)
class ChannelSettings:
    lb_policy: str = "round_robin"
    # Floor between DNS re-resolutions (gRPC's default is 30 s); a replica that went away is
    # replaced in the address list sooner.
    dns_min_resolution_interval_ms: int = 5000
    keepalive_time_ms: int = _INT32_MAX
    keepalive_timeout_ms: int = 20000
    # Ceiling on gRPC's reconnect backoff to a server that went away (default 120 s, growing 1.6x
    # from 1 s): with it, a restarted server gets traffic within ~this long of being back, not
    # after whatever backoff the outage had grown to (tests/model_repository/test_server_restart_server.py).
    max_reconnect_backoff_ms: int = 1000


def _split(addresses: str | Sequence[str]) -> list[str]:
    items = addresses.split(",") if isinstance(addresses, str) else list(addresses)
    return [a.strip() for a in items if a.strip()]


def _host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not host:port: {address!r}")
    return host.strip("[]"), int(port)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:  # a name in a fixed list: resolved once, to its first IPv4 address
        return ipaddress.ip_address(socket.getaddrinfo(host, None, socket.AF_INET)[0][4][0])
    except (socket.gaierror, IndexError):
        raise ValueError(f"cannot resolve {host!r}") from None


def grpc_target(addresses: str | Sequence[str]) -> str:
    """The gRPC target URI for one address, a scheme URI (passed through), or several addresses."""
    if isinstance(addresses, str) and addresses.strip().startswith(SCHEMES):
        return addresses.strip()
    items = _split(addresses)
    if not items:
        raise ValueError("no server address given")
    if len(items) == 1:
        _host_port(items[0])
        return items[0]
    resolved = [(_ip(h), p) for h, p in map(_host_port, items)]
    versions = {ip.version for ip, _ in resolved}
    if len(versions) > 1:
        raise ValueError(f"mixed IPv4 and IPv6 replica addresses: {items}")
    if versions == {4}:
        return "ipv4:" + ",".join(f"{ip}:{p}" for ip, p in resolved)
    return "ipv6:" + ",".join(f"[{ip}]:{p}" for ip, p in resolved)


def channel_args(settings: ChannelSettings = ChannelSettings()) -> list[tuple[str, int | str]]:
    return [
        ("grpc.max_send_message_length", _INT32_MAX),
        ("grpc.max_receive_message_length", _INT32_MAX),
        ("grpc.keepalive_time_ms", settings.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", settings.keepalive_timeout_ms),
        ("grpc.lb_policy_name", settings.lb_policy),
        ("grpc.dns_min_time_between_resolutions_ms", settings.dns_min_resolution_interval_ms),
        ("grpc.initial_reconnect_backoff_ms", min(1000, settings.max_reconnect_backoff_ms)),
        ("grpc.max_reconnect_backoff_ms", settings.max_reconnect_backoff_ms),
    ]


@dataclass(frozen=True)
class ClientTls:
    """TLS for the gRPC channel: the CA the server's certificate must chain to, and for mutual
    TLS the client's own certificate chain and key (PEM files)."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    def __post_init__(self):
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs its key and the other way round (--tls-cert with --tls-key)")
        for name in ("ca", "cert", "key"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"TLS {name} file not found: {path}")

    def client_kwargs(self) -> dict:
        """tritonclient.grpc.InferenceServerClient's TLS arguments (it reads the files itself)."""
        return {"ssl": True, "root_certificates": str(self.ca),
                "certificate_chain": None if self.cert is None else str(self.cert),
                "private_key": None if self.key is None else str(self.key)}
