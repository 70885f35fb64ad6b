"""Preference pairs from JSONL files of {"chosen": ..., "rejected": ...} (Anthropic hh-rlhf format).

Both texts hold the whole dialogue; they share it and differ in the last assistant turn, so
the tokenizer truncates from the left (reward_model.load_tokenizer) to keep that turn."""
from __future__ import annotations

import json
import random
from pathlib import Path


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    pairs = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            pairs.append((str(rec["chosen"]), str(rec["rejected"])))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: not a {{chosen, rejected}} record ({e})") from e
    if not pairs:
        raise ValueError(f"{path}: no pairs")
    return pairs


def split(pairs: list, holdout: float, seed: int) -> tuple[list, list]:
    """Deterministic shuffle, then the last `holdout` fraction is held out."""
    idx = list(range(len(pairs)))
    random.Random(seed).shuffle(idx)
    n_test = max(1, int(round(len(pairs) * holdout)))
    return [pairs[i] for i in idx[:-n_test]], [pairs[i] for i in idx[-n_test:]]
