"""Loopback ports for child processes (tests, benches, the main job)."""
from __future__ import annotations

import random
import socket
from pathlib import Path

_given: set[int] = set()
_rng = random.Random()   # seeded from os.urandom: parallel processes pick apart


def ephemeral_low(path: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> int:
    """The first port of the kernel's ephemeral range (Linux's default 32768 where it can't be read)."""
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a child process to bind soon. Picked at random below the
    kernel's ephemeral range: the kernel never hands out those ports itself (to outgoing connections
    or a bind to port 0), so none of the many client connections a test or the main job opens can
    take the port between this pick and the child's bind, as happened with an OS-picked port (an
    integration test failed on it). Never the same port twice in one process. Falls back to the
    OS's pick where the range below is too small."""
    lo, hi = 10000, ephemeral_low() - 1
    for _ in range(200 if hi - lo >= 1000 else 0):
        port = _rng.randint(lo, hi)
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_ports(**ports: int) -> None:
    """ValueError naming the first of the given ports (name=value) outside [0, 65535] (0: any free port,
    or off, as each option says). A bind would otherwise take the port modulo 65536 (gRPC does)."""
    for name, port in ports.items():
        if not 0 <= port <= 65535:
            raise ValueError(f"{name} must be in [0, 65535], got {port}")
