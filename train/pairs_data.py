"""Preference pairs from JSONL files of {"chosen": ..., "rejected": ...} (Anthropic hh-rlhf format).

Both texts hold the whole dialogue; they share it and differ in the last assistant turn, so
the tokenizer truncates from the left (reward_model.load_tokenizer) to keep that turn."""
from __future__ import annotations

import random
from pathlib import Path

from common.data import jsonl_records


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """(chosen, rejected) texts of every record; ValueError naming the line of a malformed one."""
    pairs = []
    for n, rec in jsonl_records(path):
        if not all(isinstance(rec.get(k), str) for k in ("chosen", "rejected")):
            raise ValueError(f"{path}:{n}: not a {{chosen, rejected}} record")
        pairs.append((rec["chosen"], rec["rejected"]))
    if not pairs:
        raise ValueError(f"{path}: no pairs")
    return pairs


def split(pairs: list, holdout: float, seed: int) -> tuple[list, list]:
    """Deterministic shuffle, then the last `holdout` fraction is held out."""
    idx = list(range(len(pairs)))
    random.Random(seed).shuffle(idx)
    n_test = max(1, int(round(len(pairs) * holdout)))
    return [pairs[i] for i in idx[:-n_test]], [pairs[i] for i in idx[-n_test:]]
