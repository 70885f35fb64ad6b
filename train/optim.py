"""Gradient clipping folded into a fused Adam(W) step.

`clip_grad_norm_` followed by `opt.step()` passes over every gradient three times: per-tensor norms,
a multiply by the clip coefficient (always applied, 1.0 included), then the optimiser's read. For the
reward model half of the parameters are MiniLM's word embeddings, whose dense gradient is 47 MB, so
those passes were ~7% of an RM step. Here the global norm takes one dot product per gradient, and the
clip is applied inside the fused kernel: torch's fused Adam/AdamW divide each gradient by the
optimiser's `grad_scale` as they read it (the hook torch.amp.GradScaler uses for loss scaling).
"""
from __future__ import annotations

import torch


def clip_scale(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The divisor that clips a gradient of global norm `norm` to max_norm, as
    torch.nn.utils.clip_grad_norm_ does (it multiplies by min(1, max_norm / (norm + 1e-6)))."""
    return torch.clamp((norm + 1e-6) / max_norm, min=1.0)


def global_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all gradients together: sqrt of the sum of each one's dot product with itself
    (fp32 or wider; one read per gradient)."""
    sq = [torch.dot(f, f) for f in (g.reshape(-1) if g.dtype in (torch.float32, torch.float64)
                                    else g.reshape(-1).float() for g in grads)]
    return torch.stack([s.double() for s in sq]).sum().sqrt().float()


def clip_and_step(opt: torch.optim.Optimizer, params, max_norm: float) -> float:
    """clip_grad_norm_(params, max_norm) then opt.step(): the same update, with the clip inside a fused
    Adam(W)'s kernel when it can be (every parameter group fused, every gradient a plain tensor);
    otherwise the two torch calls (FSDP's sharded DTensor gradients, other optimisers). Returns the
    gradient norm before clipping."""
    params = [p for p in params if p.grad is not None]
    fused = isinstance(opt, torch.optim.Adam | torch.optim.AdamW) and all(g.get("fused") for g in opt.param_groups)
    # grad_scale divides every gradient the optimiser steps: only right when those are the clipped ones
    stepped = {id(p) for g in opt.param_groups for p in g["params"] if p.grad is not None}
    if not params or not fused or stepped != {id(p) for p in params} \
            or any(type(p.grad) is not torch.Tensor or p.grad.device != params[0].grad.device for p in params) \
            or getattr(opt, "grad_scale", None) is not None:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        opt.step()
        return float(norm)
    norm = global_norm([p.grad for p in params])
    opt.grad_scale = clip_scale(norm, max_norm)
    try:
        opt.step()
    finally:
        del opt.grad_scale
    return float(norm)
