"""Triton kernel for sampling.py: temperature, top-k, top-p, min-p per row, without sorting.

One program per row, tiled passes over the vocabulary (any V: nothing has to fit on chip):
  1. max, argmax (greedy), min and Z = sum exp((x - max) / T);
  2. top-k threshold: the k-th largest logit, found exactly by bisection over the order-
     preserving integer key of the float32 bits (<= 32 counting passes; the vocabulary is
     never sorted, as in FlashInfer's and vLLM's pivot searches);
  3. top-p threshold over the top-k survivors: the largest logit t whose tail mass
     sum_{x >= t} p reaches top_p, by the same bisection;
  4. min-p threshold in logit space: x >= max + T log(min_p);
  5. inverse-CDF draw in vocabulary order over the kept tokens with u = uniform(seed, offset),
     the same counter-based hash as rng.py, so kernel and reference draw the same number.
Everything stays on the device: no host synchronisation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_M32 = 0xFFFFFFFF


@triton.jit
def _fmix32(h):
    # h: uint64 holding a 32-bit value; products of two 32-bit values fit in 64 bits
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


@triton.jit
def _uniform(seed, offset):
    s = seed.to(tl.uint64, bitcast=True)
    o = offset.to(tl.uint64, bitcast=True)
    h = _fmix32((s & 0xFFFFFFFF) ^ _fmix32((o & 0xFFFFFFFF) ^ 0x9E3779B9))
    h = _fmix32(h ^ (s >> 32))
    return (h >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def _key(x):
    # order-preserving int32 key of float32 values (int64 so bisection midpoints do not overflow)
    b = x.to(tl.int32, bitcast=True)
    return (b ^ ((b >> 31) & 0x7FFFFFFF)).to(tl.int64)


@triton.jit
def _count_ge(base, V, t, BLOCK: tl.constexpr):
    n = tl.zeros((), tl.int64)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        n += tl.sum(tl.where((cols < V) & (_key(x) >= t), 1, 0).to(tl.int64), 0)
    return n


@triton.jit
def _mass_ge(base, V, t, m, inv_t, BLOCK: tl.constexpr):
    z = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        z += tl.sum(tl.where((cols < V) & (_key(x) >= t), tl.exp((x - m) * inv_t), 0.0), 0)
    return z


@triton.jit
def _sample_kernel(logits_ptr, stride, temp_ptr, topk_ptr, topp_ptr, minp_ptr, seed_ptr, off_ptr,
                   tok_ptr, logp_ptr, V, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    T = tl.load(temp_ptr + row)
    greedy = T <= 0
    inv_t = tl.where(greedy, 1.0, 1.0 / tl.where(greedy, 1.0, T))
    # pass 1: max, argmax, min key, Z
    m = tl.full((), -float("inf"), tl.float32)
    am = tl.zeros((), tl.int64)
    kmin = tl.full((), 2147483647, tl.int64)
    z = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        x = tl.load(base + cols, mask=mask, other=-float("inf")).to(tl.float32)
        tmax = tl.max(x, 0)
        targ = tl.min(tl.where(x == tmax, cols, V), 0).to(tl.int64)  # first index of the tile max
        am = tl.where(tmax > m, targ, am)
        m_new = tl.maximum(m, tmax)
        z = z * tl.exp((m - m_new) * inv_t) + tl.sum(tl.exp((x - m_new) * inv_t), 0)
        m = m_new
        kmin = tl.minimum(kmin, tl.min(tl.where(mask, _key(x), 2147483647), 0))
    tok = am
    if not greedy:
        k = tl.load(topk_ptr + row)
        top_p = tl.load(topp_ptr + row)
        min_p = tl.load(minp_ptr + row)
        kmax1 = _key(m) + 1
        # top-k: largest t with count(key >= t) >= k
        tau = kmin
        if (k > 0) & (k < V):
            lo = kmin
            hi = kmax1
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if _count_ge(base, V, mid, BLOCK) >= k:
                    lo = mid
                else:
                    hi = mid
            tau = lo
        # top-p over the top-k survivors: largest t >= tau with mass(key >= t) >= top_p * mass(key >= tau)
        if top_p < 1.0:
            need = top_p * _mass_ge(base, V, tau, m, inv_t, BLOCK)
            lo = tau
            hi = kmax1
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if _mass_ge(base, V, mid, m, inv_t, BLOCK) >= need:
                    lo = mid
                else:
                    hi = mid
            tau = lo
        if min_p > 0:
            tau = tl.maximum(tau, _key(m + tl.log(min_p) / inv_t))
        # inverse CDF in vocabulary order over the kept tokens
        target = _uniform(tl.load(seed_ptr + row), tl.load(off_ptr + row)) * _mass_ge(base, V, tau, m, inv_t, BLOCK)
        run = tl.zeros((), tl.float32)
        chosen = tl.full((), V, tl.int64)
        last = tl.full((), -1, tl.int64)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
            keep = (cols < V) & (_key(x) >= tau)
            e = tl.where(keep, tl.exp((x - m) * inv_t), 0.0)
            cs = tl.cumsum(e, 0) + run
            chosen = tl.minimum(chosen, tl.min(tl.where(keep & (cs > target), cols, V), 0).to(tl.int64))
            last = tl.maximum(last, tl.max(tl.where(keep, cols, -1), 0).to(tl.int64))
            run += tl.sum(e, 0)
        tok = tl.where(chosen < V, chosen, last)
    xt = tl.load(base + tok).to(tl.float32)
    tl.store(tok_ptr + row, tok)
    tl.store(logp_ptr + row, (xt - m) * inv_t - tl.log(z))


def sample_triton(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as sampling.sample_ref."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    B, V = logits.shape
    dev = logits.device
    tok = torch.empty(B, dtype=torch.int64, device=dev)
    logp = torch.empty(B, dtype=torch.float32, device=dev)
    if B:
        f32 = lambda t: t.to(device=dev, dtype=torch.float32).contiguous()  # noqa: E731
        i64 = lambda t: t.to(device=dev, dtype=torch.int64).contiguous()  # noqa: E731
        _sample_kernel[(B,)](logits, logits.stride(0), f32(temperature), i64(top_k), f32(top_p), f32(min_p),
                             i64(seed), i64(offset), tok, logp, V, BLOCK=min(2048, triton.next_power_of_2(V)))
    return tok, logp
