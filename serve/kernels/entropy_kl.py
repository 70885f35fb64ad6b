"""Per-token entropy and KL between the policy and the reference logits (reference implementation).

For rows of policy logits x_p (N, V), reference logits x_q (N, V) and the sampled tokens (N,):
  entropy  = -sum_v p log p                   (monitoring: policy entropy)
  kl       = sum_v p (log p - log q)          (exact KL(p || q) over the vocabulary)
  logp, logq of the sampled token             (the PPO penalty's per-token estimators:
                                               k1 = logp - logq, k3 = (q/p - 1) - log(q/p);
                                               Schulman 2020, "Approximating KL divergence")
Naive equivalent: the log_softmax of both, as below. The Triton kernel (entropy_kl_triton.py)
computes the same in one pass with online rescaling, materialising no (N, V) tensor.
"""
from __future__ import annotations

import torch


def entropy_kl_ref(logits_p: torch.Tensor, logits_q: torch.Tensor, targets: torch.Tensor):
    """-> (entropy, kl, logp, logq), each fp32 (N,). No gradient is needed (monitoring, reward penalty)."""
    with torch.no_grad():
        lp = torch.log_softmax(logits_p.float(), -1)
        lq = torch.log_softmax(logits_q.float(), -1)
        p = lp.exp()
        entropy = -(p * lp).sum(-1)
        kl = (p * (lp - lq)).sum(-1)
        t = targets.long()[:, None]
        return entropy, kl, lp.gather(1, t)[:, 0], lq.gather(1, t)[:, 0]
