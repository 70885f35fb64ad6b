"""Sampling reference: temperature, top-k, top-p, min-p per row, seeded per row.

Pure torch, the definition the Triton kernel (sampling_triton.py) is tested against.

Per row b:
  greedy if temperature[b] == 0 (argmax of the logits);
  otherwise p = softmax(logits / T); keep the top_k[b] most likely tokens (0 = all),
  then the smallest set whose mass reaches top_p[b], then tokens with p >= min_p[b] * max p;
  renormalise and draw by inverse CDF with u = uniform(seed[b], offset[b]).
The returned logprob is log_softmax(logits / T)[token], unfiltered (T = 1 for greedy rows):
the probability under the model at that temperature, which is what PPO needs.
"""
from __future__ import annotations

import torch

from .rng import uniform


def filtered_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                   top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """logits (B, V) fp32; params (B,) -> the renormalised distribution sampling draws from, (B, V)."""
    B, V = logits.shape
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    probs = torch.softmax(logits.float() / t[:, None], dim=-1)
    sp, idx = probs.sort(dim=-1, descending=True)
    rank = torch.arange(V, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, V))
    keep = rank < k[:, None]
    # top-p over the top-k survivors: drop a token once the mass before it reaches top_p
    sp_k = torch.where(keep, sp, torch.zeros_like(sp))
    sp_k = sp_k / sp_k.sum(-1, keepdim=True)
    before = torch.cumsum(sp_k, dim=-1) - sp_k
    keep &= (before < top_p[:, None]) | (rank == 0)
    keep &= sp >= (min_p[:, None] * sp[:, :1])
    sp = torch.where(keep, sp, torch.zeros_like(sp))
    out = torch.zeros_like(probs).scatter_(1, idx, sp)
    return out / out.sum(-1, keepdim=True)


def sample_ref(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
               min_p: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, V); temperature/top_p/min_p float (B,); top_k/seed/offset int64 (B,)
    -> tokens int64 (B,), logprobs fp32 (B,)."""
    logits = logits.float()
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature)
    logp_all = torch.log_softmax(logits / t[:, None], dim=-1)            # (B, V)
    tokens = logits.argmax(-1)
    rows = (~greedy).nonzero()[:, 0]
    if rows.numel():
        # only the sampled rows pay for filtering; rows with no filter skip the sort entirely
        lp = logp_all[rows]
        filtered = (top_k[rows] > 0) | (top_p[rows] < 1) | (min_p[rows] > 0)
        if bool(filtered.any()):
            probs = filtered_probs(logits[rows], temperature[rows], top_k[rows], top_p[rows], min_p[rows])
        else:
            probs = lp.exp()
        tokens[rows] = _inverse_cdf(probs, uniform(seed[rows], offset[rows]).to(logits.device))
    logp = logp_all.gather(1, tokens[:, None])[:, 0]
    return tokens, logp


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs (R, V) rows summing to ~1, u (R,) in [0, 1) -> the token whose CDF interval holds u."""
    cdf = torch.cumsum(probs, dim=-1)
    drawn = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0].clamp_(max=probs.shape[1] - 1)
    # a zero-probability token can only be hit through rounding at the top of the CDF: step back to the last kept one
    return torch.where(probs.gather(1, drawn[:, None])[:, 0] > 0, drawn, _last_nonzero(probs))


def _last_nonzero(probs: torch.Tensor) -> torch.Tensor:
    V = probs.shape[1]
    return (V - 1 - (probs.flip(-1) > 0).int().argmax(-1)).long()
