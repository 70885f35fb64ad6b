"""A load generator for the policy server: N concurrent streaming clients for a duration.

Each client loops GenerateStream calls; RESOURCE_EXHAUSTED (the server's admission control) is
an expected answer under overload and is retried after a short backoff. Everything else that is
not OK is a failure. The server's RSS is sampled from /proc to show memory stays bounded.
"""
from __future__ import annotations

import threading
import time
from collections import Counter

import grpc

from common.replicas import replica_channel
from protos.build import ensure_generated

ensure_generated()
from rlhf.v1 import policy_pb2 as pb  # noqa: E402
from rlhf.v1 import policy_pb2_grpc as pb_grpc  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(target: str, streams: int, seconds: float, server_pid: int | None = None, max_new_tokens: int = 16,
        metadata: tuple = ()) -> dict:
    # ~50 streams per connection; a comma-separated target spreads them over replicas, round robin
    channels = [replica_channel(target) for _ in range(max(1, streams // 50))]
    stubs = [pb_grpc.PolicyServiceStub(c) for c in channels]
    codes: Counter = Counter()
    tokens = [0]
    lat: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds
    rss: list[float] = []

    def client(i: int) -> None:
        stub = stubs[i % len(stubs)]
        req = pb.GenerateRequest(text=f"Hello number {i}, tell me something.",
                                 params=pb.SamplingParams(max_new_tokens=max_new_tokens, seed=i))
        while time.monotonic() < stop:
            t0 = time.monotonic()
            n = 0
            try:
                for _ in stub.GenerateStream(req, metadata=metadata, timeout=max(5.0, stop - t0 + 30)):
                    n += 1
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
            with lock:
                codes[code] += 1
                tokens[0] += n
                if code == "OK":
                    lat.append(time.monotonic() - t0)
            if code != "OK":
                time.sleep(0.05)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(streams)]
    for t in threads:
        t.start()
    while time.monotonic() < stop:
        if server_pid:
            rss.append(rss_mb(server_pid))
        time.sleep(1)
    for t in threads:
        t.join(timeout=120)
    for c in channels:
        c.close()
    lat.sort()
    return {"streams": streams, "seconds": seconds, "codes": dict(codes), "tokens": tokens[0],
            "tokens_per_s": tokens[0] / seconds, "ok_p50_s": lat[len(lat) // 2] if lat else None,
            "ok_p99_s": lat[int(len(lat) * 0.99)] if lat else None,
            "rss_mb_first": rss[0] if rss else None, "rss_mb_max": max(rss) if rss else None,
            "rss_mb_last": rss[-1] if rss else None}
