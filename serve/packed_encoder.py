"""A BERT-family encoder run on its real tokens only ("unpadding", as MosaicBERT and FlashAttention's
varlen BERT do): the reward model's batches are padded to their longest text, and on the RM benchmark's
batches a fifth of the positions are padding that every Linear, GELU and LayerNorm would compute and
throw away. Here the Linears and norms run on the (N, H) real tokens; only attention, which needs the
sequences apart, scatters them into a (B, T) layout and back.

Same weights and the same math as transformers' BertModel (the HF module's own submodules and weights
are used, dropout where BERT has it); `packed_hidden` equals its `last_hidden_state` at the real
positions (tests/test_packed_encoder.py). `supports` says when a backbone can run this way; anything
else (other encoders, relative positions, FSDP-sharded weights whose gathering hooks sit on the layers)
keeps the HF forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def supports(backbone: torch.nn.Module) -> bool:
    """A plain BertModel (absolute positions, no chunked feed-forward, an encoder) whose weights are
    ordinary tensors (not FSDP-sharded DTensors)."""
    cfg = getattr(backbone, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) != "bert" or getattr(cfg, "is_decoder", False):
        return False
    if getattr(cfg, "position_embedding_type", "absolute") != "absolute" or getattr(cfg, "chunk_size_feed_forward", 0):
        return False
    if not (hasattr(backbone, "embeddings") and hasattr(backbone, "encoder")):
        return False
    # the attention written here is eager's and sdpa's; a registered custom one, or gradient
    # checkpointing (which this forward would silently drop), keeps the HF forward
    if getattr(cfg, "_attn_implementation", "eager") not in ("eager", "sdpa") or \
            getattr(backbone, "is_activation_checkpointing", getattr(backbone, "gradient_checkpointing", False)):
        return False
    return all(type(p) is torch.nn.Parameter or type(p) is torch.Tensor for p in backbone.parameters())


def packed_hidden(bert: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids, mask (1 = real token, any positions) and segments -> ((N, H) last hidden states of
    the N real tokens in row-major order, (N,) their flat index b * T + t)."""
    B, T = input_ids.shape
    real = attention_mask.bool()
    idx = real.flatten().nonzero().squeeze(1)                                     # (N,)
    pos = torch.arange(T, device=input_ids.device).repeat(B)[idx]
    seg = (torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids).flatten()[idx]
    e = bert.embeddings
    h = e.word_embeddings(input_ids.flatten()[idx]) + e.token_type_embeddings(seg) + e.position_embeddings(pos)
    h = e.dropout(e.LayerNorm(h))                                                 # (N, H)
    H = h.shape[1]
    nh = bert.config.num_attention_heads
    keys = real[:, None, None, :]                                                 # (B, 1, 1, T): keys a query may see
    for layer in bert.encoder.layer:
        sa = layer.attention.self
        qkv = torch.cat([sa.query(h), sa.key(h), sa.value(h)], 1)                 # (N, 3H)
        qkv = h.new_zeros(B * T, 3 * H).index_copy(0, idx, qkv)                    # padded rows stay 0
        q, k, v = qkv.view(B, T, 3, nh, H // nh).permute(2, 0, 3, 1, 4)           # each (B, nh, T, hd)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=keys,
                                             dropout_p=sa.dropout.p if sa.training else 0.0)
        ctx = ctx.transpose(1, 2).reshape(B * T, H).index_select(0, idx)          # (N, H); padded queries dropped
        out = layer.attention.output
        h = out.LayerNorm(out.dropout(out.dense(ctx)) + h)
        ffn, out = layer.intermediate, layer.output
        h = out.LayerNorm(out.dropout(out.dense(ffn.intermediate_act_fn(ffn.dense(h)))) + h)
    return h, idx


def packed_mean_pool(h: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(N, H) packed states, their (N,) flat indices into a (B, T) batch and the (B, T) pooling
    weights (1 on the tokens to average) -> (B, H) means, as reward_model.mean_pool on the padded
    states."""
    B, T = weight.shape
    w = weight.flatten()[idx].to(h.dtype)                                         # (N,)
    sums = h.new_zeros(B, h.shape[1]).index_add(0, idx // T, h * w[:, None])
    return sums / weight.to(h.dtype).sum(1, keepdim=True).clamp(min=1)
