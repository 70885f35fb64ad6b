"""The policy server's CPU Linear (serve.model.PackedLinear, oneDNN with a prepacked weight)
against torch's F.linear (MKL sgemm), on the GPT-2-small shapes, measured in one process.

Rows: 1 (one decode), 8 and 32 (decode batches), 753 (the benchmark's packed prefill).
The two run interleaved, three rounds, best of each; the ratio is F.linear's time over
PackedLinear's. Which is faster depends on the CPU: MKL runs its AVX2 code on AMD CPUs,
oneDNN the widest ISA present. The last line is one JSON object.

    python bench/cpu_linear.py            # all shapes and row counts
    python bench/cpu_linear.py --quick    # a few seconds
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from serve.model import PackedLinear  # noqa: E402

SHAPES = [(768, 768, True), (768, 3072, True), (3072, 768, True), (768, 50257, False)]   # (in, out, bias)


def _time(f, n: int) -> float:
    f()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="rows 1 and 32 only, fewer repetitions")
    a = ap.parse_args()
    if not torch.backends.mkldnn.is_available():
        raise SystemExit("this torch build has no oneDNN: PackedLinear is not used")
    rows_list = [1, 32] if a.quick else [1, 8, 32, 753]
    flops_per_rep = 0.3e9 if a.quick else 2e9
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.backends.cpu.get_cpu_capability()} CPU capability", flush=True)
    res: dict[str, float] = {}
    ratios = []
    torch.manual_seed(0)
    for rows in rows_list:
        for k, n, bias in SHAPES:
            if n > 10000 and rows > 32:
                continue    # the lm_head only sees the last token of each sequence
            lin = torch.nn.Linear(k, n, bias=bias).eval()
            packed = PackedLinear(lin)
            x = torch.randn(rows, k)
            reps = int(min(200, max(5, flops_per_rep / (2 * rows * k * n))))
            with torch.inference_mode():
                ref = F.linear(x, lin.weight, lin.bias)
                err = (packed(x) - ref).abs().max().item() / ref.abs().max().item()
                dense, pk = [], []
                for _ in range(3):
                    dense.append(_time(lambda: F.linear(x, lin.weight, lin.bias), reps))
                    pk.append(_time(lambda: packed(x), reps))
            td, tp = min(dense), min(pk)
            gf = 2 * rows * k * n / 1e9
            ratio = td / tp
            ratios.append(ratio)
            key = f"rows{rows}_{k}x{n}"
            res[f"{key}_ratio"] = ratio
            print(f"rows {rows:4d}  {k:5d} x {n:5d}: F.linear {td * 1e3:8.3f} ms ({gf / td:6.1f} GFLOPS)  "
                  f"PackedLinear {tp * 1e3:8.3f} ms ({gf / tp:6.1f} GFLOPS)  ratio {ratio:5.2f}x  "
                  f"max rel diff {err:.1e}", flush=True)
    res["geomean_ratio"] = statistics.geometric_mean(ratios)
    res["quick"] = a.quick
    print(f"PackedLinear over F.linear, geometric mean over {len(ratios)} cases: {res['geomean_ratio']:.2f}x")
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}))


if __name__ == "__main__":
    main()
