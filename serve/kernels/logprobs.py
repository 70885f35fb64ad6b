"""Log-probability of given tokens: logits (N, V), targets (N,) -> logprobs (N,).

Naive equivalent: torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None])[:, 0].
The reference below avoids materialising the (N, V) log-softmax: it keeps only the
per-row logsumexp, so training memory is one (N, V) logits tensor, not two; the
backward is softmax(logits) - onehot(target), recomputed from the saved logsumexp.
"""
from __future__ import annotations

import torch


class _TokenLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        lse = torch.logsumexp(logits.float(), dim=-1)                     # (N,)
        picked = logits.gather(-1, targets[:, None])[:, 0].float()        # (N,)
        ctx.save_for_backward(logits, targets, lse)
        return picked - lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        # d/dlogits (logit_t - lse) = onehot(t) - softmax(logits)
        g = -torch.exp(logits.float() - lse[:, None]) * grad[:, None]
        g.scatter_add_(-1, targets[:, None], grad[:, None].float())
        return g.to(logits.dtype), None


def token_logprobs_ref(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits (N, V) any float dtype, targets (N,) int64 -> fp32 (N,); differentiable in logits."""
    return _TokenLogprob.apply(logits, targets.long())
