"""Throughput of the policy server against transformers' generate, measured in one run.

(a) transformers generate, one request at a time; (b) transformers generate on one static
padded batch of all prompts; (c) this server (a separate process, over gRPC) with 1, 8 and
32 concurrent clients. (a), (b) and (c) at 32 clients run in interleaved rounds (--repeats);
the ratios are taken within each round and their median is reported. Same model (GPT-2-small-sized config, random init), same prompts
(random token ids, 8-40 tokens), same number of new tokens (EOS ignored so every request
produces exactly that many). Each round also streams the first 16 prompts from 16 clients at once
as n=1 and as n=2 requests (the comparisons the RLHF loop asks for; sampled, temperature 1):
a request's time to first token is until every one of its samples has its first token, and
`ttft_n2_over_n1` is the median over rounds of the ratio of the two medians (one prefill per
request makes it ~1). Prints tokens/s and the ratios; the last line is one JSON object.

    python bench/serve_throughput.py            # full: 32 prompts x 32 new tokens
    python bench/serve_throughput.py --prompts 64   # two waves per client
    python bench/serve_throughput.py --quick    # under a minute
    python bench/serve_throughput.py --quick --device cuda   # both sides on the GPU (the default when there is one)
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from protos.build import ensure_generated  # noqa: E402

ensure_generated()
from serve.client import PolicyClient  # noqa: E402
from tests.helpers import start_policy_server  # noqa: E402


def build_model(out: Path, size: str) -> Path:
    from serve.make_policy import PolicySpec, build
    return build(PolicySpec(out=out, size=size, vocab_size=512, model_vocab_size=50257, corpus=Path("builtin")))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hf_one_at_a_time(hf, prompts, n_new) -> float:
    t0 = time.perf_counter()
    for p in prompts:
        hf.generate(torch.tensor([p], device=hf.device), attention_mask=torch.ones(1, len(p), dtype=torch.long,
                    device=hf.device), do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=0)
    _sync(hf.device)
    return len(prompts) * n_new / (time.perf_counter() - t0)


def hf_static_batch(hf, prompts, n_new) -> float:
    L = max(map(len, prompts))
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    mask = torch.zeros(len(prompts), L, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding, as decoder-only batched generation needs
        ids[i, L - len(p):] = torch.tensor(p)
        mask[i, L - len(p):] = 1
    ids, mask = ids.to(hf.device), mask.to(hf.device)
    t0 = time.perf_counter()
    out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new,
                      pad_token_id=0)
    _sync(hf.device)
    assert out.shape[1] == L + n_new
    return len(prompts) * n_new / (time.perf_counter() - t0)


def server_clients(target, prompts, n_new, clients) -> float:
    with PolicyClient(target, timeout=600) as c:
        c.generate(prompts[0], max_new_tokens=2, temperature=0.0)  # warm-up
        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as ex:
            outs = list(ex.map(lambda p: c.generate(p, max_new_tokens=n_new, temperature=0.0, ignore_eos=True),
                               prompts))
        dt = time.perf_counter() - t0
    total = sum(len(o.completions[0].token_ids) for o in outs)
    assert total == len(prompts) * n_new
    return total / dt


def server_ttft(target, prompts, n_new, n) -> tuple[float, float]:
    """One streamed request of n samples per prompt, all at once (one client each): (median time
    until every sample of a request has its first token in s, generated tokens/s over the run)."""
    def one(c, p, t0):
        first: dict[int, float] = {}
        toks = 0
        for ch in c.stream(p, n=n, max_new_tokens=n_new, temperature=1.0, seed=0, ignore_eos=True):
            first.setdefault(ch.index, time.perf_counter() - t0)
            toks += len(ch.token_ids)
        assert len(first) == n and toks == n * n_new
        return max(first.values())

    with PolicyClient(target, timeout=600) as c, ThreadPoolExecutor(len(prompts)) as ex:
        c.generate(prompts[0], max_new_tokens=2, temperature=0.0)  # warm-up
        t0 = time.perf_counter()
        ttfts = list(ex.map(lambda p: one(c, p, time.perf_counter()), prompts))
        dt = time.perf_counter() - t0
    return statistics.median(ttfts), len(prompts) * n * n_new / dt


def check_server_on_gpu(free_before: int) -> float:
    """GPU memory the server process took (its CUDA context, weights and KV cache), in MiB; raises if
    it took none: a server that ignored --device would be timed on the CPU against a GPU baseline."""
    used = (free_before - torch.cuda.mem_get_info()[0]) / 2**20
    if used < 256:
        raise SystemExit(f"the policy server took {used:.0f} MiB of GPU memory: it is not running on the GPU "
                         "(does `python -m serve` honour --device?)")
    return round(used)


def n_runs(target, prompts, n_new, runs: dict[str, list[float]]) -> None:
    """One round of the n=1 vs n=2 comparison at len(prompts) clients, appended to runs."""
    ttft1, _ = server_ttft(target, prompts, n_new, 1)
    ttft2, tok2 = server_ttft(target, prompts, n_new, 2)
    runs["ttft1"].append(ttft1)
    runs["ttft2"].append(ttft2)
    runs["tok2"].append(tok2)
    print(f"  {len(prompts)} clients, median time to first token: n=1 {ttft1 * 1e3:.1f} ms, n=2 {ttft2 * 1e3:.1f} ms "
          f"({ttft2 / ttft1:.2f}x); n=2 {tok2:.1f} tok/s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="16 prompts x 16 tokens (under a minute)")
    ap.add_argument("--size", default="gpt2-small", help="model preset of serve.make_policy")
    ap.add_argument("--prompts", type=int, default=0, help="number of prompts (default 32, one per client; quick 16)")
    ap.add_argument("--new-tokens", type=int, default=0, help="new tokens per prompt (default 32, quick 16)")
    ap.add_argument("--repeats", type=int, default=0,
                    help="(default 3, quick 2) rounds of (a), (b) and (c) at 32 clients, interleaved; each ratio is taken within a round "
                         "and the median over rounds is reported (a noisy neighbour then slows both sides of a ratio "
                         "instead of one)")
    ap.add_argument("--cpu-pack", default="all", choices=("all", "lm_head", "none"),
                    help="the server's --cpu-pack: which Linear weights it prepacks for oneDNN (none: F.linear, MKL)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where transformers and the server run (the server's --device; default: cuda if there is one)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="weights and KV cache dtype of both (the server's --dtype); other than float32, an fp32 "
                         "server on the same weights runs in the same rounds too (ratio_vs_fp32_server)")
    a = ap.parse_args()
    n_prompts = a.prompts or (16 if a.quick else 32)
    n_new = a.new_tokens or (16 if a.quick else 32)
    rounds = a.repeats if a.repeats > 0 else (2 if a.quick else 3)
    rng = random.Random(0)
    prompts = [[rng.randrange(1, 500) for _ in range(rng.randint(8, 40))] for _ in range(n_prompts)]
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "m", a.size)
        hf = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, a.dtype)).to(a.device).eval()
        print(f"model {a.size}: {sum(p.numel() for p in hf.parameters()) / 1e6:.0f}M params, {a.dtype} on {a.device}; "
              f"{n_prompts} prompts of 8-40 tokens, {n_new} new tokens each; torch threads {torch.get_num_threads()}",
              flush=True)
        hf.generate(torch.tensor([prompts[0]], device=hf.device), max_new_tokens=2, pad_token_id=0)  # warm-up
        flags = dict(cpu_pack=a.cpu_pack) if a.device == "cpu" else dict(device=a.device)
        if a.dtype != "float32":
            flags["dtype"] = a.dtype
        gpu_free = torch.cuda.mem_get_info()[0] if hf.device.type == "cuda" else 0
        proc, port, _ = start_policy_server(model, max_batch_size=32, max_queue=256, max_context=1024, **flags)
        target = f"127.0.0.1:{port}"
        fp32 = None   # the same server in fp32, for the dtype's ratio in the same rounds
        if a.dtype != "float32":
            fp32, fp32_port, _ = start_policy_server(model, max_batch_size=32, max_queue=256, max_context=1024,
                                                     **{k: v for k, v in flags.items() if k != "dtype"})
        runs: dict[str, list[float]] = {"a": [], "b": [], "c32": [], "c32_fp32": [], "ttft1": [], "ttft2": [], "tok2": []}
        res = {}
        try:
            for clients in (1, 8):
                tps = res[f"server_{clients}_clients_tok_s"] = server_clients(target, prompts, n_new, clients)
                print(f"(c) server, {clients} concurrent clients: {tps:.1f} tok/s", flush=True)
            if gpu_free:
                res["server_gpu_mib"] = check_server_on_gpu(gpu_free)
            for r in range(rounds):   # the server idles (blocked on its queue) while transformers runs
                runs["a"].append(hf_one_at_a_time(hf, prompts, n_new))
                runs["b"].append(hf_static_batch(hf, prompts, n_new))
                runs["c32"].append(server_clients(target, prompts, n_new, 32))
                if fp32:
                    runs["c32_fp32"].append(server_clients(f"127.0.0.1:{fp32_port}", prompts, n_new, 32))
                print(f"round {r + 1}/{rounds}: (a) transformers one at a time {runs['a'][-1]:.1f} tok/s, "
                      f"(b) static batch of {n_prompts} {runs['b'][-1]:.1f} tok/s, "
                      f"(c) server at 32 clients {runs['c32'][-1]:.1f} tok/s"
                      + (f", the fp32 server {runs['c32_fp32'][-1]:.1f} tok/s" if fp32 else ""), flush=True)
                n_runs(target, prompts[:16], n_new, runs)
        finally:
            proc.stop()
            if fp32:
                fp32.stop()
    if runs["c32_fp32"]:
        per_round = [c / f for c, f in zip(runs["c32"], runs["c32_fp32"])]
        res.update(server_32_clients_fp32_tok_s=statistics.median(runs["c32_fp32"]),
                   ratio_vs_fp32_server=statistics.median(per_round),
                   ratio_vs_fp32_server_rounds=[round(x, 2) for x in per_round])
    for key, name in (("a", "one_at_a_time"), ("b", "static_batch"), ("c32", "server_32_clients")):
        res[f"{name}_tok_s"] = statistics.median(runs[key])
        res[f"{name}_runs"] = [round(x, 1) for x in runs[key]]
    for key, name in (("a", "one_at_a_time"), ("b", "static_batch")):
        per_round = [c / x for c, x in zip(runs["c32"], runs[key])]
        res[f"ratio_vs_{name}"] = statistics.median(per_round)
        res[f"ratio_vs_{name}_rounds"] = [round(x, 2) for x in per_round]
    ratios = [t2 / t1 for t1, t2 in zip(runs["ttft1"], runs["ttft2"])]
    res.update(ttft_n1_ms=statistics.median(runs["ttft1"]) * 1e3, ttft_n2_ms=statistics.median(runs["ttft2"]) * 1e3,
               ttft_n2_over_n1=statistics.median(ratios), ttft_n2_over_n1_rounds=[round(x, 2) for x in ratios],
               tok_s_n2=statistics.median(runs["tok2"]), n2_clients=min(16, n_prompts))
    res.update(quick=a.quick, model=a.size, prompts=n_prompts, new_tokens=n_new, device=a.device, dtype=a.dtype)
    if a.device == "cpu":
        res["cpu_pack"] = a.cpu_pack
    print(f"ratios at 32 clients (median over {rounds} rounds): {res['ratio_vs_one_at_a_time']:.2f}x one-at-a-time, "
          f"{res['ratio_vs_static_batch']:.2f}x static batch; n=2 over n=1 time to first token at "
          f"{res['n2_clients']} clients {res['ttft_n2_over_n1']:.2f}x")
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}))


if __name__ == "__main__":
    main()
