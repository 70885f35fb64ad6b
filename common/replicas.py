"""Client channels to replicated servers: gRPC's own client-side load balancing, round robin.

    from common.replicas import replica_channel
    ch = replica_channel("127.0.0.1:50051,127.0.0.1:50052")                  # grpc.Channel
    ch = replica_channel(addresses, tls_ca="ca.pem", aio=True)                # grpc.aio.Channel (web/)

One channel holds a connection to every replica and sends each call to the next READY one
(`round_robin`, gRPC's doc/load-balancing.md); a replica that goes away drops out of the rotation
and comes back when it answers again. Nothing here picks servers by hand.

The address list becomes one gRPC target (gRPC's doc/naming.md):
  - one address, or a target with a scheme (`dns:///svc:50051`, `ipv4:...`, `unix:...`): as given;
    a DNS name with several records (a Kubernetes headless service) is balanced over all of them,
    re-resolved by gRPC as replicas come and go;
  - several `host:port`: `ipv4:a:p,b:q` (or `ipv6:[a]:p,...`), the C-core resolver for a static list.
    Host names in such a list are resolved here, once, when the channel is made (gRPC has no
    resolver for a list of names); for replicas whose addresses change, use one DNS name instead.
"""
from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Sequence
from pathlib import Path

import grpc

from . import auth

SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "xds:")
BALANCED_SERVICES = ("rlhf.v1.PolicyService", "rlhf.v1.RewardService")

# round_robin over every address, and a retry on UNAVAILABLE or CANCELLED, which gRPC sends to the
# next replica: a stopping server refuses the requests still queued with UNAVAILABLE ("retry on another
# replica", serve/__main__.py), and a call may race a replica's GOAWAY. CANCELLED: a call that reached a
# server just as it began to stop, before a handler took it, is ended by gRPC's core with CANCELLED
# (grpc/grpc#41785; seen in tests/test_replicas.py's SIGTERM under load); our servers send CANCELLED
# otherwise only for a client that went away (nobody to retry for) or an engine stopping with a
# request in it (a stopping server again). A client's own cancel is never retried. Not RESOURCE_EXHAUSTED:
# that is load shedding, which a retry would amplify. The feedback service is left out: its writes are
# retried by callers with their own event ids (a blind retry of a call without one stores twice).
SERVICE_CONFIG = json.dumps({
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [{
        "name": [{"service": s} for s in BALANCED_SERVICES],
        "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.05s", "maxBackoff": "0.5s", "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"]},
    }],
})


def split_addresses(addresses: str | Sequence[str]) -> list[str]:
    """"a:1, b:2" or ["a:1", "b:2"] -> ["a:1", "b:2"] (blanks dropped)."""
    parts = addresses.split(",") if isinstance(addresses, str) else list(addresses)
    out = [p.strip() for p in parts if p.strip()]
    if not out:
        raise ValueError("no server address given")
    return out


def _host_port(address: str) -> tuple[str, int]:
    """"h:p" or "[v6]:p" -> (h, p); the port is required (gRPC's default, 443, is never ours)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{address!r}: expected host:port")
    return host.strip("[]"), int(port)


def _ip(host: str, port: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(host)
    except ValueError:   # a name: its first IPv4 address, else its first IPv6 one
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise ValueError(f"{host}: {e}") from None
        return sorted((ipaddress.ip_address(i[4][0]) for i in infos), key=lambda a: a.version)[0]


def lb_target(addresses: str | Sequence[str]) -> tuple[str, list[tuple[str, str]]]:
    """(gRPC target, channel options) for round robin over the replicas at `addresses`."""
    options = [("grpc.service_config", SERVICE_CONFIG)]
    if isinstance(addresses, str) and addresses.strip().startswith(SCHEMES):   # a gRPC target already
        return addresses.strip(), options
    addrs = split_addresses(addresses)
    if any(a.startswith(SCHEMES) for a in addrs):
        raise ValueError(f"{addresses!r}: a target with a scheme must be the only one")
    if len(addrs) == 1:
        return addrs[0], options
    hps = [_host_port(a) for a in addrs]
    ips = [_ip(h, p) for h, p in hps]
    if len({ip.version for ip in ips}) > 1:
        raise ValueError(f"{addresses!r}: mixes IPv4 and IPv6 replicas (one gRPC target holds one family)")
    if ips[0].version == 4:
        target = "ipv4:" + ",".join(f"{ip}:{p}" for ip, (_, p) in zip(ips, hps))
    else:
        target = "ipv6:" + ",".join(f"[{ip}]:{p}" for ip, (_, p) in zip(ips, hps))
    # the authority (TLS hostname check, :authority header) would otherwise be the whole list, which
    # no certificate names; replicas of one service share a certificate for the name given first
    return target, options + [("grpc.default_authority", addrs[0])]


def replica_channel(addresses: str | Sequence[str], tls_ca: str = "", options: Sequence = (), aio: bool = False):
    """A channel balancing calls round robin over the replicas at `addresses` ("h:p,h:p", a list, or
    one target), TLS verified against tls_ca when given (as common/auth.channel). `options` are added
    to the balancing ones. aio=True: a grpc.aio channel (for asyncio servers such as web/)."""
    target, opts = lb_target(addresses)
    opts += list(options)
    if not aio:
        return auth.channel(target, tls_ca, opts)
    if tls_ca:
        return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(Path(tls_ca).read_bytes()), options=opts)
    return grpc.aio.insecure_channel(target, options=opts)


def local_targets(ports: Sequence[int], host: str = "127.0.0.1") -> str:
    """[5001, 5002] -> "127.0.0.1:5001,127.0.0.1:5002": the address list of replicas on this machine."""
    return ",".join(f"{host}:{p}" for p in ports)
