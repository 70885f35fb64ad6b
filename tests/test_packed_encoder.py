"""The reward model's encoder on real tokens only (serve/packed_encoder.py) against transformers'
BertModel on the padded batch: the same hidden states, pooled scores and gradients; other backbones
keep the HF forward."""
from __future__ import annotations

import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

from serve import packed_encoder, reward_model
from serve.reward_model import mean_pool


def tiny(**kw) -> BertModel:
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=48, max_position_embeddings=16, **kw))


def ragged_batch():
    """(4, 9) ids with rows of 9, 1, 5 and 3 real tokens (right-padded), two segments where long enough."""
    g = torch.Generator().manual_seed(1)
    lengths = [9, 1, 5, 3]
    ids = torch.randint(1, 50, (4, 9), generator=g)
    mask = (torch.arange(9)[None] < torch.tensor(lengths)[:, None]).long()
    types = ((torch.arange(9)[None] >= 2) & mask.bool()).long()
    return ids * mask, mask, types


def test_hidden_states_equal_bertmodels_at_the_real_positions():
    bert = tiny().eval()
    ids, mask, types = ragged_batch()
    with torch.no_grad():
        ref = bert(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state   # (4, 9, 32)
        h, idx = packed_encoder.packed_hidden(bert, ids, mask, types)
    assert h.shape == (int(mask.sum()), 32) and idx.tolist() == mask.flatten().nonzero().squeeze(1).tolist()
    torch.testing.assert_close(h, ref.flatten(0, 1)[idx], atol=1e-5, rtol=1e-5)
    pooled = packed_encoder.packed_mean_pool(h, idx, mask * types)
    torch.testing.assert_close(pooled, mean_pool(ref, mask * types), atol=1e-5, rtol=1e-5)
    assert pooled[1].abs().sum() == 0   # a row with no token to pool: zeros, as mean_pool gives


def test_gradients_equal_the_padded_forwards():
    ids, mask, types = ragged_batch()
    w = mask * types + (mask * types).sum(1, keepdim=True).eq(0) * mask    # rows without segment 1: all
    grads = []
    for packed in (False, True):
        bert = tiny(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
        if packed:
            h, idx = packed_encoder.packed_hidden(bert, ids, mask, types)
            pooled = packed_encoder.packed_mean_pool(h, idx, w)
        else:
            pooled = mean_pool(bert(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state, w)
        (pooled * torch.linspace(-1, 1, 32)).sum().backward()
        grads.append({n: p.grad.clone() for n, p in bert.named_parameters() if p.grad is not None})
    hf, ours = grads
    assert set(ours) == set(hf) - {n for n in hf if n.startswith("pooler.")}   # the RM never uses BERT's pooler
    for n, g in ours.items():
        torch.testing.assert_close(g, hf[n], atol=1e-5, rtol=1e-4, msg=n)


def test_dropout_is_applied_in_training_only():
    bert = tiny(hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5)
    ids, mask, types = ragged_batch()
    with torch.no_grad():
        bert.eval()
        a, _ = packed_encoder.packed_hidden(bert, ids, mask, types)
        b, _ = packed_encoder.packed_hidden(bert, ids, mask, types)
        bert.train()
        c, _ = packed_encoder.packed_hidden(bert, ids, mask, types)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_which_backbones_run_packed():
    assert packed_encoder.supports(tiny())
    assert not packed_encoder.supports(tiny(position_embedding_type="relative_key"))
    assert not packed_encoder.supports(GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)))


def test_reward_model_scores_are_the_same_either_way(tiny_bert, monkeypatch):
    rm, tok = reward_model.build(tiny_bert, 32, relevance=True)
    texts = ["\n\nHuman: hi there\n\nAssistant: hello, how can I help?",
             "\n\nHuman: tell me a long story about rivers and stones please\n\nAssistant: no."]
    enc = reward_model.encode(tok, texts, rm.rcfg)
    assert enc["attention_mask"][1].sum() > enc["attention_mask"][0].sum()   # padded: the case that matters
    with torch.no_grad():
        packed = rm(**enc)
        monkeypatch.setattr(packed_encoder, "supports", lambda m: False)
        padded = rm(**enc)
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)
