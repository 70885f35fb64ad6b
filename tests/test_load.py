"""Overload: 200 concurrent streams get only OK or RESOURCE_EXHAUSTED, memory stays bounded, and the
server is healthy afterwards (a short run; bench/load.py is the full 60-second one)."""
from __future__ import annotations

from grpc_health.v1 import health_pb2, health_pb2_grpc

import grpc
import pytest

from sim.load import rss_mb, run
from tests.helpers import start_policy_server


@pytest.mark.slow
def test_200_streams_only_ok_or_resource_exhausted_and_healthy_after(tiny_gpt2):
    proc, port, _ = start_policy_server(tiny_gpt2, threads=1)
    try:
        res = run(f"127.0.0.1:{port}", streams=200, seconds=12, server_pid=proc.proc.pid)
        assert set(res["codes"]) <= {"OK", "RESOURCE_EXHAUSTED"}, res["codes"]
        assert res["codes"].get("OK", 0) > 50 and res["codes"].get("RESOURCE_EXHAUSTED", 0) > 0, res["codes"]
        # bounded: the KV cache and queues are preallocated / capped, so RSS does not grow with load
        assert res["rss_mb_max"] - res["rss_mb_first"] < 300, res
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            st = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert st == health_pb2.HealthCheckResponse.SERVING
        assert rss_mb(proc.proc.pid) > 0
    finally:
        proc.stop()
