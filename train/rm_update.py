"""Reward-model training: the one loop behind the online trainer's RM update (each cycle continues
the current RM on all preference groups seen so far, as Bai et al. 2022 retrain theirs on the
growing dataset) and `python -m train.rm_train` (a fresh RM on shipped pairs), data-parallel when
launched under torchrun.

A group is one comparison or ranking: its texts best first; a pair of train.rm_train is a group of
2. A comparison (K = 2) is trained with the Bradley-Terry loss, a tie as a comparison with target
1/2, a ranking of K > 2 with the InstructGPT K-wise loss (train/rm_losses.py; for K = 2 it is
Bradley-Terry). Each global batch of groups is split across ranks; every rank's loss is its mean
weighted by its share of the global batch, times the world size, so the DDP-averaged gradient is
the single-process gradient of the whole batch.
"""
from __future__ import annotations

import math
import sys
from itertools import accumulate
from dataclasses import dataclass, replace

import torch
from tqdm import tqdm

from serve.reward_model import encode

from . import dist, rm_losses
from .config import RMUpdateConfig
from .optim import clip_and_step
from .rm_eval import score_texts
from .rules import pair_correctness, prompt_key


@dataclass(frozen=True)
class Group:
    texts: tuple[str, ...]    # RM texts (rm_text), best first (a tie: the two tied texts)
    tie: bool = False
    event_id: str = ""        # the feedback event it came from
    prompt: str = ""          # the prompt all its texts answer (the held-out split is by prompt)


# ---- decisions: steps, learning rate, batch order (pure) ----

