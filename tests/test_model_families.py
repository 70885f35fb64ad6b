"""Every model family of serve/model.py against transformers (issue 17): random-initialised
checkpoints built locally with small odd shapes (GQA ratios 1, 3 and 8, head dims that are not
powers of two, vocabularies that are not multiples of 64), saved and loaded back, then
(a) packed prefill + decode logits equal to transformers' to 1e-4 in fp32, (b) greedy tokens of
16 concurrent engine requests equal to `generate`, with logprobs equal to teacher-forced
log_softmax, (c) one PPO iteration runs, (d) what is not implemented is refused by name."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from transformers import AutoModelForCausalLM

from serve.model import (SUPPORTED, KVCache, StepLayout, args_from_hf_config, from_hf, num_parameters, pack_for_cpu,
                         sequence_logits)
from tests.helpers import engine_greedy

# prompt lengths 1..64 of the 16 concurrent requests
PROMPT_LENS = (1, 2, 3, 5, 8, 11, 16, 19, 24, 29, 33, 40, 47, 53, 60, 64)
N_NEW = 8
COMMON = dict(num_hidden_layers=2, max_position_embeddings=256, initializer_range=0.2, eos_token_id=2,
              bos_token_id=1, pad_token_id=0)

# name -> (config class, kwargs): what each family adds, in shapes chosen to catch layout bugs
FAMILIES = {
    # Llama 3.1 scaling: original context 64 puts the head's wavelengths (6.3, 40, 251, ...) in all
    # three bands (kept, smoothed, divided); GQA 3, head_dim 10, tied embeddings
    "llama3": (tf.LlamaConfig, dict(vocab_size=301, hidden_size=60, intermediate_size=88, num_attention_heads=6,
                                    num_key_value_heads=2, tie_word_embeddings=True,
                                    rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0,
                                                         low_freq_factor=1.0, high_freq_factor=4.0,
                                                         original_max_position_embeddings=64))),
    # linear position interpolation; GQA 8 (one KV head), untied
    "llama-linear": (tf.LlamaConfig, dict(vocab_size=317, hidden_size=64, intermediate_size=96,
                                          num_attention_heads=8, num_key_value_heads=1, tie_word_embeddings=False,
                                          rope_parameters=dict(rope_type="linear", rope_theta=500.0, factor=3.0))),
    # sliding window 24, shorter than the prompts: the window is applied, not ignored; GQA 1, head_dim 12
    "mistral": (tf.MistralConfig, dict(vocab_size=251, hidden_size=48, intermediate_size=80, num_attention_heads=4,
                                       num_key_value_heads=4, sliding_window=24)),
    # q/k/v biases (o_proj none); GQA 8, tied
    "qwen2": (tf.Qwen2Config, dict(vocab_size=263, hidden_size=64, intermediate_size=72, num_attention_heads=8,
                                   num_key_value_heads=1, tie_word_embeddings=True)),
    # q/k RMSNorm; head_dim 12 explicit while hidden / heads = 40 / 6 is not even an integer; GQA 3
    "qwen3": (tf.Qwen3Config, dict(vocab_size=277, hidden_size=40, intermediate_size=64, num_attention_heads=6,
                                   num_key_value_heads=2, head_dim=12, tie_word_embeddings=False)),
    # Pythia: parallel residual, rotary on int(18 * 0.25) = 4 of 18 dims, exact GELU, untied embed_out
    "neox-parallel": (tf.GPTNeoXConfig, dict(vocab_size=293, hidden_size=72, intermediate_size=100,
                                             num_attention_heads=4, rotary_pct=0.25, use_parallel_residual=True,
                                             layer_norm_eps=1e-5)),
    "neox-serial": (tf.GPTNeoXConfig, dict(vocab_size=307, hidden_size=48, intermediate_size=64,
                                           num_attention_heads=4, rotary_pct=0.5, use_parallel_residual=False,
                                           hidden_act="gelu_new", rotary_emb_base=2000)),
}


def _build(name: str, root) -> str:
    cls, kw = FAMILIES[name]
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cls(**COMMON, **kw))
    with torch.no_grad():   # HF inits biases to 0 and norm weights to 1: perturb them, or their mapping goes untested
        for q in hf.parameters():
            if q.dim() == 1:
                q.add_(torch.randn_like(q) * 0.1)
    path = root / name
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, transformers model loaded back from its folder, our model from it)."""
    path = _build(request.param, tmp_path_factory.mktemp("families"))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
    return request.param, hf, from_hf(hf)


