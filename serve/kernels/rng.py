"""Counter-based uniform random numbers: u = hash(seed, offset) in [0, 1).

Stateless, so a row's draw depends only on its own (seed, offset) and never on what
else is in the batch; the Triton kernels compute the same hash, so kernel and
reference draw identical numbers. The hash is two rounds of murmur3's fmix32 over
32-bit lanes, done in int64 with explicit masking (no reliance on overflow).
"""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    # (a * c) mod 2^32 for a in [0, 2^32): split a into 16-bit halves so no product passes 2^63
    hi, lo = a >> 16, a & 0xFFFF
    return (((hi * c) & 0xFFFF) << 16) + lo * c & _M32


def fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def uniform(seed: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """seed, offset: int64 (B,) -> float32 (B,) in [0, 1), 24 bits of randomness."""
    s_lo, s_hi = seed & _M32, (seed >> 32) & _M32
    h = fmix32(s_lo ^ fmix32((offset & _M32) ^ 0x9E3779B9))
    h = fmix32(h ^ s_hi)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))
