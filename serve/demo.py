"""The main job (for now): start the policy server on the default model, make a sample
unary and streaming call, print them, and keep serving until Ctrl-C.

    python -m serve.demo [--model models/policy-v0] [--port 50051] [--exit-after-sample]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

from serve.client import PolicyClient
from serve.config import REPO


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serve.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "models" / "policy-v0"), help="policy checkpoint folder")
    ap.add_argument("--port", type=int, default=50051, help="gRPC port of the policy server")
    ap.add_argument("--metrics-port", type=int, default=9101, help="Prometheus port of the policy server")
    ap.add_argument("--exit-after-sample", action="store_true", help="stop the server after the sample calls")
    a = ap.parse_args(argv)
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--model", a.model, "--port", str(a.port),
                             "--metrics-port", str(a.metrics_port)], cwd=REPO)
    try:
        with PolicyClient(f"127.0.0.1:{a.port}") as c:
            c.wait_ready(120)
            info = c.info()
            print(f"[demo] serving {info.architecture} model {info.model_version} "
                  f"({info.num_parameters / 1e6:.1f}M parameters) on 127.0.0.1:{a.port}")
            prompt = "Human: How do I make a cup of tea?\n\nAssistant:"
            t0 = time.perf_counter()
            r = c.generate(prompt, max_new_tokens=32, temperature=0.8, top_p=0.95, seed=1, n=2, return_logprobs=True)
            for comp in r.completions:
                print(f"[demo] sample {comp.response_id[:8]} ({len(comp.token_ids)} tokens, version "
                      f"{r.model_version}): {comp.text!r}")
            print(f"[demo] unary call took {time.perf_counter() - t0:.2f}s")
            print("[demo] streaming: ", end="", flush=True)
            for ch in c.stream(prompt, max_new_tokens=24, temperature=0.0):
                print(ch.text_delta, end="", flush=True)
            print()
        if a.exit_after_sample:
            return 0
        print(f"[demo] server keeps running (metrics on :{a.metrics_port}/metrics); Ctrl-C stops it")
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
