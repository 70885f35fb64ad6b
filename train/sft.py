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
import random
import re
import shutil
import sys
import time
from pathlib import Path

from common.config_cli import check_command_line, parse_config

from .config import SFTConfig

if __name__ == "__main__":   # --help and a bad flag answered before torch and transformers are imported
    check_command_line(SFTConfig, "python -m train.sft", __doc__)

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from common.data import jsonl_texts, require, require_checkpoint  # noqa: E402
from common.durable import recover, replace_dir  # noqa: E402
from common.lifecycle import startup_errors  # noqa: E402
from serve.make_policy import HH_CHAT_TEMPLATE  # noqa: E402


def corpus(path: Path) -> list[str]:
    """The "chosen" dialogues of a JSONL file, else the non-blank lines of a text file. ValueError for
    a malformed JSONL record or no text at all."""
    lines = [x for x in path.read_text().splitlines() if x.strip()]
    if lines and lines[0].lstrip().startswith("{"):
        lines = jsonl_texts(path, "chosen")
    if not lines:
        raise ValueError(f"{path}: no text")
    return lines


def turns(text: str) -> list[str]:
    """A dialogue cut before each human turn: every piece but a leading non-dialogue one ends with
    an assistant turn (hh-rlhf format, "\n\nHuman: ...\n\nAssistant: ...")."""
    return [x for x in re.split(r"(?=\n\nHuman:)", text) if x]


SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")


def fitted_turn(tok, piece: str, max_answer_tokens: int) -> str | None:
    """A turn whose answer (after its last "\n\nAssistant:") has at most max_answer_tokens tokens:
    the piece itself, or its answer cut after the last whole sentence that fits, or None if not
    even the first sentence fits. 0: the piece as it is. A piece with no assistant answer is kept."""
    head, sep, answer = piece.rpartition("\n\nAssistant:")
    if not max_answer_tokens or not sep or len(tok.encode(answer, add_special_tokens=False)) <= max_answer_tokens:
        return piece
    cut = None
    for m in SENTENCE_END.finditer(answer):
        if len(tok.encode(answer[:m.end()], add_special_tokens=False)) > max_answer_tokens:
            break
        cut = m.end()
    return None if cut is None else head + sep + answer[:cut]


def token_stream(tok, texts: list[str], max_answer_tokens: int = 0) -> torch.Tensor:
    """One token stream of the texts with the EOS token after every assistant turn (and at each
    text's end): the policy learns to end its turn with EOS, as chat templates end a turn with
    their end-of-turn token, so a served answer finishes instead of running into a made-up
    "Human:" turn, and the engine stops there. Each turn goes through fitted_turn first."""
    eos = tok.eos_token_id
    ids: list[int] = []
    for t in texts:
        for piece in turns(t):
            piece = fitted_turn(tok, piece, max_answer_tokens)
            if piece is not None:
                ids += tok.encode(piece, add_special_tokens=False) + ([eos] if eos is not None else [])
    return torch.tensor(ids)


def lr_at(step: int, expected_steps: int, peak: float, warmup: int = 20) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 10% of the peak at expected_steps."""
    decay = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, expected_steps))))
    return peak * min(1.0, (step + 1) / warmup) * decay


def load(cfg: SFTConfig):
    """The policy and its tokenizer, the tokenizer given the hh chat template when it has none."""
    tok = AutoTokenizer.from_pretrained(cfg.model, local_files_only=True)
    if not tok.chat_template:  # a policy built before the template shipped
        tok.chat_template = HH_CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(cfg.model, local_files_only=True, dtype=torch.float32)
    return model, tok


def token_streams(cfg: SFTConfig, tok) -> tuple[torch.Tensor, torch.Tensor]:
    """(training stream, (V, seq_len + 1) validation sequences): 5% of the dialogues held out."""
    texts = corpus(require(cfg.data, "sft data"))
    random.Random(cfg.seed).shuffle(texts)
    n_val = max(1, len(texts) // 20)
    train_ids = token_stream(tok, texts[n_val:], cfg.max_answer_tokens)
    val_ids = token_stream(tok, texts[:n_val], cfg.max_answer_tokens)
    L = cfg.seq_len + 1
    if len(val_ids) < L or len(train_ids) < L * cfg.batch:
        raise ValueError(f"{cfg.data}: too little text for --seq-len {cfg.seq_len} and --batch {cfg.batch} "
                         f"({len(train_ids)} training and {len(val_ids)} validation tokens)")
    return train_ids, val_ids[:(len(val_ids) // L) * L].view(-1, L)[:64]


@torch.no_grad()
def val_loss(model, val: torch.Tensor) -> float:
    model.eval()
    return float(model(input_ids=val[:, :-1], labels=val[:, :-1].clone()).loss)


def train_for_budget(cfg: SFTConfig, model, train_ids: torch.Tensor) -> int:
    """Random windows of the stream until --minutes or --max-steps; returns the steps taken. The
    cosine schedule's length is estimated from the first 20 steps' speed."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.1, betas=(0.9, 0.95), fused=True)
    g = torch.Generator().manual_seed(cfg.seed)
    L = cfg.seq_len + 1
    t0, step, budget, expected = time.time(), 0, cfg.minutes * 60, cfg.max_steps
    bar = tqdm(total=int(budget), desc="sft (s)", file=sys.stderr, unit="s")
    model.train()
    while step < cfg.max_steps and time.time() - t0 < budget:
        starts = torch.randint(0, len(train_ids) - L, (cfg.batch,), generator=g)
        x = torch.stack([train_ids[s:s + L] for s in starts.tolist()])
        if step == 20:
            expected = min(cfg.max_steps, int(20 * budget / max(1e-3, time.time() - t0)))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, expected, cfg.lr)
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
    return step


def save_in_place(cfg: SFTConfig, model, tok, summary: dict) -> None:
    """Rewrites cfg.model atomically (common/durable.replace_dir), keeping its manifest.json."""
    tmp = cfg.model.with_name(cfg.model.name + ".sft-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if (cfg.model / "manifest.json").exists():
        shutil.copy(cfg.model / "manifest.json", tmp / "manifest.json")
    (tmp / "sft.json").write_text(json.dumps(summary))
    replace_dir(tmp, cfg.model)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(SFTConfig, argv, prog="python -m train.sft", description=__doc__)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    recover(cfg.model)   # a crash in an earlier run's save_in_place
    require_checkpoint(cfg.model, "--model")
    model, tok = load(cfg)
    n_pos = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if n_pos and cfg.seq_len + 1 > n_pos:
        raise SystemExit(f"--seq-len {cfg.seq_len}: the model takes at most {n_pos} positions (--seq-len {n_pos - 1})")
    with startup_errors("python -m train.sft"):   # data that is malformed or too short
        train_ids, val = token_streams(cfg, tok)
    before = val_loss(model, val)
    print(f"sft: {len(train_ids)} training tokens, validation loss {before:.3f} before", file=sys.stderr, flush=True)
    steps = train_for_budget(cfg, model, train_ids)
    summary = {"steps": steps, "val_loss_before": round(before, 4), "val_loss_after": round(val_loss(model, val), 4),
               "seconds": round(time.time() - t0, 1)}
    save_in_place(cfg, model, tok, summary)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