def rm_steps(n_groups: int, cfg: RMUpdateConfig) -> int:
    """Optimiser steps for cfg.epochs over n_groups (at least 1), capped by cfg.max_steps (if > 0)."""
    steps = max(1, math.ceil(n_groups * cfg.epochs / cfg.batch_groups))
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def lr_factor(step: int, steps: int, schedule: str) -> float:
    """The multiplier of the base learning rates at optimiser step `step` (from 0) of `steps`:
    1 ("constant"), or a linear warm-up over the first steps // 20 steps to 1 and a linear decay
    after it, to 1 / (steps - warm-up + 1) at the last step ("warmup-decay")."""
    if schedule == "constant":
        return 1.0
    warm = max(1, steps // 20)
    return min((step + 1) / warm, max(0.0, (steps - step) / (steps - warm + 1)))


def group_by_length(batches: list[list[int]], lengths: list[int], cap: int, g: torch.Generator,
                    window: int = 50) -> list[list[int]]:
    """Re-batches each window of `window` batches so a batch holds items of similar length
    (lengths in characters, capped where truncation would cut them anyway), then shuffles the
    batches within the window: same items per window, same batch sizes, less padding."""
    out = []
    for w in range(0, len(batches), window):
        chunk = batches[w:w + window]
        sizes = [len(b) for b in chunk]
        flat = sorted((i for b in chunk for i in b), key=lambda i: min(lengths[i], cap))
        regrouped, k = [], 0
        for n in sizes:
            regrouped.append(flat[k:k + n])
            k += n
        out += [regrouped[j] for j in torch.randperm(len(regrouped), generator=g).tolist()]
    return out


def batch_order(groups: list[Group], steps: int, cfg: RMUpdateConfig, seed: int) -> list[list[int]]:
    """The groups (indices) of each of the `steps` global batches: consecutive random permutations
    of all groups drawn from `seed`, cut into batches of cfg.batch_groups, then (group_by_length)
    regrouped by length with the same generator. ceil(epochs) + 1 permutations are drawn (more if
    the steps need them): their count sets the generator's state for the regrouping, and so
    train.rm_train's batches."""
    g = torch.Generator().manual_seed(seed)
    n, b = len(groups), cfg.batch_groups
    perms = max(math.ceil(cfg.epochs) + 1, math.ceil(steps * b / n))
    order = torch.cat([torch.randperm(n, generator=g) for _ in range(perms)])[:steps * b]
    batches = [order[i:i + b].tolist() for i in range(0, len(order), b)]
    if cfg.group_by_length:   # ~6 characters a token: longer texts are truncated to the same length
        batches = group_by_length(batches, [max(map(len, grp.texts)) for grp in groups], cfg.max_length * 6, g)
    return batches


# ---- the loss ----

def group_loss(scores: torch.Tensor, groups: list[Group]) -> torch.Tensor:
    """Mean over groups of each group's loss, from (T,) scores of their texts in order (group by
    group, best first): Bradley-Terry for comparisons (target 1/2 for ties), K-wise for rankings."""
    sizes = [len(grp.texts) for grp in groups]
    starts = [0, *accumulate(sizes)][:-1]
    pairs = [i for i, k in enumerate(sizes) if k == 2]
    rankings = [i for i, k in enumerate(sizes) if k > 2]
    loss = scores.new_zeros(())
    if pairs:   # each part weighted by its share of the groups; a part that is all of them by 1.0
        better, worse = scores[[starts[i] for i in pairs]], scores[[starts[i] + 1 for i in pairs]]
        target = torch.tensor([0.5 if groups[i].tie else 1.0 for i in pairs], dtype=scores.dtype,
                              device=scores.device)
        loss = loss + rm_losses.pairwise_loss(better, worse, target) * (len(pairs) / len(groups))
    if rankings:
        K = max(sizes[i] for i in rankings)
        padded = torch.stack([torch.cat([scores[starts[i]:starts[i] + sizes[i]], scores.new_zeros(K - sizes[i])])
                              for i in rankings])                                             # (B, K)
        loss = loss + rm_losses.kwise_ranking_loss(padded, torch.tensor([sizes[i] for i in rankings],
                                                                                device=scores.device)) \
            * (len(rankings) / len(groups))
    return loss


# ---- the inputs: tokenised once, padded per batch ----

def pretokenize(tok, texts: list[str], rcfg, chunk: int = 256) -> list[dict[str, torch.Tensor]]:
    """Each text's RM inputs (serve.reward_model.encode) without padding: one tokenizer call per
    `chunk` texts instead of one per step, and a text seen in several epochs is tokenised once.
    Needs right padding (load_tokenizer's) and no relevance inputs (they carry their own padding)."""
    rows = []
    for i in range(0, len(texts), chunk):
        enc = encode(tok, texts[i:i + chunk], rcfg)
        for j, n in enumerate(enc["attention_mask"].sum(1).tolist()):
            rows.append({k: v[j, :n] for k, v in enc.items()})
    return rows


def collate(rows: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pads pretokenize's rows into (B, T) tensors: what encode gives for those texts together."""
    return {k: torch.nn.utils.rnn.pad_sequence([r[k] for r in rows], batch_first=True,
                                               padding_value=pad_id if k == "input_ids" else 0)
            for k in rows[0]}


def batch_inputs(tok, groups: list[Group], batches: list[list[int]], rcfg):
    """A function from a list of group indices to the RM inputs of their texts (in order): from
    texts tokenised once up front where that gives the same tensors, else encode per batch."""
    if rcfg.relevance or tok.padding_side != "right":
        return lambda mine: encode(tok, [t for i in mine for t in groups[i].texts], rcfg)
    used = sorted({i for b in batches for i in b})
    rows = pretokenize(tok, [t for i in used for t in groups[i].texts], rcfg)
    first, k = {}, 0
    for i in used:
        first[i], k = k, k + len(groups[i].texts)
    return lambda mine: collate([rows[first[i] + j] for i in mine for j in range(len(groups[i].texts))],
                                tok.pad_token_id)


# ---- the loop ----

def rm_optimizer(net, cfg: RMUpdateConfig) -> torch.optim.AdamW:
    """AdamW over the backbone (weight decay except on biases and norms, as BERT's recipe) at
    cfg.lr and the head at cfg.head_lr without decay."""
    decay, no_decay = [], []
    for n, p in net.backbone.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in n.lower() else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr},
                              {"params": no_decay, "weight_decay": 0.0, "lr": cfg.lr},
                              {"params": net.head_parameters(), "weight_decay": 0.0, "lr": cfg.head_lr}],
                             fused=True)   # one kernel for all parameters: 7x faster steps than the default on CPU


