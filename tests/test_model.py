"""serve/model.py against transformers: packed prefill, decode over the slot cache, slot moves."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from serve.model import KVCache, PackedLinear, StepLayout, from_hf, num_parameters, pack_for_cpu, transposed


@pytest.fixture(params=[("gpt2", "none"), ("llama", "none"), ("gpt2", "all"), ("llama", "all")], ids="-".join)
def pair(request, tiny_gpt2, tiny_llama):
    """(transformers model, our model) with every Linear plain (MKL) or prepacked for oneDNN (what serving uses)."""
    arch, pack = request.param
    path = tiny_gpt2 if arch == "gpt2" else tiny_llama
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    m = pack_for_cpu(from_hf(hf), pack)
    assert isinstance(m.blocks[0].mlp.down_proj, PackedLinear) == (pack == "all" and torch.backends.mkldnn.is_available())
    return hf, m


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


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch build")
@pytest.mark.parametrize("rows", [1, 7, 32, 300])
def test_packed_linear_equals_linear(rows):
    torch.manual_seed(rows)
    for k, n, bias in ((768, 3072, True), (64, 1000, False), (3072, 768, True)):
        lin = torch.nn.Linear(k, n, bias=bias)
        x = torch.randn(2, rows, k)          # any leading shape
        with torch.inference_mode():
            got, ref = PackedLinear(lin)(x), lin(x)
        assert got.shape == ref.shape
        # the same sum in another order: ~1e-6 of the output's scale
        torch.testing.assert_close(got, ref, atol=2e-5 * ref.abs().max().item(), rtol=0)


def test_num_parameters_is_the_checkpoints_whatever_the_packing(tiny_gpt2, tiny_llama):
    for path in (tiny_gpt2, tiny_llama):
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        want = hf.num_parameters()
        for pack in ("none", "lm_head", "all"):
            assert num_parameters(pack_for_cpu(from_hf(hf), pack)) == want, (path, pack)


@pytest.mark.parametrize("shape", [(768, 2304), (300, 517), (5, 3), (256, 256)])
def test_transposed_equals_a_plain_transposed_copy(shape):
    w = torch.randn(shape)
    t = transposed(w)
    assert t.is_contiguous() and torch.equal(t, w.t().contiguous())
    col = w[:, 1:]   # a column slice (non-contiguous), as the fused qkv weight is split
    assert torch.equal(transposed(col), col.t().contiguous())
