"""Hot-swap under load: time from announcement to the first response of the new version, p99
latency during the swap against steady state, and failed requests (must be 0).

    python bench/hot_swap.py            (--quick: the default policy only, short phases; under a minute)
    python bench/hot_swap.py --quick --sizes gpt2-small    (one size, short phases)

For each policy size (the default small policy, and a GPT-2-small-sized one unless --quick): a
model store with v0000 and a real broker (the bundled Kafka), a policy server following the
model-updates topic, and `clients` threads calling Generate in a loop. After a steady phase, v0001
(the same architecture with perturbed weights) is published into the store before the steady phase
and announced after it; the run goes on until responses come from v0001 for a few seconds. Steady p99 is measured over the
steady phase, swap p99 over [announcement, first v0001 response + 2 s]. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def p99(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * 0.99))] if xs else float("nan")


def make_store(root: Path, size: str) -> Path:
    """v0000 from a freshly built policy of `size` (random init; the swap does not care)."""
    from common.model_store import ModelStore
    from serve.make_policy import PolicySpec, build
    src = build(PolicySpec(out=root / f"policy-{size}", size=size))
    store = ModelStore(root / "store")

    def write(tmp: Path) -> None:
        # without make_policy's own manifest.json ("v0"), as the trainer writes policy/: with it the server
        # took its first model for "v0" and swapped to v0000 during the steady phase
        shutil.copytree(src, tmp / "policy", ignore=shutil.ignore_patterns("manifest.json"))
    store.publish("v0000", write, None, {}, {})
    return root / "store"


def publish_perturbed(store_root: Path, version: str) -> float:
    import torch
    from safetensors.torch import load_file, save_file

    from common.model_store import ModelStore
    store = ModelStore(store_root)
    prev = store.path(store.latest()) / "policy"

    def write(tmp: Path) -> None:
        shutil.copytree(prev, tmp / "policy")
        for f in (tmp / "policy").glob("*.safetensors"):
            sd = load_file(str(f))
            save_file({k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in sd.items()},
                      str(f), metadata={"format": "pt"})
    store.publish(version, write, store.latest(), {}, {})
    return time.monotonic()


def announce(bootstrap: str, store_root: Path, version: str) -> float:
    from feedback.kafka_io import AckedProducer
    from feedback.topics import MODEL_UPDATES
    from rlhf.v1 import models_pb2
    p = AckedProducer(bootstrap, client_id="bench-announcer")
    t = time.monotonic()
    p.wait(p.send_async(MODEL_UPDATES, version.encode(),
                        models_pb2.ModelUpdate(version=version, path=str((store_root / version).resolve()))
                        .SerializeToString()))
    p.close()
    return t


def run_one(size: str, bootstrap: str, steady_s: float, clients: int, tmp: Path) -> dict:
    import grpc

    from serve.client import PolicyClient
    from tests.helpers import ServerProc, free_port
    store = make_store(tmp / size, size)
    port = free_port()
    srv = ServerProc("serve", ["--store", str(store), "--kafka-bootstrap", bootstrap, "--port", str(port),
                               "--metrics-port", "0", "--max-batch-size", "16"], r"policy server listening",
                     timeout=600)
    log: list[tuple[float, float, str, str]] = []   # (start, latency, version, status)
    stop = threading.Event()

    def client(i: int) -> None:
        with PolicyClient(f"127.0.0.1:{port}", timeout=120) as c:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    v = c.generate(f"Hello {i}, how are you?", max_new_tokens=16, seed=i).model_version
                    log.append((t0, time.monotonic() - t0, v, "OK"))
                except grpc.RpcError as e:
                    log.append((t0, time.monotonic() - t0, "", e.code().name))

    try:
        # v0001 goes into the store now and is announced after the steady phase: publishing (perturbing and
        # hashing the weights in this process) is the trainer's work, and on these two cores it had stalled
        # the requests in flight for ~3 s right before the announcement, inside the swap's p99 window
        time.sleep(1.0)   # the watcher has looked at the store (it serves what is there when it starts)
        publish_perturbed(store, "v0001")
        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
        for t in threads:
            t.start()
        time.sleep(steady_s)
        t_steady_end = time.monotonic()
        if any(v == "v0001" for *_, v, _ in log):   # the watcher found it in the store unannounced (a reconnect)
            raise RuntimeError("the server swapped to v0001 before the announcement: run again")
        load_1m = os.getloadavg()[0]   # on a machine shared with other work, the figures are read beside it
        t_ann = announce(bootstrap, store, "v0001")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not any(v == "v0001" and s + lat >= t_ann for s, lat, v, _ in log):
            time.sleep(0.05)
        t_first = min(s + lat for s, lat, v, _ in log if v == "v0001")
        time.sleep(3)
        stop.set()
        for t in threads:
            t.join(timeout=120)
    finally:
        srv.stop()
    # the server's own account of the swap: "swapped to v0001 in 1.21s (verify 0.34s, load ...)"
    server_line = next((ln.split("swapped to ", 1)[1] for ln in srv.output().splitlines() if "swapped to v0001" in ln), "")
    warm = log[0][0] + min(2.0, steady_s / 3)  # skip the first requests (allocation, caches)
    steady = [lat for s, lat, v, st in log if warm <= s and s + lat <= t_steady_end and st == "OK"]
    swap = [lat for s, lat, v, st in log if s + lat >= t_ann and s <= t_first + 2.0]
    failed = sum(st != "OK" for *_, st in log)
    return {"size": size, "swap_seconds": t_first - t_ann, "failed_requests": failed, "requests": len(log),
            "steady_p99_s": p99(steady), "swap_p99_s": p99(swap), "p99_swap_over_steady": p99(swap) / p99(steady),
            "mixed_versions_after_first_new": sum(v == "v0000" and s > t_first for s, _, v, _ in log),
            "steady_versions": sorted({v for s, lat, v, st in log if s + lat <= t_steady_end and st == "OK"}),
            "loadavg_1m_before_swap": load_1m, "server_swap": server_line}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="default policy only, short phases (under a minute)")
    ap.add_argument("--sizes", default="", help="comma-separated policy sizes (serve.make_policy presets); "
                    "default: small, and gpt2-small unless --quick")
    ap.add_argument("--clients", type=int, default=8)
    a = ap.parse_args()
    from feedback.broker import BrokerConfig, start, stop
    from feedback.topics import ensure_topics
    from tests.helpers import free_port
    sizes = a.sizes.split(",") if a.sizes else ["small"] if a.quick else ["small", "gpt2-small"]
    steady = 8.0 if a.quick else 20.0
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        bc = BrokerConfig(data_dir=tmp / "kafka", port=free_port(), controller_port=free_port())
        start(bc)
        try:
            ensure_topics(bc.bootstrap)
            runs = []
            for size in sizes:
                r = run_one(size, bc.bootstrap, steady, a.clients, tmp)
                print(f"{size}: swap {r['swap_seconds']:.2f}s, p99 swap/steady {r['p99_swap_over_steady']:.2f}, "
                      f"failed {r['failed_requests']} of {r['requests']}; server: {r['server_swap']}",
                      file=sys.stderr, flush=True)
                runs.append(r)
        finally:
            stop(bc)
    first = runs[0]
    print(json.dumps({"swap_seconds": first["swap_seconds"], "failed_requests": sum(r["failed_requests"] for r in runs),
                      "p99_swap_over_steady": first["p99_swap_over_steady"], "runs": runs}))


if __name__ == "__main__":
    main()
