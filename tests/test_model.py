"""serve/model.py against transformers: packed prefill, decode over the slot cache, slot moves."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from serve.model import KVCache, StepLayout, from_hf


@pytest.fixture(params=["gpt2", "llama"])
def pair(request, tiny_gpt2, tiny_llama):
    path = tiny_gpt2 if request.param == "gpt2" else tiny_llama
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return hf, from_hf(hf)


def test_packed_prefill_and_decode_match_hf(pair):
    hf, m = pair
    cpu = torch.device("cpu")
    prompts = [torch.randint(0, m.args.vocab_size, (n,), generator=torch.Generator().manual_seed(n)) for n in (3, 11, 1, 6)]
    cache = KVCache(m.args, 6, 64, torch.float32, cpu)
    # the sequences live in slots 2..5: slot0 offsets must be honoured
    lay = StepLayout.build(2, [len(p) for p in prompts], [0] * 4, cpu)
    logits = m(torch.cat(prompts), lay, cache)
    with torch.no_grad():
        ref = torch.cat([hf(p[None]).logits[0] for p in prompts])
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)
    nxt = torch.tensor([7, 8, 9, 10])
    lay = StepLayout.build_decode(2, [len(p) for p in prompts], cpu)
    got = m(nxt, lay, cache)
    with torch.no_grad():
        ref = torch.stack([hf(torch.cat([p, nxt[i:i + 1]])[None]).logits[0, -1] for i, p in enumerate(prompts)])
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_slot_move_keeps_a_sequence_intact(pair):
    hf, m = pair
    cpu = torch.device("cpu")
    p = torch.tensor([4, 5, 6, 7, 8])
    cache = KVCache(m.args, 3, 32, torch.float32, cpu)
    m(p, StepLayout.build(2, [5], [0], cpu), cache)
    cache.move(2, 0, 5)
    lay = StepLayout.build_decode(0, [5], cpu)
    got = m(torch.tensor([9]), lay, cache)
    with torch.no_grad():
        ref = hf(torch.tensor([[4, 5, 6, 7, 8, 9]])).logits[0, -1:]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_unsupported_configs_are_refused():
    from transformers import GPT2Config

    from serve.model import args_from_hf_config
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        args_from_hf_config(GPT2Config(scale_attn_by_inverse_layer_idx=True))
