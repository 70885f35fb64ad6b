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


CANDIDATES = 1024   # sorted candidates per row before falling back to a full sort (see filtered_probs)


def filtered_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                   top_p: torch.Tensor, min_p: torch.Tensor, candidates: int = CANDIDATES) -> torch.Tensor:
    """logits (B, V) fp32; params (B,) -> the renormalised distribution sampling draws from, (B, V).

    The filters only ever keep a prefix of the tokens sorted by probability, so the rows are
    filtered on their top K = max(candidates, max top_k) tokens (torch.topk: a full sort of a
    50k vocabulary at batch 32 cost ~120 ms on 2 CPU cores, as much as a decode step). A row
    whose kept set might reach past K (no top_k, and neither the top-p nor the min-p cut falls
    inside the K) is redone with the full sort, so the result is the same either way."""
    B, V = logits.shape
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    probs = torch.softmax(logits.float() / t[:, None], dim=-1)
    K = min(V, max(candidates, int(top_k.max()) if B else 0))
    if K == V:
        out = _sorted_filter(probs, top_k, top_p, min_p)
    else:
        sp, idx = probs.topk(K, dim=-1)                                       # (B, K), descending
        keep, exact = _keep_sorted(sp, probs, top_k, top_p, min_p)
        out = torch.zeros_like(probs).scatter_(1, idx, torch.where(keep, sp, torch.zeros_like(sp)))
        if not bool(exact.all()):
            out[~exact] = _sorted_filter(probs[~exact], top_k[~exact], top_p[~exact], min_p[~exact])
    return out / out.sum(-1, keepdim=True)


def _sorted_filter(probs: torch.Tensor, top_k, top_p, min_p) -> torch.Tensor:
    """The full-sort path: (R, V) probs -> (R, V) kept probabilities (not renormalised)."""
    sp, idx = probs.sort(dim=-1, descending=True)
    keep, _ = _keep_sorted(sp, probs, top_k, top_p, min_p)
    return torch.zeros_like(probs).scatter_(1, idx, torch.where(keep, sp, torch.zeros_like(sp)))


def _keep_sorted(sp: torch.Tensor, probs: torch.Tensor, top_k, top_p, min_p) -> tuple[torch.Tensor, torch.Tensor]:
    """sp (R, K): each row's K largest probabilities, descending, of probs (R, V).
    -> keep (R, K) (top-k, then top-p over the renormalised top-k survivors, then min-p) and
    exact (R,): True where no token beyond the K could be kept (always when K == V)."""
    R, K = sp.shape
    V = probs.shape[1]
    rank = torch.arange(K, device=sp.device)[None, :]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, V))
    keep = rank < k[:, None]
    # top-p over the top-k survivors: drop a token once the mass before it reaches top_p
    sp_k = torch.where(keep, sp, torch.zeros_like(sp))
    sp_k = sp_k / torch.where(k < V, sp_k.sum(-1), probs.sum(-1))[:, None]   # / the top-k mass (all of it: 1)
    before = torch.cumsum(sp_k, dim=-1) - sp_k
    keep &= (before < top_p[:, None]) | (rank == 0)
    keep &= sp >= (min_p[:, None] * sp[:, :1])
    if K == V:
        return keep, torch.ones(R, dtype=torch.bool, device=sp.device)
    # the token ranked K (first outside) is dropped if top-k stops before it, or the top-p mass is
    # reached within the K, or it is below the min-p threshold (sp[:, -1] bounds it from above)
    exact = (k <= K) | (sp_k.sum(-1) >= top_p) | (sp[:, -1] < min_p * sp[:, 0])
    return keep, exact


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
