"""The serving engine on a CUDA GPU against transformers (run by scripts/gpu_check.sh; skipped
without CUDA): greedy decoding through serve.engine (continuous batching, the slot KV cache,
the Triton sampling kernel) gives transformers' `generate` tokens, in fp32 and in bf16 (the
server's --dtype)."""
from __future__ import annotations

import pytest
import torch

from serve.loader import load_policy
from tests import helpers

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = "cuda"

PROMPTS = [[5, 17, 33], [100, 2, 7, 9, 250, 31, 77, 12, 401], [42], [3, 9, 27, 81, 243, 11], list(range(60, 95))]
N_NEW = 24


def engine_greedy(path, dtype: torch.dtype, device: str, prompts=PROMPTS, n_new: int = N_NEW):
    """Every prompt submitted at once (one batch): [(tokens, logprobs)] per prompt."""
    pol = load_policy(path, dtype=dtype, device=device)
    return helpers.engine_greedy(pol.model, prompts, pol.eos_id, n_new, max_batch_size=8)


def hf_model(path, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).to(device).eval()


def hf_greedy(hf, prompt: list[int], n_new: int = N_NEW) -> list[int]:
    ids = torch.tensor([prompt], device=hf.device)
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n_new,
                      pad_token_id=hf.generation_config.eos_token_id)
    return out[0, len(prompt):].tolist()


@torch.no_grad()
def hf_logits(hf, prompt: list[int], out: list[int]) -> torch.Tensor:
    """transformers' fp32 logits (len(out), V) at each generated position, given our tokens before it."""
    ids = torch.tensor([prompt + out], device=hf.device)
    return hf(ids).logits[0, len(prompt) - 1:-1].float()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cuda_fp32_greedy_equals_transformers_generate(arch, tiny_gpt2, tiny_llama):
    path = tiny_gpt2 if arch == "gpt2" else tiny_llama
    got = engine_greedy(path, torch.float32, DEVICE)
    hf = hf_model(path, torch.float32, DEVICE)
    for p, (toks, lps) in zip(PROMPTS, got):
        assert toks == hf_greedy(hf, p), f"prompt {p}"
        # the logprob the Triton sampling kernel returned (T = 1 for greedy) against log_softmax
        ref = torch.log_softmax(hf_logits(hf, p, toks), -1).gather(1, torch.tensor(toks, device=DEVICE)[:, None])
        torch.testing.assert_close(torch.tensor(lps), ref[:, 0].cpu(), atol=1e-4, rtol=0)


# The tiny models' logits have std ~0.16 and a median top-2 margin ~0.3; bf16 moves them by ~0.005
# (measured against fp32 on the CPU). Within BF16_TIE of each other two tokens are a near-tie.
BF16_TIE = 0.05


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cuda_bf16_greedy_follows_transformers(arch, tiny_gpt2, tiny_llama):
    """bf16 rounds each op, and the two implementations fuse and order them differently, so greedy
    decoding may part at a near-tie. Every token we chose must be transformers' greedy choice given
    our prefix, up to a near-tie; up to the first near-tie the tokens are generate's."""
    path = tiny_gpt2 if arch == "gpt2" else tiny_llama
    got = engine_greedy(path, torch.bfloat16, DEVICE)
    hf = hf_model(path, torch.bfloat16, DEVICE)
    for p, (toks, _) in zip(PROMPTS, got):
        logits = hf_logits(hf, p, toks)
        below = logits.max(-1).values - logits.gather(1, torch.tensor(toks, device=DEVICE)[:, None])[:, 0]
        assert below.max() <= BF16_TIE, f"prompt {p}: our token is {below.max():.3f} below transformers' greedy one"
        top2 = logits.topk(2, -1).values
        ties = ((top2[:, 0] - top2[:, 1]) <= BF16_TIE).nonzero()
        first_tie = int(ties[0]) if len(ties) else len(toks)
        assert toks[:first_tie] == hf_greedy(hf, p)[:first_tie], f"prompt {p}"


def _run(engine, reqs):
    from serve.engine import DoneEvent
    for r in reqs:
        done = 0
        while done < r.spec.n:
            done += isinstance(r.events.get(timeout=120), DoneEvent)
    return reqs


def test_cuda_n_samples_share_one_prefill_and_a_kept_prefix_is_reused(tiny_llama):
    """Issue 20 on CUDA: an n=3 request prefills its prompt once and its samples draw what n=1 requests
    with seeds seed+i draw; a continued conversation prefills only its new tokens and answers as a
    full prefill does (greedy)."""
    from serve.engine import Engine, EngineConfig, Request, SamplingSpec
    pol = load_policy(tiny_llama, dtype=torch.float32, device=DEVICE)
    stats: list[dict] = []
    engine = Engine(pol.model, EngineConfig(max_batch_size=8, max_context=256, prefix_reuse_min_tokens=4),
                    pol.eos_id, pol.decode, pol.version, on_step=stats.append).start()
    spec = SamplingSpec(temperature=1.0, top_p=0.95, max_new_tokens=20, seed=7, n=3, ignore_eos=True)
    try:
        three = _run(engine, [engine.submit(Request(prompt=PROMPTS[1], spec=spec))])[0]
        assert sum(s["prefill_tokens"] for s in stats) == len(PROMPTS[1])
        alone = _run(engine, [engine.submit(Request(prompt=PROMPTS[1], spec=SamplingSpec(
            temperature=1.0, top_p=0.95, max_new_tokens=20, seed=7 + i, ignore_eos=True))) for i in range(3)])
        assert [s.out for s in three.seqs] == [r.seqs[0].out for r in alone]
        greedy = SamplingSpec(temperature=0.0, max_new_tokens=N_NEW, ignore_eos=True)
        first = _run(engine, [engine.submit(Request(prompt=PROMPTS[4], spec=greedy))])[0]
        go_on = PROMPTS[4] + first.seqs[0].out + [5, 6, 7]
        del stats[:]
        cont = _run(engine, [engine.submit(Request(prompt=go_on, spec=greedy))])[0]
        assert sum(s["prefill_tokens"] for s in stats) == 4   # first's last token and the 3 new ones
    finally:
        engine.stop()
    assert cont.seqs[0].out == engine_greedy(tiny_llama, torch.float32, DEVICE, prompts=[go_on])[0][0]