def _prompts(vocab: int, lens=PROMPT_LENS) -> list[list[int]]:
    g = torch.Generator().manual_seed(len(lens))
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


@torch.no_grad()
def _hf_logits(hf, ids: list[int]) -> torch.Tensor:
    return hf(torch.tensor([ids])).logits[0].float()


def test_family_is_mapped_with_its_switches(family):
    """The config reading itself: a wrong switch could still pass parity by luck of init."""
    name, hf, m = family
    a, cfg = m.args, hf.config
    assert a.arch == cfg.model_type
    kv = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)    # GPT-NeoX has no GQA
    assert (a.n_head, a.n_kv_head) == (cfg.num_attention_heads, kv)
    want = {"llama3": dict(rope_type="llama3", tie_embeddings=True), "llama-linear": dict(rope_type="linear"),
            "mistral": dict(sliding_window=24), "qwen2": dict(attn_bias=True, o_bias=False),
            "qwen3": dict(qk_norm=True, head_dim=12),
            "neox-parallel": dict(rotary_dim=4, parallel_residual=True, act="gelu", tie_embeddings=False),
            "neox-serial": dict(rotary_dim=6, parallel_residual=False, act="gelu_tanh", rope_theta=2000.0)}[name]
    assert {k: getattr(a, k) for k in want} == want
    assert num_parameters(m) == hf.num_parameters()   # nothing left out or duplicated (tied heads once)


def test_packed_prefill_and_decode_logits_match_transformers(family):
    """(a) Five sequences of 1..64 tokens in one packed prefill (slots 1..5), then three decode
    steps through the cache: logits and logprobs equal transformers' full forward to 1e-4."""
    _, hf, m = family
    cpu = torch.device("cpu")
    prompts = _prompts(m.args.vocab_size, (7, 1, 64, 23, 40))
    cache = KVCache(m.args, 6, 96, torch.float32, cpu)
    got = m(torch.tensor(sum(prompts, [])), StepLayout.build(1, [len(p) for p in prompts], [0] * 5, cpu), cache)
    ref = torch.cat([_hf_logits(hf, p) for p in prompts])
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.log_softmax(-1), ref.log_softmax(-1), atol=1e-4, rtol=0)
    seqs = [list(p) for p in prompts]
    for step in range(3):
        nxt = [(7 * i + 3 * step + 5) % m.args.vocab_size for i in range(5)]
        got = m(torch.tensor(nxt), StepLayout.build_decode(1, [len(s) for s in seqs], cpu), cache)
        for s, t in zip(seqs, nxt):
            s.append(t)
        ref = torch.stack([_hf_logits(hf, s)[-1] for s in seqs])
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
        torch.testing.assert_close(got.log_softmax(-1), ref.log_softmax(-1), atol=1e-4, rtol=0)


def _engine_greedy(m, prompts: list[list[int]], eos_id: int) -> list[tuple[list[int], list[float]]]:
    return engine_greedy(m, prompts, eos_id, N_NEW, max_batch_size=16, max_context=128)


def test_engine_greedy_equals_transformers_generate(family):
    """(b) 16 concurrent requests (prompts of 1..64 tokens) through the serving engine with every
    Linear prepacked as served: tokens equal `generate`'s greedy ones, logprobs equal
    teacher-forced log_softmax to 1e-4."""
    _, hf, m = family
    eos = hf.config.eos_token_id
    prompts = _prompts(m.args.vocab_size)
    got = _engine_greedy(pack_for_cpu(copy.deepcopy(m), "all"), prompts, eos)
    for p, (toks, lps) in zip(prompts, got):
        ids = torch.tensor([p])
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=N_NEW,
                           eos_token_id=eos, pad_token_id=0)[0, len(p):].tolist()
        assert toks == want, (len(p), toks, want)
        ref = _hf_logits(hf, p + toks)[len(p) - 1:-1].log_softmax(-1)
        ref = ref.gather(1, torch.tensor(toks)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(lps), ref, atol=1e-4, rtol=0)


