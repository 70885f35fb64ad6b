"""How well does `python -m train.rm_train` generalise? k-fold cross-validation over the shipped
pairs, folds split by prompt (the first human turn: hh-rlhf has several dialogues that open the
same way, and a pair-level split lets one of them train and its sibling test).

    python bench/rm_cv.py                      (5 folds of the default command, ~4.5 min a fold on 2 cores)
    python bench/rm_cv.py --quick              (2 folds, a quarter epoch: a smoke run)
    python bench/rm_cv.py -- --epochs 1        (flags after -- go to train.rm_train's config; one epoch
                                                was the default of every figure before session 13)
    python bench/rm_cv.py -- --device cuda     (on a GPU: ~20 s a fold on an H200, several runs at once)

Every pair is held out exactly once, so the pooled accuracy is over all 1,800 pairs (standard
error ~0.011, against ~0.036 for the 180-pair split rm_train reports). Last line: one JSON object
with accuracy (pooled), its standard error, per-fold accuracies, minutes per fold and the flags.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def first_turn(text: str) -> str:
    m = re.match(r"\s*Human: (.*?)\n\nAssistant:", text, re.S)
    return " ".join((m.group(1) if m else text).lower().split())


def folds_by_prompt(pairs: list, k: int, seed: int = 0) -> list[list[int]]:
    """k folds of pair indices; all pairs that open with the same human turn share a fold."""
    keys = sorted({first_turn(c) for c, _ in pairs})
    random.Random(seed).shuffle(keys)
    fold_of = {key: i % k for i, key in enumerate(keys)}
    out: list[list[int]] = [[] for _ in range(k)]
    for i, (c, _) in enumerate(pairs):
        out[fold_of[first_turn(c)]].append(i)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 folds, a quarter epoch each")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--fold-seed", type=int, default=0,
                    help="seed of the partition into folds (0: the folds of the figures in bench/RESULTS.md "
                         "up to session 13, whose 'defaults' were one epoch: -- --epochs 1)")
    ap.add_argument("--save-diffs", type=Path, default=None,
                    help="write each pair's held-out score difference (chosen - rejected), in file order, "
                         "as a JSON list (null where its fold has not run yet; rewritten after every fold): "
                         "lets ensembles and paired comparisons of runs be scored afterwards")
    ap.add_argument("rm_flags", nargs="*", help="flags for train.rm_train's config (after --)")
    a = ap.parse_args()
    import torch

    from common.config_cli import parse_config
    from common.data import HH_PAIRS
    from train.pairs_data import read_pairs
    from train.rm_train import RMTrainConfig, train
    cfg = parse_config(RMTrainConfig, ["--out", "/dev/null", *a.rm_flags], prog="rm_cv")
    k = 2 if a.quick else a.folds
    if a.quick:
        cfg = replace(cfg, epochs=0.25)
    pairs = read_pairs(cfg.data if cfg.data else HH_PAIRS)
    right, per_fold, minutes = [], [], []
    diffs = [None] * len(pairs)
    for f, test_idx in enumerate(folds_by_prompt(pairs, k, a.fold_seed)):
        held = set(test_idx)
        tr = [p for i, p in enumerate(pairs) if i not in held]
        te = [pairs[i] for i in test_idx]
        t0 = time.time()
        rm, tok, m = train(cfg, tr, te, progress=False)
        minutes.append((time.time() - t0) / 60)
        from train.rm_eval import score_texts
        s = score_texts(rm, tok, [t for p in te for t in p])
        r = ((s[0::2] > s[1::2]).float() + 0.5 * (s[0::2] == s[1::2]).float()).tolist()
        for i, d in zip(test_idx, (s[0::2] - s[1::2]).tolist()):
            diffs[i] = d
        right += r
        per_fold.append(sum(r) / len(r))
        print(f"[rm_cv] fold {f + 1}/{k}: {per_fold[-1]:.3f} on {len(te)} pairs ({minutes[-1]:.1f} min)",
              file=sys.stderr, flush=True)
        if a.save_diffs:   # whole or not at all: a reader (bench/rm_sweep.py) may look at any moment
            tmp = a.save_diffs.with_name(a.save_diffs.name + ".tmp")
            tmp.write_text(json.dumps(diffs))
            os.replace(tmp, a.save_diffs)
        del rm
        torch.manual_seed(0)
    acc = sum(right) / len(right)
    se = math.sqrt(acc * (1 - acc) / len(right))
    print(json.dumps({"bench": "rm_cv", "quick": a.quick, "folds": k, "pairs": len(right), "accuracy": acc, "se": se,
                      "per_fold": per_fold, "fold_seed": a.fold_seed, "minutes_per_fold": sum(minutes) / len(minutes),
                      "flags": a.rm_flags}))


if __name__ == "__main__":
    main()
