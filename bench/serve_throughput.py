"""Throughput of the policy server against transformers' generate and CTranslate2, measured in one run.

(a) transformers generate, one request at a time; (b) transformers generate on one static
padded batch of all prompts; (c) this server (a separate process, over gRPC) with 1, 8 and
32 concurrent clients; (d) CTranslate2 (on the CPU; an optional dependency: pip install -e
'.[bench]') on the same weights converted offline, `generate_batch` over all prompts at once
in float32 and in int8 (int8_float32), with torch's thread count. On the CPU, an int8 server
(`--quantize int8`) on the same weights runs too. (a), (b), (c) at 32 clients and (d) run in
interleaved rounds (--repeats); the ratios are taken within each round and their median is
reported: ratio_vs_ctranslate2_fp32 is our fp32 server over CTranslate2's float32,
ratio_vs_ctranslate2_best our fastest mode of the round over CTranslate2's fastest. Same model
(GPT-2-small-sized config, random init), same prompts (random token ids, 8-40 tokens), same
number of new tokens (EOS ignored so every request produces exactly that many). Each round also streams the first 16 prompts from 16 clients at once
as n=1 and as n=2 requests (the comparisons the RLHF loop asks for; sampled, temperature 1):
a request's time to first token is until every one of its samples has its first token, and
`ttft_n2_over_n1` is the median over rounds of the ratio of the two medians (one prefill per
request makes it ~1). Prints tokens/s and the ratios; the last line is one JSON object.

    python bench/serve_throughput.py            # full: 32 prompts x 32 new tokens
    python bench/serve_throughput.py --prompts 64   # two waves per client
    python bench/serve_throughput.py --quick    # a few minutes
    python bench/serve_throughput.py --quick --device cuda   # both sides on the GPU (the default when there is one)
    python bench/serve_throughput.py --quick --no-ctranslate2 --quantize none   # without (d) and the int8 server
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


CT2_COMPUTE_TYPES = {"ctranslate2_fp32": "float32", "ctranslate2_int8": "int8_float32"}
"""(d)'s runs: int8_float32 is int8 weights and matmuls, fp32 everything else (what --quantize int8 does)."""


def import_ctranslate2():
    try:
        import ctranslate2
    except ImportError:
        raise SystemExit("the CTranslate2 baseline needs the ctranslate2 package: pip install -e '.[bench]' "
                         "(or pip install ctranslate2==4.8.5); --no-ctranslate2 runs without it") from None
    return ctranslate2


def convert_for_ctranslate2(model: Path, out: Path) -> list[str]:
    """Converts the Hugging Face folder into a CTranslate2 model folder (offline, weights kept fp32;
    the compute type is chosen at load) and returns its vocabulary: the token string of each id.
    The converter takes the vocabulary from the tokenizer, which here (512 BPE tokens) is smaller
    than the model's 50257 embedding rows, and CTranslate2 requires the two to match; it has no
    option for that, so the spec's vocabulary is replaced after loading: the tokenizer's tokens at
    their ids, a placeholder for every other id."""
    from ctranslate2.converters import TransformersConverter
    from transformers import AutoConfig, AutoTokenizer
    n = AutoConfig.from_pretrained(model).vocab_size
    vocab = [f"<ct2_unused_{i}>" for i in range(n)]
    for token, i in AutoTokenizer.from_pretrained(model).get_vocab().items():
        if i < n:
            vocab[i] = token

    class FullVocabConverter(TransformersConverter):
        def _load(self):
            spec = super()._load()
            spec.register_vocabulary(vocab)
            return spec

    FullVocabConverter(str(model)).convert(str(out), force=True)
    return vocab


def ct2_static_batch(generator, vocab, prompts, n_new) -> tuple[float, list[list[int]]]:
    """(d): one generate_batch over all prompts, greedy, exactly n_new new tokens each (min_length keeps
    EOS out, as ignore_eos does for the server): (tokens/s, generated ids per prompt)."""
    tokens = [[vocab[i] for i in p] for p in prompts]
    t0 = time.perf_counter()
    res = generator.generate_batch(tokens, max_length=n_new, min_length=n_new, sampling_topk=1,
                                   include_prompt_in_result=False)
    dt = time.perf_counter() - t0
    ids = [r.sequences_ids[0] for r in res]
    assert all(len(x) == n_new for x in ids)
    return len(prompts) * n_new / dt, ids


