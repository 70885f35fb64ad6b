"""Triton kernel: log-probability of given tokens, forward and backward, without the (N, V) log-softmax.

Forward (one program per row): an online logsumexp over the vocabulary in tiles of BLOCK,
plus the target's logit -> logprob[N] and lse[N] (kept for backward). Backward (one program
per row and tile): dlogits = grad * (onehot(target) - exp(logits - lse)).

Memory: the naive `log_softmax(logits).gather(...)` materialises a second (N, V) fp32 tensor
(and keeps it for backward); this keeps only lse, N floats. For N = 8 x 512 tokens and
V = 50257 that is 823 MB not allocated. Row offsets are int64 so N * V may pass 2^31.
Reference: logprobs.py (token_logprobs_ref); tests compare the two under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _fwd(logits_ptr, stride, targets_ptr, out_ptr, lse_ptr, V, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    m = tl.full((), -float("inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(s)
    t = tl.load(targets_ptr + row).to(tl.int64)
    xt = tl.load(base + t).to(tl.float32)
    tl.store(out_ptr + row, xt - lse)
    tl.store(lse_ptr + row, lse)


@triton.jit
def _bwd(logits_ptr, stride, targets_ptr, lse_ptr, grad_ptr, dlogits_ptr, dstride, V, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < V
    x = tl.load(logits_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + row)
    g = tl.load(grad_ptr + row)
    t = tl.load(targets_ptr + row).to(tl.int64)
    d = g * (tl.where(cols == t, 1.0, 0.0) - tl.exp(x - lse))
    tl.store(dlogits_ptr + row * dstride + cols, d.to(dlogits_ptr.dtype.element_ty), mask=mask)


def _block(V: int) -> int:
    return min(4096, triton.next_power_of_2(V))


class _TokenLogprobTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        assert logits.dim() == 2 and logits.stride(1) == 1, "logits must be (N, V) with contiguous rows"
        N, V = logits.shape
        out = torch.empty(N, dtype=torch.float32, device=logits.device)
        lse = torch.empty(N, dtype=torch.float32, device=logits.device)
        if N:
            _fwd[(N,)](logits, logits.stride(0), targets, out, lse, V, BLOCK=_block(V))
        ctx.save_for_backward(logits, targets, lse)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        N, V = logits.shape
        d = torch.empty_like(logits)
        grad = grad.contiguous().float()
        if N:
            B = _block(V)
            _bwd[(N, triton.cdiv(V, B))](logits, logits.stride(0), targets, lse, grad, d, d.stride(0), V, BLOCK=B)
        return d, None


def token_logprobs_triton(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Same contract as logprobs.token_logprobs_ref."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return _TokenLogprobTriton.apply(logits, targets.long().contiguous())
