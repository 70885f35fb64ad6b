"""free_port: ports the kernel never hands out itself, never twice, never one already bound."""
from __future__ import annotations

import socket

from common import net


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
