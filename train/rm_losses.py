"""Reward-model losses (pure: tensors in, tensors out).

Shapes: B = comparisons or rankings in the batch, K = responses per ranking (padded).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_loss(r_a: torch.Tensor, r_b: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry loss of comparisons; label (B,) is 1 where a is preferred, 0 where b is,
    0.5 for a tie (explicit: the cross-entropy with target 1/2 pulls the two rewards together).
    -[y log sigmoid(r_a - r_b) + (1 - y) log sigmoid(r_b - r_a)], mean over B.
    With y = 1 this is InstructGPT's -log sigmoid(r_w - r_l)."""
    d = r_a - r_b
    y = label.to(d.dtype)
    return -(y * F.logsigmoid(d) + (1 - y) * F.logsigmoid(-d)).mean()


def kwise_ranking_loss(rewards: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """InstructGPT eq. 1: rewards (B, K) of each ranking's responses, best first; k (B,) how many
    are real (the rest is padding). Each ranking's C(k, 2) pairs stay in one batch element and
    are weighted 1/C(k, 2), so a ranking counts once whatever its K (avoids the overfitting that
    shuffling its pairs into separate elements caused). Mean over rankings."""
    B, K = rewards.shape
    i = torch.arange(K, device=rewards.device)
    better = i[:, None] < i[None, :]                                     # (K, K): i ranked above j
    valid = (i[None, :] < k[:, None])                                    # (B, K)
    pair = better[None] & valid[:, :, None] & valid[:, None, :]          # (B, K, K)
    d = rewards[:, :, None] - rewards[:, None, :]                        # r_i - r_j
    logp = torch.where(pair, F.logsigmoid(d), torch.zeros_like(d))
    n_pairs = (k * (k - 1) / 2).to(rewards.dtype)
    return -(logp.sum((1, 2)) / n_pairs).mean()


def pairwise_accuracy(r_w: torch.Tensor, r_l: torch.Tensor) -> torch.Tensor:
    """Fraction of comparisons whose preferred response scores higher (ties count 1/2)."""
    return ((r_w > r_l).float() + 0.5 * (r_w == r_l).float()).mean()


def expected_calibration_error(r_w: torch.Tensor, r_l: torch.Tensor, bins: int = 10) -> torch.Tensor:
    """ECE of P(preferred wins) = sigmoid(r_w - r_l), symmetrised over the pair's order so both
    confident-right and confident-wrong predictions fall in the bins."""
    d = torch.cat([r_w - r_l, r_l - r_w])
    y = torch.cat([torch.ones_like(r_w), torch.zeros_like(r_l)])
    p = torch.sigmoid(d)
    idx = torch.clamp((p * bins).long(), max=bins - 1)
    ece = torch.zeros((), dtype=p.dtype, device=p.device)
    for b in range(bins):
        m = idx == b
        if m.any():
            ece = ece + m.float().mean() * (p[m].mean() - y[m].mean()).abs()
    return ece


def fit_bt(d: torch.Tensor, l2: float = 1e-3, iters: int = 50) -> torch.Tensor:
    """The (F,) w maximising mean(log sigmoid(d @ w)) - l2/2 * |w|^2 for (N, F) feature margins d
    (chosen minus rejected): a linear Bradley-Terry model (ridge-regularised logistic regression
    without intercept), fitted by Newton's method (the objective is concave; F is small enough for
    an (F, F) Hessian). Used to start the RM's frozen-feature prior where the data says."""
    d = d.double()
    w = torch.zeros(d.shape[1], dtype=torch.float64)
    eye = torch.eye(d.shape[1], dtype=torch.float64)
    for _ in range(iters):
        p = torch.sigmoid(d @ w)                                            # (N,)
        grad = d.T @ (1 - p) / len(d) - l2 * w                              # (F,)
        hess = -(d.T * (p * (1 - p))) @ d / len(d) - l2 * eye               # (F, F)
        step = torch.linalg.solve(hess, grad)
        w = w - step
        if step.abs().max() < 1e-10:
            break
    return w


def fit_bt_scale(d: torch.Tensor, l2: float = 1e-3, iters: int = 50) -> float:
    """fit_bt for one (N,) feature margin: the scalar w."""
    return float(fit_bt(d[:, None], l2, iters)[0])
