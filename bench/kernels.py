"""Triton kernels against their torch references: time, effective GB/s and the fraction of the
memory-traffic bound reached (bytes that must be read / peak bandwidth).

On a machine with a CUDA GPU it times both on the GPU. Without one it says so, checks the
kernels against the references under TRITON_INTERPRET=1 (correctness only: the interpreter's
speed means nothing) and prints the references' CPU times for scale.
Last line: one JSON object.   python bench/kernels.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# compiled kernels on a GPU, the interpreter without one (before triton is imported)
os.environ["TRITON_INTERPRET"] = "0" if __import__("torch").cuda.is_available() else "1"

import torch  # noqa: E402

from serve.kernels.entropy_kl import entropy_kl_ref  # noqa: E402
from serve.kernels.logprobs import token_logprobs_ref  # noqa: E402
from serve.kernels.sampling import sample_ref  # noqa: E402


def _time(fn, reps: int) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def cases(N: int, V: int, dev: str):
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(N, V, device=dev, generator=g)
    q = x + 0.1 * torch.randn(N, V, device=dev, generator=g)
    t = torch.randint(0, V, (N,), device=dev, generator=g)
    f = lambda v, dt=torch.float32: torch.full((N,), v, dtype=dt, device=dev)  # noqa: E731
    seeds = (torch.arange(N, device=dev), f(0, torch.long))
    sampling = {  # (temperature, top_k, top_p, min_p) and the candidate slots per row
        "sample_topk_topp": ((f(0.8), f(50, torch.long), f(0.9), f(0.0)), None),
        # PPO rollouts: T = 1, no filter
        "sample_plain": ((f(1.0), f(0, torch.long), f(1.0), f(0.0)), None),
        # top-p alone on these flat rows: the nucleus is most of the vocabulary, and its boundary
        # bins alone hold ~25k tokens, more than the candidate slots: the full-row search
        "sample_topp": ((f(1.0), f(0, torch.long), f(0.9), f(0.0)), None),
        # the first case with 16 candidate slots: every row takes the full-row search
        "sample_topk_topp_full_row": ((f(0.8), f(50, torch.long), f(0.9), f(0.0)), 16),
    }
    from serve.kernels.entropy_kl_triton import entropy_kl_triton
    from serve.kernels.logprobs_triton import token_logprobs_triton
    from serve.kernels.sampling_triton import CAP, sample_triton, sample_triton_paths
    bytes_x = x.numel() * x.element_size()
    out = {
        "token_logprobs": (lambda: token_logprobs_triton(x, t), lambda: token_logprobs_ref(x, t), bytes_x, None),
        "entropy_kl": (lambda: entropy_kl_triton(x, q, t), lambda: entropy_kl_ref(x, q, t), 2 * bytes_x, None),
    }
    for name, (params, cap) in sampling.items():
        sp, cap = (*params, *seeds), cap or CAP
        out[name] = (lambda sp=sp, cap=cap: sample_triton(x, *sp, cap=cap), lambda sp=sp: sample_ref(x, *sp), bytes_x,
                     lambda sp=sp, cap=cap: sample_triton_paths(x, *sp, cap=cap)[2])
    return out


def path_counts(paths: torch.Tensor) -> dict:
    """(N,) path codes of sample_triton_paths -> {path name: rows}."""
    from serve.kernels import sampling_triton as st
    names = {st.GREEDY: "greedy", st.PLAIN: "plain", st.CANDIDATES: "candidates", st.FULL_ROW: "full_row"}
    return {names[int(p)]: int(n) for p, n in zip(*paths.unique(return_counts=True))}


def check(name, kern, ref) -> float:
    """Max abs error; for sampling, the fraction of rows drawing the reference's token. Rows whose
    kept set is tens of thousands of tokens (sample_plain, sample_topp) agree less than 1: two fp32
    CDFs over 128k tokens differ by ~1e-6, a token's share is ~1e-5, so some draws land on the
    neighbouring kept token."""
    a, b = kern(), ref()
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    if name.startswith("sample"):
        return float((a[0] == b[0]).float().mean())
    return max(float((u.float() - v.float()).abs().max()) for u, v in zip(a, b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--peak-gbs", type=float, default=0.0, help="peak memory bandwidth of the GPU (default: from a copy)")
    a = ap.parse_args()
    gpu = torch.cuda.is_available()
    out: dict = {"gpu": gpu}
    if not gpu:
        print("no CUDA GPU: checking the kernels against the references under TRITON_INTERPRET=1 "
              "(correctness only; no kernel timing)")
        N, V = (4, 30522) if a.quick else (8, 50257)
        for name, (kern, ref, nbytes, paths) in cases(N, V, "cpu").items():
            res = check(name, kern, ref)
            ref_s = _time(ref, 3)
            key = "token_agreement" if name.startswith("sample") else "max_abs_err"
            counts = path_counts(paths()) if paths else {}
            print(f"{name:25s} N={N} V={V}: {key} {res:.3g}; torch reference on CPU {ref_s * 1e3:.2f} ms "
                  f"({nbytes / ref_s / 1e9:.2f} GB/s effective)" + (f"; paths {counts}" if counts else ""))
            out[name] = {key: res, "ref_cpu_ms": ref_s * 1e3, **({"paths": counts} if counts else {})}
    else:
        N, V = (64, 50257) if a.quick else (512, 128256)
        dev = "cuda"
        if not a.peak_gbs:
            buf = torch.empty(256 * 2**20, device=dev)
            s = _time(lambda: buf.clone(), 10)
            a.peak_gbs = 2 * buf.numel() * 4 / s / 1e9
        out.update(device=torch.cuda.get_device_name(), N=N, V=V, peak_gbs=a.peak_gbs)
        for name, (kern, ref, nbytes, paths) in cases(N, V, dev).items():
            res = check(name, kern, ref)
            tk, tr = _time(kern, 20), _time(ref, 20)
            gbs = nbytes / tk / 1e9
            counts = path_counts(paths()) if paths else {}
            print(f"{name:25s} N={N} V={V}: kernel {tk * 1e3:.3f} ms ({gbs:.0f} GB/s, {gbs / a.peak_gbs:.0%} of "
                  f"the {a.peak_gbs:.0f} GB/s bound), reference {tr * 1e3:.3f} ms, speed-up {tr / tk:.2f}x; check {res:.3g}"
                  + (f"; paths {counts}" if counts else ""))
            out[name] = {"kernel_ms": tk * 1e3, "ref_ms": tr * 1e3, "speedup": tr / tk, "gbs": gbs,
                         "fraction_of_bound": gbs / a.peak_gbs, "check": res, **({"paths": counts} if counts else {})}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
