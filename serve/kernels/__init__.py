"""The one API for sampling and per-token log-probabilities, used by the server and the trainer.

Dispatch: CUDA tensors go to the Triton kernels, CPU tensors to the torch references
beside them. RLHF_KERNELS=torch|triton forces either (triton on CPU tensors needs
TRITON_INTERPRET=1, which is how the tests run the kernels without a GPU).
"""
from __future__ import annotations

import os

import torch

from .entropy_kl import entropy_kl_ref
from .logprobs import token_logprobs_ref
from .sampling import sample_ref


def _use_triton(t: torch.Tensor) -> bool:
    forced = os.environ.get("RLHF_KERNELS", "").lower()
    if forced in ("torch", "triton"):
        return forced == "triton"
    if forced:
        raise ValueError(f"RLHF_KERNELS must be 'torch' or 'triton', got {forced!r}")
    return t.is_cuda


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           min_p: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, V) -> (tokens int64 (B,), logprobs fp32 (B,)); see sampling.py for the definition."""
    if _use_triton(logits):
        from .sampling_triton import sample_triton
        return sample_triton(logits, temperature, top_k, top_p, min_p, seed, offset)
    return sample_ref(logits, temperature, top_k, top_p, min_p, seed, offset)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits (N, V), targets (N,) -> log_softmax(logits)[target] (N,) fp32, differentiable."""
    if _use_triton(logits):
        from .logprobs_triton import token_logprobs_triton
        return token_logprobs_triton(logits, targets)
    return token_logprobs_ref(logits, targets)


def entropy_kl(logits_p: torch.Tensor, logits_q: torch.Tensor, targets: torch.Tensor):
    """Policy vs reference logits (N, V), sampled tokens (N,) -> (entropy, kl, logp, logq), fp32 (N,)."""
    if _use_triton(logits_p):
        from .entropy_kl_triton import entropy_kl_triton
        return entropy_kl_triton(logits_p, logits_q, targets)
    return entropy_kl_ref(logits_p, logits_q, targets)


__all__ = ["sample", "token_logprobs", "entropy_kl"]