def set_dropout(model: torch.nn.Module, p: float) -> None:
    """Every dropout of model at p (HF attention reads its Dropout module's p too)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p


def train_rm(rm, tok, groups: list[Group], cfg: RMUpdateConfig, seed: int = 0, progress: bool = True,
             cosines: list[torch.Tensor] | None = None) -> dict:
    """Trains rm in place on groups (the same list on every rank), batches in an order drawn from
    `seed`. `cosines`: each group's (K,) relevance cosines, computed once for an RM with the
    relevance feature (train.rm_train.relevance_cosines; the encoder is frozen); without them such
    an RM runs its frozen encoder at every step. Returns {"rm_loss": the mean loss of the last
    quarter of the steps, "rm_steps", "losses": the loss of each step}."""
    if not groups:
        return {"rm_loss": float("nan"), "rm_steps": 0, "losses": []}
    if dist.world_size() > cfg.batch_groups:   # every rank checks the same: they fail together, none waits
        raise ValueError(f"batch_groups={cfg.batch_groups} gives some of the {dist.world_size()} ranks no "
                         "group to train on: use at least one group per rank")
    if cfg.dropout >= 0:
        set_dropout(rm, cfg.dropout)
    model = dist.wrap(rm, cfg.parallel)
    net = dist.unwrap(model)   # rm itself, or its FSDP2 copy: the parameters the optimiser steps
    opt = rm_optimizer(net, cfg)
    steps = rm_steps(len(groups), cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, cfg.lr_schedule))
    batches = batch_order(groups, steps, cfg, seed)
    rcfg = replace(net.rcfg, max_length=cfg.max_length, relevance=net.rcfg.relevance and cosines is None)
    inputs = batch_inputs(tok, groups, [dist.shard(b) for b in batches], rcfg)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="rm", disable=not (progress and dist.is_main()), file=sys.stderr, leave=False)
    with dist.synced(model, rm):
        for step in bar:
            mine = dist.shard(batches[step])
            rel = {} if cosines is None else {"rel_cos": torch.cat([cosines[i] for i in mine])}
            scores = model(**inputs(mine), **rel)
            share = len(mine) * dist.world_size() / len(batches[step])   # 1.0 in one process
            loss = group_loss(scores, [groups[i] for i in mine]) * share
            loss.backward()
            clip_and_step(opt, model.parameters(), 1.0)
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(dist.global_sum(loss.item()) / dist.world_size())
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    rm.eval()
    tail = losses[-max(1, len(losses) // 4):]
    return {"rm_loss": sum(tail) / len(tail), "rm_steps": steps, "losses": losses}


@torch.no_grad()
def heldout_correctness(rm, tok, groups: list[Group], batch: int = 32) -> tuple[torch.Tensor, list[str]]:
    """Per ordered pair of the held-out non-tie groups: (P,) 1 if the RM orders it right, 1/2 on
    equal scores, 0 if wrong; and the prompt of each pair (the gate's clusters, as rules.prompt_key)."""
    groups = [g for g in groups if not g.tie]
    if not groups:
        return torch.zeros(0, dtype=torch.float64), []
    s = score_texts(rm, tok, [t for g in groups for t in g.texts], batch)
    right, owner = pair_correctness(s, [len(g.texts) for g in groups])
    return right, [prompt_key(groups[i].prompt) for i in owner]   # the prompts as the split tells them apart


def heldout_accuracy(rm, tok, groups: list[Group], batch: int = 32) -> float:
    """Pairwise accuracy over every ordered pair of the held-out (non-tie) groups; NaN if none."""
    right, _ = heldout_correctness(rm, tok, groups, batch)
    return float(right.mean()) if len(right) else float("nan")
