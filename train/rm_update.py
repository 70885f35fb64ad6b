"""One reward-model update of the online loop: continue training the current RM on all
preference groups seen so far (Bai et al. 2022 retrain the RM on the growing dataset each
iteration), data-parallel when launched under torchrun.

A group is one comparison or ranking: its texts best first. Comparisons and rankings share the
InstructGPT K-wise loss (a comparison is K = 2, where it is Bradley-Terry); a tie is a
comparison trained with target 1/2 (rm_losses.pairwise_loss). Each global batch of groups is
split across ranks; every rank's loss is its sum divided by the global group count, so the
DDP-averaged gradient times the world size is the single-process gradient of the whole batch.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace

import torch
from tqdm import tqdm

from serve.reward_model import encode

from . import dist, rm_losses
from .rm_eval import score_texts
from .rules import pair_correctness


@dataclass(frozen=True)
class Group:
    texts: tuple[str, ...]    # RM texts (rm_text), best first (a tie: the two tied texts)
    tie: bool = False
    event_id: str = ""        # the feedback event it came from
    prompt: str = ""          # the prompt all its texts answer (the held-out split is by prompt)


@dataclass(frozen=True)
class RMUpdateConfig:
    """Reward-model training inside a cycle."""

    epochs: float = 2.0
    """Passes over all groups seen so far."""
    batch_groups: int = 16
    """Comparisons/rankings per optimiser step (global, over all ranks)."""
    lr: float = 3e-5
    """Backbone learning rate (constant; the RM continues from the previous version)."""
    head_lr: float = 1e-3
    """Scalar head learning rate."""
    max_length: int = 128
    """Tokens per (prompt, response) text, truncated from the left."""
    max_steps: int = 200
    """Optimiser steps per cycle at most (bounds a cycle's time as the dataset grows)."""
    parallel: str = "ddp"
    """Under torchrun: ddp (each rank holds the whole RM, its gradients and Adam's state) or fsdp (FSDP2:
    gradients and Adam's state sharded across ranks; see train/dist.py)."""

    def __post_init__(self) -> None:
        if self.epochs <= 0 or self.batch_groups < 1 or self.max_steps < 1 or self.max_length < 8:
            raise ValueError("epochs > 0, batch_groups >= 1, max_steps >= 1, max_length >= 8 required")
        if self.parallel not in dist.PARALLEL:
            raise ValueError(f"parallel must be one of {dist.PARALLEL}, got {self.parallel!r}")


def group_loss_sum(rm, tok, groups: list[Group], max_length: int) -> torch.Tensor:
    """Sum over groups of each group's loss (K-wise, or BT with target 1/2 for ties)."""
    texts = [t for g in groups for t in g.texts]
    rcfg = replace((rm.module if hasattr(rm, "module") else rm).rcfg, max_length=max_length)
    s = rm(**encode(tok, texts, rcfg))
    total = s.new_zeros(())
    i = 0
    ranked, ks = [], []
    for g in groups:
        k = len(g.texts)
        r = s[i:i + k]
        i += k
        if g.tie:
            total = total + rm_losses.pairwise_loss(r[:1], r[1:2], torch.full((1,), 0.5))
        else:
            ranked.append(r)
            ks.append(k)
    if ranked:
        K = max(ks)
        padded = torch.stack([torch.cat([r, r.new_zeros(K - len(r))]) for r in ranked])   # (B, K)
        total = total + rm_losses.kwise_ranking_loss(padded, torch.tensor(ks)) * len(ranked)
    return total


def train_rm(rm, tok, groups: list[Group], cfg: RMUpdateConfig, seed: int = 0, progress: bool = True) -> dict:
    """Trains rm in place on groups (the same list on every rank), batches in an order drawn from
    `seed`. Returns {"rm_loss", "rm_steps"}."""
    if not groups:
        return {"rm_loss": float("nan"), "rm_steps": 0}
    model = dist.wrap(rm, cfg.parallel)
    net = dist.unwrap(model)   # rm itself, or its FSDP2 copy: the parameters the optimiser steps
    opt = torch.optim.AdamW([{"params": net.backbone.parameters(), "lr": cfg.lr, "weight_decay": 0.01},
                             {"params": net.head_parameters(), "lr": cfg.head_lr, "weight_decay": 0.0}],
                            fused=True)   # one kernel for all parameters: 7x faster steps than the default on CPU
    steps = min(cfg.max_steps, max(1, math.ceil(len(groups) * cfg.epochs / cfg.batch_groups)))
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(groups), generator=g)
                       for _ in range(math.ceil(steps * cfg.batch_groups / len(groups)) + 1)])
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="rm", disable=not (progress and dist.is_main()), file=sys.stderr, leave=False)
    with dist.synced(model, rm):
        for step in bar:
            batch = [groups[j] for j in order[step * cfg.batch_groups:(step + 1) * cfg.batch_groups].tolist()]
            mine = dist.shard(batch)
            loss = group_loss_sum(model, tok, mine, cfg.max_length) / len(batch) * dist.world_size()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(dist.global_sum(loss.item()) / dist.world_size())
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    rm.eval()
    tail = losses[-max(1, len(losses) // 4):]
    return {"rm_loss": sum(tail) / len(tail), "rm_steps": steps}


@torch.no_grad()
def heldout_correctness(rm, tok, groups: list[Group], batch: int = 32) -> tuple[torch.Tensor, list[str]]:
    """Per ordered pair of the held-out non-tie groups: (P,) 1 if the RM orders it right, 1/2 on
    equal scores, 0 if wrong; and the prompt of each pair (the gate's clusters)."""
    groups = [g for g in groups if not g.tie]
    if not groups:
        return torch.zeros(0, dtype=torch.float64), []
    s = score_texts(rm, tok, [t for g in groups for t in g.texts], batch)
    right, owner = pair_correctness(s, [len(g.texts) for g in groups])
    return right, [groups[i].prompt for i in owner]


def heldout_accuracy(rm, tok, groups: list[Group], batch: int = 32) -> float:
    """Pairwise accuracy over every ordered pair of the held-out (non-tie) groups; NaN if none."""
    right, _ = heldout_correctness(rm, tok, groups, batch)
    return float(right.mean()) if len(right) else float("nan")
