"""Triton kernel for entropy_kl.py: one pass over both logit rows with online rescaling.

Per row it keeps the running maxima m_p, m_q and the sums
  s_p = sum e^(x_p - m_p), s_q = sum e^(x_q - m_q), a = sum e^(x_p - m_p) x_p, c = sum e^(x_p - m_p) x_q,
rescaled whenever a maximum grows; then lse = m + log s, entropy = lse_p - a/s_p and
KL(p||q) = (a - c)/s_p - lse_p + lse_q. Reads 2 N V elements once; writes 4 N floats.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _entropy_kl(p_ptr, p_stride, q_ptr, q_stride, t_ptr, ent_ptr, kl_ptr, lp_ptr, lq_ptr, V,
                BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    pb = p_ptr + row * p_stride
    qb = q_ptr + row * q_stride
    m_p = tl.full((), -float("inf"), tl.float32)
    m_q = tl.full((), -float("inf"), tl.float32)
    s_p = tl.zeros((), tl.float32)
    s_q = tl.zeros((), tl.float32)
    a = tl.zeros((), tl.float32)
    c = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        xp = tl.load(pb + cols, mask=mask, other=-float("inf")).to(tl.float32)
        xq = tl.load(qb + cols, mask=mask, other=-float("inf")).to(tl.float32)
        mp_new = tl.maximum(m_p, tl.max(xp, 0))
        mq_new = tl.maximum(m_q, tl.max(xq, 0))
        scale_p = tl.exp(m_p - mp_new)
        e = tl.where(mask, tl.exp(xp - mp_new), 0.0)
        s_p = s_p * scale_p + tl.sum(e, 0)
        a = a * scale_p + tl.sum(e * tl.where(mask, xp, 0.0), 0)   # masked lanes: 0 * 0, not 0 * -inf
        c = c * scale_p + tl.sum(e * tl.where(mask, xq, 0.0), 0)
        s_q = s_q * tl.exp(m_q - mq_new) + tl.sum(tl.where(mask, tl.exp(xq - mq_new), 0.0), 0)
        m_p = mp_new
        m_q = mq_new
    lse_p = m_p + tl.log(s_p)
    lse_q = m_q + tl.log(s_q)
    tl.store(ent_ptr + row, lse_p - a / s_p)
    tl.store(kl_ptr + row, (a - c) / s_p - lse_p + lse_q)
    t = tl.load(t_ptr + row).to(tl.int64)
    tl.store(lp_ptr + row, tl.load(pb + t).to(tl.float32) - lse_p)
    tl.store(lq_ptr + row, tl.load(qb + t).to(tl.float32) - lse_q)


def entropy_kl_triton(logits_p: torch.Tensor, logits_q: torch.Tensor, targets: torch.Tensor):
    """Same contract as entropy_kl.entropy_kl_ref."""
    assert logits_p.shape == logits_q.shape and logits_p.dim() == 2
    logits_p = logits_p if logits_p.stride(1) == 1 else logits_p.contiguous()
    logits_q = logits_q if logits_q.stride(1) == 1 else logits_q.contiguous()
    N, V = logits_p.shape
    outs = [torch.empty(N, dtype=torch.float32, device=logits_p.device) for _ in range(4)]
    if N:
        _entropy_kl[(N,)](logits_p.detach(), logits_p.stride(0), logits_q.detach(), logits_q.stride(0),
                          targets.long().contiguous(), *outs, V, BLOCK=min(2048, triton.next_power_of_2(V)))
    return tuple(outs)