def test_one_ppo_iteration_runs_and_the_result_loads_in_plain_transformers(family, tmp_path):
    """(c) Rollouts through the engine (serve.model.from_hf of the live policy), then a PPO update
    of the transformers policy and critic: finite statistics and weights that moved. The updated
    policy, saved as the trainer publishes it (save_pretrained, safetensors), loads with plain
    `from_pretrained` and gives the same logits, in transformers and in our model."""
    from train.ppo import PPOConfig, PPOTrainer, build_critic
    _, hf, _ = family
    policy = copy.deepcopy(hf).train(False)
    ref = copy.deepcopy(hf)
    tr = PPOTrainer(policy, ref, build_critic(policy), PPOConfig(minibatch=4, ppo_epochs=1, max_new_tokens=5,
                    value_warmup_epochs=0, lr=1e-3), pad_id=0, end_ids=hf.config.eos_token_id)
    before = [p.detach().clone() for p in policy.parameters()]
    prompts = _prompts(hf.config.vocab_size, (3, 9, 1, 17, 5, 12, 2, 30))
    score = lambda ps, rs: torch.tensor([float(len(r)) for r in rs])  # noqa: E731
    stats = tr.iteration(prompts, score, seed=0)
    assert "nan" not in stats and stats["response_tokens"] > 0, stats
    moved = sum(not torch.equal(b, p) for b, p in zip(before, policy.parameters()))
    assert moved == len(before), f"{moved} of {len(before)} parameters changed"
    policy.save_pretrained(tmp_path / "policy", safe_serialization=True)
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "policy", dtype=torch.float32, local_files_only=True).eval()
    ids = prompts[7]
    with torch.no_grad():
        want = _hf_logits(policy.eval(), ids)
        torch.testing.assert_close(_hf_logits(out, ids), want, atol=1e-5, rtol=0)
        ours = sequence_logits(from_hf(out), ids, 1)               # (len - 1, V): positions 0 .. len-2
        torch.testing.assert_close(ours, want[:-1], atol=1e-4, rtol=0)


def test_unsupported_model_types_are_refused_by_name():
    """(d) A model_type we do not implement fails at load, naming it and what is supported."""
    torch.manual_seed(0)
    for cfg in (tf.OPTConfig(vocab_size=67, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32),
                tf.BloomConfig(vocab_size=67, hidden_size=16, n_layer=1, n_head=2)):
        with pytest.raises(ValueError) as e:
            from_hf(AutoModelForCausalLM.from_config(cfg))
        msg = str(e.value)
        assert repr(cfg.model_type) in msg and all(t in msg for t in SUPPORTED), msg


def test_unsupported_rope_and_window_options_are_refused_by_name():
    small = dict(vocab_size=67, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2, max_position_embeddings=128)
    for rope in (dict(rope_type="yarn", rope_theta=10000.0, factor=2.0, original_max_position_embeddings=64),
                 dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0)):
        with pytest.raises(ValueError, match=f"rope scaling type '{rope['rope_type']}'"):
            args_from_hf_config(tf.LlamaConfig(**small, rope_parameters=rope))
    # Qwen2 windows only some layers (max_window_layers): not implemented, so refused when active
    with pytest.raises(ValueError, match="use_sliding_window"):
        args_from_hf_config(tf.Qwen2Config(**small, use_sliding_window=True, sliding_window=32, max_window_layers=0))
    # a window no shorter than the context is no window
    assert args_from_hf_config(tf.MistralConfig(**small, sliding_window=128)).sliding_window is None
