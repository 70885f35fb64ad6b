"""Score a JSONL file of {"chosen", "rejected"} pairs with a trained reward model.

    python -m train.rm_eval --rm models/rm-hh --data some-pairs.jsonl
Last line: one JSON object with accuracy, pairs, ece and mean_margin.
"""
from __future__ import annotations

import json
import sys

from common.config_cli import check_command_line, parse_config

from .config import RMEvalConfig

if __name__ == "__main__":   # --help and a bad flag answered before torch and transformers are imported
    check_command_line(RMEvalConfig, "python -m train.rm_eval", __doc__)

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from common.data import require  # noqa: E402
from common.lifecycle import startup_errors  # noqa: E402
from serve import reward_model  # noqa: E402
from serve.reward_model import encode  # noqa: E402

from . import rm_losses  # noqa: E402
from .pairs_data import read_pairs  # noqa: E402


@torch.no_grad()
def score_texts(rm, tok, texts: list[str], batch: int = 32, progress: bool = False) -> torch.Tensor:
    """Raw scores (no offset) of texts, (len(texts),), on the CPU (whatever device rm is on)."""
    rm.eval()
    out = []
    rng = range(0, len(texts), batch)
    for i in tqdm(rng, desc="scoring", disable=not progress, file=sys.stderr):
        out.append(rm(**encode(tok, texts[i:i + batch], rm.rcfg)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def evaluate(rm, tok, pairs: list[tuple[str, str]], batch: int = 32, progress: bool = False) -> dict:
    s = score_texts(rm, tok, [t for p in pairs for t in p], batch, progress)
    r_w, r_l = s[0::2], s[1::2]
    return {"accuracy": float(rm_losses.pairwise_accuracy(r_w, r_l)), "pairs": len(pairs),
            "ece": float(rm_losses.expected_calibration_error(r_w, r_l)),
            "mean_margin": float((r_w - r_l).mean()), "mean_reward": float(s.mean() - rm.rcfg.offset)}


def main(argv: list[str] | None = None) -> None:
    a = parse_config(RMEvalConfig, argv, prog="python -m train.rm_eval", description=__doc__)
    if a.threads:
        torch.set_num_threads(a.threads)
    if not (a.rm / "reward_config.json").is_file():
        raise SystemExit(f"--rm {a.rm}: not a reward-model folder written by train.rm_train (no reward_config.json)")
    with startup_errors("python -m train.rm_eval"):   # a missing, malformed or empty --data
        pairs = read_pairs(require(a.data, "pairs"))
    rm, tok = reward_model.load(a.rm)
    res = evaluate(rm, tok, pairs, a.batch, progress=True)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
