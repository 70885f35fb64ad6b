"""Loads a local Hugging Face causal-LM checkpoint folder (a serve.model.SUPPORTED family) for serving.

Nothing is downloaded: the folder must hold config.json, the weights (safetensors) and
the tokenizer files. The model version is read from the folder's manifest.json when the
trainer wrote one, else derived from the folder name. A chat template in the tokenizer files
(tokenizer_config.json or chat_template.jinja) renders `messages` requests, and generation ends
at the template's end-of-turn token as well as at eos.
"""
from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from . import quantize
from .model import _STATE_MAPS, CausalLM, _llama_state, args_from_hf_config, from_hf, pack_for_cpu, rope_inv_freq


@dataclass
class LoadedPolicy:
    model: CausalLM
    tokenizer: object
    version: str
    path: Path
    eos_id: int | None
    end_ids: tuple[int, ...] = ()
    """Generation ends at any of these: eos and the chat template's end-of-turn token(s) (end_of_turn_ids)."""
    control_tokens: re.Pattern | None = field(default=None, repr=False)
    """Matches any special token of the tokenizer (chat message contents may not hold one)."""

    def __post_init__(self) -> None:
        if not self.end_ids and self.eos_id is not None:
            self.end_ids = (self.eos_id,)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @property
    def chat_template(self) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) or None

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt text of a conversation: the chat template with the generation prompt. Its tokens
        (`encode`) are apply_chat_template(messages, add_generation_prompt=True, tokenize=True)'s, which
        also tokenises the rendered text without adding special tokens."""
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def read_version(path: Path) -> str:
    """From the folder's manifest.json, or its parent's (a model-store version holds policy/ and rm/)."""
    for manifest in (path / "manifest.json", path.parent / "manifest.json"):
        if manifest.exists():
            return str(json.loads(manifest.read_text())["version"])
    return path.name


def load_policy(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu",
                cpu_pack: str = "all", quantize_mode: str = "none") -> LoadedPolicy:
    """quantize_mode (serve.quantize.MODES): int8 swaps the Linears for int8 ones; whatever it leaves an
    nn.Linear is then packed per cpu_pack. Raises serve.quantize.QuantizationUnsupported for a mode
    this torch build, CPU or device cannot run."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub download at run time is a bug
    # imported after HF_HUB_OFFLINE is set: huggingface_hub reads it once, when it is first imported
    # (the policy server imports transformers nowhere else before its first load)
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint folder (no config.json)")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if not tok.encode("hello", add_special_tokens=False):   # transformers builds an empty one from a folder without its files
        raise FileNotFoundError(f"{path} holds no tokenizer (tokenizer.json, or the vocabulary files of its family)")
    model = pack_for_cpu(quantize.apply(model_from_checkpoint(path, dtype).to(device), quantize_mode), cpu_pack)
    eos = tok.eos_token_id if tok.eos_token_id is not None else model_eos(path)
    specials = special_tokens(tok)
    return LoadedPolicy(model=model, tokenizer=tok, version=read_version(path), path=path, eos_id=eos,
                        end_ids=end_of_turn_ids(tok, path, eos),
                        control_tokens=re.compile("|".join(map(re.escape, specials))) if specials else None)


def model_eos(path: Path) -> int | None:
    eos = _json(path / "config.json").get("eos_token_id")
    return eos[0] if isinstance(eos, list) else eos


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def special_tokens(tok) -> list[str]:
    """Every special (control) token's text, longest first."""
    found = {t.content for t in tok.added_tokens_decoder.values() if t.special} | set(tok.all_special_tokens)
    return sorted((t for t in found if t), key=len, reverse=True)


TURN_PROBE = "\x00turn-end-probe\x00"