def ct2_generators(model: Path, out: Path) -> tuple[dict, list[str]]:
    """CT2_COMPUTE_TYPES' generators on the converted model (warmed up), and its vocabulary."""
    ctranslate2 = import_ctranslate2()
    vocab = convert_for_ctranslate2(model, out)
    gens = {name: ctranslate2.Generator(str(out), device="cpu", compute_type=ct, inter_threads=1,
                                        intra_threads=torch.get_num_threads())
            for name, ct in CT2_COMPUTE_TYPES.items()}
    for g in gens.values():
        g.generate_batch([[vocab[1]]], max_length=2, sampling_topk=1)
    return gens, vocab


def server_tokens(target, prompts, n_new, clients) -> tuple[float, list[list[int]]]:
    """server_clients' run: (tokens/s, generated ids per prompt)."""
    with PolicyClient(target, timeout=600) as c:
        c.generate(prompts[0], max_new_tokens=2, temperature=0.0)  # warm-up
        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as ex:
            outs = list(ex.map(lambda p: c.generate(p, max_new_tokens=n_new, temperature=0.0, ignore_eos=True),
                               prompts))
        dt = time.perf_counter() - t0
    ids = [list(o.completions[0].token_ids) for o in outs]
    assert all(len(x) == n_new for x in ids)
    return len(prompts) * n_new / dt, ids


