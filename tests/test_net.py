"""free_port: ports the kernel never hands out itself, never twice, never one already bound; port
checks; a served port is not bound twice."""
from __future__ import annotations

import socket
from concurrent import futures

import grpc
import pytest

from common import auth, net


def test_ports_are_below_the_ephemeral_range_distinct_and_bindable():
    ports = [net.free_port() for _ in range(200)]
    assert len(set(ports)) == 200 and all(10000 <= p < net.ephemeral_low() for p in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))   # still free


def test_a_port_someone_listens_on_is_skipped(monkeypatch):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        picks = iter([taken, taken + 1 if taken + 1 < 65536 else taken - 1])
        monkeypatch.setattr(net, "ephemeral_low", lambda: 65536)
        monkeypatch.setattr(net._rng, "randint", lambda lo, hi: next(picks))
        assert net.free_port() != taken


def test_the_range_is_read_from_the_kernel_or_defaults(tmp_path):
    (tmp_path / "range").write_text("40000\t60999\n")
    assert net.ephemeral_low(tmp_path / "range") == 40000
    assert net.ephemeral_low(tmp_path / "missing") == 32768


def test_check_ports_names_the_first_port_out_of_range():
    net.check_ports(port=0, metrics_port=65535)   # 0: any free port, or off
    with pytest.raises(ValueError, match="metrics_port must be in \\[0, 65535\\], got 65536"):
        net.check_ports(port=50051, metrics_port=65536)
    with pytest.raises(ValueError, match="admin_port .* got -1"):
        net.check_ports(admin_port=-1)


def test_a_second_grpc_server_on_a_served_port_fails_to_bind_instead_of_sharing_it():
    # gRPC's default SO_REUSEPORT let a second server bind a port another one serves, and the kernel
    # split the connections between them; with auth.EXCLUSIVE_PORT the second bind fails (real sockets)
    first = grpc.server(futures.ThreadPoolExecutor(1), options=auth.EXCLUSIVE_PORT)
    port = auth.bind(first, "127.0.0.1:0")
    first.start()
    try:
        second = grpc.server(futures.ThreadPoolExecutor(1), options=auth.EXCLUSIVE_PORT)
        with pytest.raises(auth.PortInUse, match=f"cannot listen on 127.0.0.1:{port}"):
            auth.bind(second, f"127.0.0.1:{port}")
    finally:
        first.stop(None)
