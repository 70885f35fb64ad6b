"""Load test of the policy server: 200 concurrent streams for 60 s (sim/load.py).

    python bench/load.py              (--quick: 20 s; --model PATH: a local HF policy, default models/policy-v0)

Expected under overload: only OK and RESOURCE_EXHAUSTED, bounded memory, healthy afterwards.
Also reports throughput against a baseline run of 8 streams in the same process (the ratio shows
what overload costs the requests that are admitted). Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default=str(REPO / "models" / "policy-v0"))
    ap.add_argument("--streams", type=int, default=200)
    a = ap.parse_args()
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from sim.load import run
    from tests.helpers import start_policy_server
    seconds = 20 if a.quick else 60
    proc, port, _ = start_policy_server(Path(a.model))
    try:
        base = run(f"127.0.0.1:{port}", streams=8, seconds=seconds / 4, server_pid=proc.proc.pid)
        res = run(f"127.0.0.1:{port}", streams=a.streams, seconds=seconds, server_pid=proc.proc.pid)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            st = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    finally:
        proc.stop()
    res.update(healthy_after=st == health_pb2.HealthCheckResponse.SERVING,
               only_ok_or_exhausted=set(res["codes"]) <= {"OK", "RESOURCE_EXHAUSTED"},
               baseline_8_streams_tokens_per_s=base["tokens_per_s"],
               tokens_per_s_ratio_vs_8_streams=res["tokens_per_s"] / base["tokens_per_s"])
    print(f"{a.streams} streams x {seconds}s: {res['codes']}, {res['tokens_per_s']:.1f} tok/s "
          f"({res['tokens_per_s_ratio_vs_8_streams']:.2f}x the 8-stream baseline), RSS {res['rss_mb_first']:.0f} -> "
          f"max {res['rss_mb_max']:.0f} MB, healthy after: {res['healthy_after']}", file=sys.stderr)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