def server_clients(target, prompts, n_new, clients) -> float:
    """(c): len(prompts) greedy requests from `clients` concurrent clients, as generated tokens/s."""
    return server_tokens(target, prompts, n_new, clients)[0]


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


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="16 prompts x 16 tokens, 2 rounds")
    ap.add_argument("--size", default="gpt2-small", help="model preset of serve.make_policy")
    ap.add_argument("--prompts", type=int, default=0, help="number of prompts (default 32, one per client; quick 16)")
    ap.add_argument("--new-tokens", type=int, default=0, help="new tokens per prompt (default 32, quick 16)")
    ap.add_argument("--repeats", type=int, default=0,
                    help="(default 3, quick 2) rounds of (a), (b), (c) at 32 clients and (d), interleaved; each ratio is "
                         "taken within a round and the median over rounds is reported (a noisy neighbour then slows "
                         "both sides of a ratio instead of one)")
    ap.add_argument("--cpu-pack", default="all", choices=("all", "lm_head", "none"),
                    help="the server's --cpu-pack: which Linear weights it prepacks for oneDNN (none: F.linear, MKL)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where transformers and the server run (the server's --device; default: cuda if there is one)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="weights and KV cache dtype of both (the server's --dtype); other than float32, an fp32 "
                         "server on the same weights runs in the same rounds too (ratio_vs_fp32_server)")
    ap.add_argument("--quantize", default="int8", choices=("int8", "none"),
                    help="on the CPU, also a server with this --quantize on the same fp32 weights, in the same rounds "
                         "(server_32_clients_int8_tok_s, ratio_int8_vs_fp32_server); none: no such server")
    ap.add_argument("--no-ctranslate2", action="store_true",
                    help="skip (d), the CTranslate2 baseline (it runs on the CPU only: skipped on a GPU anyway)")
    return ap.parse_args()


def start_servers(model: Path, a: argparse.Namespace) -> dict:
    """The servers timed at 32 clients, by run name: 'c32' (--dtype, --device), 'c32_fp32' (when --dtype
    is not float32) and 'c32_int8' (--quantize int8 on the CPU). Each value: (process, target)."""
    flags = dict(cpu_pack=a.cpu_pack) if a.device == "cpu" else dict(device=a.device)
    variants = {"c32": dict(flags, **({"dtype": a.dtype} if a.dtype != "float32" else {}))}
    if a.dtype != "float32":
        variants["c32_fp32"] = flags
    if a.quantize != "none" and a.device == "cpu":
        variants["c32_int8"] = dict(flags, quantize=a.quantize)
    servers = {}
    try:
        for name, f in variants.items():
            proc, port, _ = start_policy_server(model, max_batch_size=32, max_queue=256, max_context=1024, **f)
            servers[name] = (proc, f"127.0.0.1:{port}")
    except BaseException:
        stop_servers(servers)
        raise
    return servers


def stop_servers(servers: dict) -> None:
    for proc, _ in servers.values():
        proc.stop()


def one_round(hf, servers, ct2, prompts, n_new, runs) -> None:
    """(a), (b), each server at 32 clients and (d), one after the other, appended to runs; the
    servers idle (blocked on their queues) while the others run."""
    runs["a"].append(hf_one_at_a_time(hf, prompts, n_new))
    runs["b"].append(hf_static_batch(hf, prompts, n_new))
    for name, (_, target) in servers.items():
        tps, ids = server_tokens(target, prompts, n_new, 32)
        runs[name].append(tps)
        runs[f"{name}_ids"] = ids
    gens, vocab = ct2
    for name, gen in gens.items():
        tps, ids = ct2_static_batch(gen, vocab, prompts, n_new)
        runs[name].append(tps)
        runs[f"{name}_ids"] = ids
    line = ", ".join(f"{RUN_NAMES[k]} {runs[k][-1]:.1f}" for k in RUN_NAMES if runs.get(k))
    print(f"round {len(runs['a'])}: tok/s {line}", flush=True)


RUN_NAMES = {"a": "(a) transformers one at a time", "b": "(b) static batch", "c32": "(c) server at 32 clients",
             "c32_fp32": "the fp32 server", "c32_int8": "the int8 server", "ctranslate2_fp32": "(d) CTranslate2 float32",
             "ctranslate2_int8": "(d) CTranslate2 int8_float32"}


def per_round(num: list[float], den: list[float]) -> tuple[float, list[float]]:
    ratios = [x / y for x, y in zip(num, den)]
    return statistics.median(ratios), [round(x, 2) for x in ratios]


def ct2_results(runs: dict, res: dict, dtype: str) -> None:
    """(d)'s medians and the ratios against it: our fp32 server over CTranslate2's float32, and our
    fastest mode over CTranslate2's fastest, each within a round; plus how many prompts' greedy
    tokens CTranslate2 float32 and our fp32 server agree on (a check that both ran the same model)."""
    ours = {k: runs[k] for k in ("c32", "c32_fp32", "c32_int8") if runs.get(k)}
    ours_fp32 = "c32" if dtype == "float32" else "c32_fp32"
    theirs = {k: runs[k] for k in CT2_COMPUTE_TYPES}
    for k, v in theirs.items():
        res[f"{k}_tok_s"] = statistics.median(v)
        res[f"{k}_runs"] = [round(x, 1) for x in v]
    res["ratio_vs_ctranslate2_fp32"], res["ratio_vs_ctranslate2_fp32_rounds"] = per_round(
        ours[ours_fp32], theirs["ctranslate2_fp32"])
    best_ours = [max(r) for r in zip(*ours.values())]
    best_theirs = [max(r) for r in zip(*theirs.values())]
    res["ratio_vs_ctranslate2_best"], res["ratio_vs_ctranslate2_best_rounds"] = per_round(best_ours, best_theirs)
    modes = {"c32": dtype, "c32_fp32": "float32", "c32_int8": "int8"}
    res["best_mode"] = modes[max(ours, key=lambda k: statistics.median(ours[k]))]
    res["ctranslate2_best_mode"] = CT2_COMPUTE_TYPES[max(theirs, key=lambda k: statistics.median(theirs[k]))]
    same = [x == y for x, y in zip(runs[f"{ours_fp32}_ids"], runs["ctranslate2_fp32_ids"])]
    res["ctranslate2_fp32_same_tokens"] = sum(same) / len(same)


def summarize(runs: dict, a: argparse.Namespace) -> dict:
    res: dict = {}
    if runs.get("c32_fp32"):
        res["server_32_clients_fp32_tok_s"] = statistics.median(runs["c32_fp32"])
        res["ratio_vs_fp32_server"], res["ratio_vs_fp32_server_rounds"] = per_round(runs["c32"], runs["c32_fp32"])
    if runs.get("c32_int8"):
        fp32 = runs["c32"] if a.dtype == "float32" else runs["c32_fp32"]
        res["server_32_clients_int8_tok_s"] = statistics.median(runs["c32_int8"])
        res["server_32_clients_int8_runs"] = [round(x, 1) for x in runs["c32_int8"]]
        res["ratio_int8_vs_fp32_server"], res["ratio_int8_vs_fp32_server_rounds"] = per_round(runs["c32_int8"], fp32)
    for key, name in (("a", "one_at_a_time"), ("b", "static_batch"), ("c32", "server_32_clients")):
        res[f"{name}_tok_s"] = statistics.median(runs[key])
        res[f"{name}_runs"] = [round(x, 1) for x in runs[key]]
    for key, name in (("a", "one_at_a_time"), ("b", "static_batch")):
        res[f"ratio_vs_{name}"], res[f"ratio_vs_{name}_rounds"] = per_round(runs["c32"], runs[key])
    if runs.get("ctranslate2_fp32"):
        ct2_results(runs, res, a.dtype)
    ratios = [t2 / t1 for t1, t2 in zip(runs["ttft1"], runs["ttft2"])]
    res.update(ttft_n1_ms=statistics.median(runs["ttft1"]) * 1e3, ttft_n2_ms=statistics.median(runs["ttft2"]) * 1e3,
               ttft_n2_over_n1=statistics.median(ratios), ttft_n2_over_n1_rounds=[round(x, 2) for x in ratios])
    return res


def main() -> None:
    a = parse_args()
    n_prompts = a.prompts or (16 if a.quick else 32)
    n_new = a.new_tokens or (16 if a.quick else 32)
    rounds = a.repeats if a.repeats > 0 else (2 if a.quick else 3)
    rng = random.Random(0)
    prompts = [[rng.randrange(1, 500) for _ in range(rng.randint(8, 40))] for _ in range(n_prompts)]
    with_ct2 = not a.no_ctranslate2 and a.device == "cpu"
    if with_ct2:
        import_ctranslate2()   # before anything slow: a missing package says so at once
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "m", a.size)
        hf = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, a.dtype)).to(a.device).eval()
        print(f"model {a.size}: {sum(p.numel() for p in hf.parameters()) / 1e6:.0f}M params, {a.dtype} on {a.device}; "
              f"{n_prompts} prompts of 8-40 tokens, {n_new} new tokens each; torch threads {torch.get_num_threads()}",
              flush=True)
        hf.generate(torch.tensor([prompts[0]], device=hf.device), max_new_tokens=2, pad_token_id=0)  # warm-up
        ct2 = ct2_generators(model, Path(tmp) / "ct2") if with_ct2 else ({}, [])
        if not with_ct2:
            print("(d) CTranslate2: skipped" + (" (CPU only)" if a.device != "cpu" else ""), flush=True)
        gpu_free = torch.cuda.mem_get_info()[0] if hf.device.type == "cuda" else 0
        servers = start_servers(model, a)
        target = servers["c32"][1]
        runs: dict[str, list] = {k: [] for k in ("a", "b", *servers, *ct2[0], "ttft1", "ttft2", "tok2")}
        res = {}
        try:
            for clients in (1, 8):
                tps = res[f"server_{clients}_clients_tok_s"] = server_clients(target, prompts, n_new, clients)
                print(f"(c) server, {clients} concurrent clients: {tps:.1f} tok/s", flush=True)
            if gpu_free:
                res["server_gpu_mib"] = check_server_on_gpu(gpu_free)
            for _ in range(rounds):
                one_round(hf, servers, ct2, prompts, n_new, runs)
                n_runs(target, prompts[:16], n_new, runs)
        finally:
            stop_servers(servers)
    res.update(summarize(runs, a))
    res.update(tok_s_n2=statistics.median(runs["tok2"]), n2_clients=min(16, n_prompts))
    res.update(quick=a.quick, model=a.size, prompts=n_prompts, new_tokens=n_new, device=a.device, dtype=a.dtype)
    if a.device == "cpu":
        res["cpu_pack"] = a.cpu_pack
    report(res, rounds)


def report(res: dict, rounds: int) -> None:
    """The summary line, then the JSON object (the last line)."""
    line = (f"ratios at 32 clients (median over {rounds} rounds): {res['ratio_vs_one_at_a_time']:.2f}x one-at-a-time, "
            f"{res['ratio_vs_static_batch']:.2f}x static batch")
    if "ratio_int8_vs_fp32_server" in res:
        line += f"; int8 server {res['ratio_int8_vs_fp32_server']:.2f}x the fp32 server"
    if "ratio_vs_ctranslate2_fp32" in res:
        line += (f"; fp32 {res['ratio_vs_ctranslate2_fp32']:.2f}x CTranslate2 float32, best ({res['best_mode']}) "
                 f"{res['ratio_vs_ctranslate2_best']:.2f}x CTranslate2's best ({res['ctranslate2_best_mode']})")
    print(line + f"; n=2 over n=1 time to first token at {res['n2_clients']} clients {res['ttft_n2_over_n1']:.2f}x")
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}))


if __name__ == "__main__":
    main()
