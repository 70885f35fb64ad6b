"""PPO for RLHF, as pure functions (tensors in, tensors and small stats out; no I/O, no config).

Shapes: B = sequences, T = response tokens (padded); mask (B, T) is 1 on real response tokens.
Each detail cites where it comes from: Ziegler et al. 2019 (Fine-tuning LMs from human
preferences), Stiennon et al. 2020, Ouyang et al. 2022 (InstructGPT), Schulman et al. 2016/2017
(GAE, PPO) and lm-human-preference-details / TRL / OpenRLHF for the defaults.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over the masked entries."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    return ((x - mean) ** 2 * mask).sum() / (n - 1).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries; padding stays 0. shift_mean=False keeps the mean
    (used for rewards in lm-human-preferences)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_penalized_rewards(score: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                         kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token reward r_t = -beta (log pi(a_t) - log pi_ref(a_t)), plus the RM score on the last
    real token (Ziegler 2019 eq. 2; InstructGPT eq. 2). score (B,); logp, ref_logp, mask (B, T).
    Returns (rewards (B, T), per-token KL estimate k1 (B, T))."""
    kl = (logp - ref_logp) * mask
    rewards = -kl_coef * kl
    last = (mask.long().cumsum(1) == mask.long().sum(1, keepdim=True)) & mask.bool()
    rewards = rewards + last.to(rewards.dtype) * score[:, None]
    return rewards * mask, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman 2016) over right-padded sequences.
    delta_t = r_t + gamma V_{t+1} - V_t (V after the last real token = 0);
    A_t = delta_t + gamma lam A_{t+1}. Returns (advantages, returns = A + V), zero on padding.
    gamma = 1, lam = 0.95 are the InstructGPT / lm-human-preferences defaults."""
    B, T = rewards.shape
    m = mask.to(rewards.dtype)
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_v = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * m[:, t] + last * (1 - m[:, t])
        adv[:, t] = last * m[:, t]
        next_v = torch.where(m[:, t] > 0, values[:, t], next_v)
    return adv, (adv + values) * m


def masked_total(x: torch.Tensor, mask: torch.Tensor, denom: float | None) -> torch.Tensor:
    """Token mean, or the masked sum over a given denom (a global token count: a shard's losses
    then add up across ranks / micro-batches to the loss of the whole batch)."""
    return masked_mean(x, mask) if denom is None else (x * mask.to(x.dtype)).sum() / denom


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                clip: float = 0.2, denom: float | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate (Schulman 2017): -min(rho A, clip(rho, 1-eps, 1+eps) A), token mean
    (or sum / denom, see masked_total). Stats: clipfrac and approx_kl = mean((rho - 1) - log rho)
    (the k3 estimator)."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
    with torch.no_grad():
        clipfrac = masked_mean(((ratio - 1).abs() > clip).float(), mask)
        approx_kl = masked_mean((ratio - 1) - log_ratio, mask)
    return masked_total(loss, mask, denom), {"clipfrac": clipfrac, "approx_kl": approx_kl}


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2, denom: float | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped value loss 0.5 max((V - R)^2, (clip(V, V_old +- eps) - R)^2) (lm-human-preferences,
    TRL default cliprange_value=0.2)."""
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    loss = 0.5 * torch.max((values - returns) ** 2, (v_clipped - returns) ** 2)
    with torch.no_grad():
        vclipfrac = masked_mean(((values - returns) ** 2 < (v_clipped - returns) ** 2).float(), mask)
    return masked_total(loss, mask, denom), {"vf_clipfrac": vclipfrac}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(R - V) / Var(R): 1 is a perfect critic, 0 no better than a constant."""
    return 1 - masked_var(returns - values, mask) / masked_var(returns, mask).clamp(min=1e-8)


def ptx_loss(pretrain_logp: torch.Tensor, mask: torch.Tensor, coef: float) -> torch.Tensor:
    """PPO-ptx (InstructGPT eq. 2, gamma term): -coef * mean log-likelihood of pretraining tokens."""
    return -coef * masked_mean(pretrain_logp, mask)


@dataclass
class AdaptiveKLController:
    """Ziegler et al. 2019, sec. 2.2: beta_{t+1} = beta_t (1 + K_beta e_t),
    e_t = clip(KL_t / KL_target - 1, -0.2, 0.2), K_beta = n_steps / horizon.
    Defaults as in lm-human-preferences: init 0.15, target 6 nats, horizon 10000."""
    value: float = 0.15
    target: float = 6.0
    horizon: float = 10000.0

    def update(self, current_kl: float, n_steps: int) -> float:
        err = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + err * n_steps / self.horizon
        return self.value


@dataclass
class FixedKLController:
    value: float = 0.05

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


