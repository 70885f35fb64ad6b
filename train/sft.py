"""Supervised pretraining of a small local policy on dialogue text (step 1 of InstructGPT, in miniature).

    python -m train.sft --model models/policy-v0 --minutes 4

A freshly built policy (serve.make_policy) has random weights and emits noise; a few minutes of
next-token training on the hh dialogues' preferred answers gives it English words and the
"Human: ... Assistant: ..." format, so the online loop has something to improve. Trains in place:
the folder is rewritten atomically (temp folder, fsync, rename) with the same tokenizer, given the hh
chat template (serve.make_policy.HH_CHAT_TEMPLATE) when it has none, since that is the format it learns.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common.config_cli import parse_config
from common.data import HH_PAIRS, require
from serve.make_policy import HH_CHAT_TEMPLATE


@dataclass(frozen=True)
class SFTConfig:
    """Next-token training of a local causal LM on dialogue text, in place."""

    model: Path
    """HF folder of the policy to train (rewritten when done)."""
    data: Path = HH_PAIRS
    """JSONL with "chosen" dialogues (hh-rlhf format) or a plain text file (default: the shipped hh pairs)."""
    minutes: float = 4.0
    """Wall-clock budget; training stops at it (or at --max-steps)."""
    max_steps: int = 100000
    """Optimiser steps at most."""
    batch: int = 16
    """Sequences per step."""
    seq_len: int = 128
    """Tokens per sequence."""
    lr: float = 1e-3
    """Peak AdamW learning rate (cosine decay over the expected steps)."""
    seed: int = 0
    """Seed of the batch order."""
    threads: int = 0
    """torch threads (0: torch's default)."""

    def __post_init__(self) -> None:
        if self.minutes <= 0 or self.batch < 1 or self.seq_len < 8 or self.max_steps < 1:
            raise ValueError("minutes > 0, batch >= 1, seq_len >= 8, max_steps >= 1 required")


def corpus(path: Path) -> list[str]:
    lines = [x for x in path.read_text().splitlines() if x.strip()]
    if lines and lines[0].lstrip().startswith("{"):
        return [json.loads(x)["chosen"] for x in lines]
    return lines


def turns(text: str) -> list[str]:
    """A dialogue cut before each human turn: every piece but a leading non-dialogue one ends with
    an assistant turn (hh-rlhf format, "\n\nHuman: ...\n\nAssistant: ...")."""
    return [x for x in re.split(r"(?=\n\nHuman:)", text) if x]


def token_stream(tok, texts: list[str]) -> torch.Tensor:
    """One token stream of the texts with the EOS token after every assistant turn (and at each
    text's end): the policy learns to end its turn with EOS, as chat templates end a turn with
    their end-of-turn token, so a served answer finishes instead of running into a made-up
    "Human:" turn, and the engine stops there."""
    eos = tok.eos_token_id
    ids: list[int] = []
    for t in texts:
        for piece in turns(t):
            ids += tok.encode(piece, add_special_tokens=False) + ([eos] if eos is not None else [])
    return torch.tensor(ids)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(SFTConfig, argv, prog="python -m train.sft", description=__doc__)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tok = AutoTokenizer.from_pretrained(cfg.model, local_files_only=True)
    if not tok.chat_template:  # a policy built before the template shipped
        tok.chat_template = HH_CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(cfg.model, local_files_only=True, dtype=torch.float32)
    texts = corpus(require(cfg.data, "sft data"))
    random.Random(cfg.seed).shuffle(texts)
    n_val = max(1, len(texts) // 20)
    train_ids, val_ids = token_stream(tok, texts[n_val:]), token_stream(tok, texts[:n_val])
    L = cfg.seq_len + 1
    val = val_ids[:(len(val_ids) // L) * L].view(-1, L)[:64]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.1, betas=(0.9, 0.95), fused=True)
    g = torch.Generator().manual_seed(cfg.seed)

    @torch.no_grad()
    def val_loss() -> float:
        model.eval()
        out = model(input_ids=val[:, :-1], labels=val[:, :-1].clone()).loss
        return float(out)

    before = val_loss()
    print(f"sft: {len(train_ids)} training tokens, validation loss {before:.3f} before", file=sys.stderr, flush=True)
    t0, step, budget = time.time(), 0, cfg.minutes * 60
    expected = cfg.max_steps
    bar = tqdm(total=int(budget), desc="sft (s)", file=sys.stderr, unit="s")
    model.train()
    while step < cfg.max_steps and time.time() - t0 < budget:
        starts = torch.randint(0, len(train_ids) - L, (cfg.batch,), generator=g)
        x = torch.stack([train_ids[s:s + L] for s in starts.tolist()])
        if step == 20:  # estimate the steps the budget allows, for the cosine schedule
            expected = min(cfg.max_steps, int(20 * budget / max(1e-3, time.time() - t0)))
        lr = cfg.lr * (min(1.0, (step + 1) / 20)) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, expected)))))
        for group in opt.param_groups:
            group["lr"] = lr
        loss = model(input_ids=x[:, :-1], labels=x[:, :-1].clone()).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.n = int(time.time() - t0)
        bar.set_postfix(step=step, loss=f"{loss.item():.3f}")
        bar.refresh()
    bar.close()
    after = val_loss()
    tmp = cfg.model.with_name(cfg.model.name + ".sft-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    for extra in ("manifest.json",):
        if (cfg.model / extra).exists():
            shutil.copy(cfg.model / extra, tmp / extra)
    (tmp / "sft.json").write_text(json.dumps({"steps": step, "val_loss_before": before, "val_loss_after": after,
                                              "seconds": round(time.time() - t0, 1)}))
    for f in tmp.iterdir():
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
    old = cfg.model.with_name(cfg.model.name + ".sft-old")
    shutil.rmtree(old, ignore_errors=True)
    os.rename(cfg.model, old)
    os.rename(tmp, cfg.model)
    shutil.rmtree(old)
    print(json.dumps({"steps": step, "val_loss_before": round(before, 4), "val_loss_after": round(after, 4),
                      "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