def end_of_turn_ids(tok, path: Path, eos: int | None) -> tuple[int, ...]:
    """The ids generation ends at, as transformers' `generate` would for this folder and more:
    eos; every eos_token_id of generation_config.json and config.json (an int or a list: Llama 3
    lists <|eot_id|>, Qwen2 chat models <|im_end|>); and the special token the chat template writes
    right after an assistant message's content (<|im_end|> in ChatML also for a Qwen base model,
    whose generation config names only <|endoftext|>)."""
    ids = {eos} if eos is not None else set()
    for cfg in (_json(path / "generation_config.json"), _json(path / "config.json")):
        e = cfg.get("eos_token_id")
        ids.update(e if isinstance(e, list) else [e] if e is not None else [])
    if getattr(tok, "chat_template", None):
        try:
            text = tok.apply_chat_template([{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": TURN_PROBE}], tokenize=False)
        except Exception:  # a template that refuses this conversation: no end-of-turn token from it
            text = ""
        after = text.rsplit(TURN_PROBE, 1)[-1].lstrip() if TURN_PROBE in text else ""
        end = next((t for t in special_tokens(tok) if after.startswith(t)), None)
        if end is not None:
            ids.add(tok.convert_tokens_to_ids(end))
    return tuple(sorted(ids))


def model_from_checkpoint(path: Path, dtype: torch.dtype) -> CausalLM:
    """The CausalLM of a checkpoint folder, equal bit for bit to from_hf(AutoModelForCausalLM.from_pretrained(
    path, dtype=dtype)) but built without the transformers model. Why: a hot swap loads on the cores the
    engine is serving on, and for a GPT-2-small-sized checkpoint the transformers route spent 0.43 s
    randomly initialising CausalLM weights that load_state_dict then overwrote, and more copying into
    them. Here the module is made on the meta device (no memory, no init) and takes the tensors by
    assignment; the safetensors files are memory-mapped, and only what the mapping to CausalLM names
    leaves unconverted is copied, once (own_memory). load_policy of that checkpoint, CPU seconds on 2
    Xeon cores shared with other work: 1.9 -> 1.1 (2 torch threads), 1.15 -> 0.5 (1 thread).
    Folders without safetensors weights go through transformers."""
    from transformers import AutoConfig, AutoModelForCausalLM  # local like load_policy's: after HF_HUB_OFFLINE

    shards = safetensors_shards(path)
    if not shards:
        return from_hf(AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True))
    a = args_from_hf_config(AutoConfig.from_pretrained(path, local_files_only=True))
    loaded = {}
    for shard in shards:
        loaded.update(load_file(path / shard))
    sd = _STATE_MAPS.get(a.arch, _llama_state)(
        {k: v.to(dtype) if v.is_floating_point() else v for k, v in loaded.items()}, a)
    sd = own_memory(sd, {t.untyped_storage().data_ptr() for t in loaded.values()})
    with torch.device("meta"), no_random_init():
        m = CausalLM(a)
    missing, unexpected = m.load_state_dict(sd, strict=False, assign=True)
    if a.arch != "gpt2":   # a buffer, not in the checkpoint: computed in fp32, as transformers does
        m.inv_freq = rope_inv_freq(a)
    missing = [k for k in missing if k != "inv_freq"]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return m.eval()


RANDOM_INITS = ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                "xavier_normal_", "orthogonal_")


@contextmanager
def no_random_init():
    """torch.nn.init's random initialisers (RANDOM_INITS) do nothing while it lasts. For a module built
    on the meta device, whose weights are assigned from a checkpoint next: there they compute nothing,
    but the first call in a process imports torch's Python decompositions, 2.0-2.9 s on 2 EPYC cores,
    a third of a policy server's start. Process-wide while it lasts (milliseconds), as transformers'
    no_init_weights: no other thread of a process that loads a policy builds modules meanwhile (the
    server's engine thread only runs forwards during a hot swap's load)."""
    saved = {name: getattr(torch.nn.init, name) for name in RANDOM_INITS}
    try:
        for name in RANDOM_INITS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def own_memory(sd: dict[str, torch.Tensor], file_storages: set[int]) -> dict[str, torch.Tensor]:
    """`sd` with a copy of every tensor that still views a memory-mapped file (storage pointer in
    `file_storages`): served weights stay in the process's memory, as transformers' route left them,
    not in page cache the kernel may drop under pressure and read back from disk mid-request. A tensor
    under two names (tied embeddings) stays one tensor."""
    copies: dict[int, torch.Tensor] = {}
    out = {}
    for name, t in sd.items():
        if t.untyped_storage().data_ptr() in file_storages:
            if id(t) not in copies:
                copies[id(t)] = t.clone()
            t = copies[id(t)]
        out[name] = t
    return out


def safetensors_shards(path: Path) -> list[str]:
    """The weight files of a checkpoint folder, as transformers picks them: the shards its
    model.safetensors.index.json names, else model.safetensors; [] if the weights are not safetensors."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return ["model.safetensors"] if (path / "model.safetensors").exists() else []
