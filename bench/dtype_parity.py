"""bf16 or int8 against fp32 on the same policy: how far the logprobs move, and how much faster a forward is.

    python bench/dtype_parity.py                   (the default policy, models/policy-v0; bf16)
    python bench/dtype_parity.py --compare int8    (the policy server's --quantize int8 instead)
    python bench/dtype_parity.py --quick           (16 texts, 1 timing round)
    python bench/dtype_parity.py --model DIR       (any local checkpoint folder serve loads)

Teacher-forced: the chosen dialogues of hh pairs from data/ (the texts the policy is
trained and served on) go through serve.model's forward in fp32 and in the compared mode: bf16
(`--dtype bfloat16` of the policy server: weights and KV cache in bf16, oneDNN's AVX-512 BF16
kernels on CPUs that have them) or int8 (`--quantize int8`: every Linear int8, serve/quantize.py);
reported: the mean and 99th percentile of |logprob_mode - logprob_fp32| of each text token under
the model, and how often the argmax token differs. Then the same prefill timed for each, interleaved
over rounds (noisy machines), as tokens/s and the ratio mode / fp32. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from common.data import HH_PAIRS  # noqa: E402
from serve.loader import load_policy  # noqa: E402
from serve.model import sequence_logits  # noqa: E402
from train.pairs_data import read_pairs  # noqa: E402


SHORT = {"bfloat16": "bf16", "int8": "int8"}
"""--compare's name in the output."""


def texts(n: int, max_tokens: int, encode) -> list[list[int]]:
    """Token ids of the first n pairs' chosen dialogue, cut to max_tokens (last tokens kept)."""
    out = []
    for chosen, _ in read_pairs(HH_PAIRS)[:n]:
        ids = encode(chosen)[-max_tokens:]
        if len(ids) >= 2:
            out.append(ids)
    return out


@torch.no_grad()
def token_logprobs(model, seqs: list[list[int]]) -> list[torch.Tensor]:
    """Per text: (len - 1, V) fp32 log-softmax at each position (predicting tokens 1..)."""
    return [sequence_logits(model, ids, 1).float().log_softmax(-1) for ids in seqs]


@torch.no_grad()
def prefill_tok_s(model, seqs: list[list[int]]) -> float:
    t0 = time.perf_counter()
    for ids in seqs:
        sequence_logits(model, ids, 1)
    return sum(len(s) for s in seqs) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "models" / "policy-v0"), help="local checkpoint folder")
    ap.add_argument("--texts", type=int, default=64, help="hh pairs teacher-forced")
    ap.add_argument("--max-tokens", type=int, default=256, help="tokens per text at most")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    ap.add_argument("--compare", default="bfloat16", choices=("bfloat16", "int8"),
                    help="the mode set against fp32: bfloat16 (--dtype) or int8 (--quantize)")
    ap.add_argument("--quick", action="store_true", help="16 texts, 1 round")
    a = ap.parse_args()
    if a.quick:
        a.texts, a.rounds = 16, 1
    if not Path(a.model, "config.json").exists():
        sys.exit(f"{a.model}: no checkpoint there (bash scripts/run.sh makes models/policy-v0)")
    if a.compare == "bfloat16" and not torch.cpu._is_avx512_bf16_supported():
        print("note: this CPU has no AVX-512 BF16: bf16 matmuls are emulated and slow here", file=sys.stderr)
    fp32 = load_policy(a.model, dtype=torch.float32)
    other = (load_policy(a.model, dtype=torch.bfloat16) if a.compare == "bfloat16"
             else load_policy(a.model, quantize_mode=a.compare))
    short = SHORT[a.compare]
    seqs = texts(a.texts, a.max_tokens, fp32.encode)
    n_tok = sum(len(s) - 1 for s in seqs)
    print(f"{a.model}: {len(seqs)} texts, {n_tok} teacher-forced tokens", file=sys.stderr)

    diffs, argmax_diff = [], 0
    for ref, got, ids in zip(token_logprobs(fp32.model, seqs), token_logprobs(other.model, seqs), seqs):
        tgt = torch.tensor(ids[1:])[:, None]
        diffs.append((got.gather(1, tgt) - ref.gather(1, tgt)).abs()[:, 0])
        argmax_diff += int((got.argmax(-1) != ref.argmax(-1)).sum())
    d = torch.cat(diffs)
    mean_abs, p99 = float(d.mean()), float(d.quantile(0.99))
    print(f"|logprob {short} - fp32| over {n_tok} tokens: mean {mean_abs:.4f}, p99 {p99:.4f}, max {float(d.max()):.4f}; "
          f"argmax differs at {argmax_diff / n_tok:.2%} of positions", file=sys.stderr)

    runs: dict[str, list[float]] = {"float32": [], a.compare: []}
    prefill_tok_s(fp32.model, seqs[:4])   # warm-up (oneDNN primitive creation)
    prefill_tok_s(other.model, seqs[:4])
    for r in range(a.rounds):
        for name, pol in (("float32", fp32), (a.compare, other)):
            runs[name].append(prefill_tok_s(pol.model, seqs))
        print(f"round {r + 1}/{a.rounds}: fp32 {runs['float32'][-1]:.0f} tok/s, {short} {runs[a.compare][-1]:.0f} tok/s",
              file=sys.stderr)
    ratios = [b / f for f, b in zip(runs["float32"], runs[a.compare])]
    print(json.dumps({"bench": "dtype_parity", "compare": a.compare, "model": a.model, "texts": len(seqs),
                      "tokens": n_tok,
                      "mean_abs_logprob_diff": round(mean_abs, 5), "p99_abs_logprob_diff": round(p99, 5),
                      "max_abs_logprob_diff": round(float(d.max()), 5),
                      "argmax_differs_rate": round(argmax_diff / n_tok, 5),
                      "prefill_tok_s": {k: [round(x, 1) for x in v] for k, v in runs.items()},
                      f"ratio_{short}_vs_fp32": round(statistics.median(ratios), 3),
                      "ratio_rounds": [round(x, 3) for x in ratios],
                      "cpu_avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()), "quick": a.quick}))


if __name__ == "__main__":
    main()
