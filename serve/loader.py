"""Loads a local Hugging Face causal-LM checkpoint folder (a serve.model.SUPPORTED family) for serving.

Nothing is downloaded: the folder must hold config.json, the weights (safetensors) and
the tokenizer files. The model version is read from the folder's manifest.json when the
trainer wrote one, else derived from the folder name.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .model import CausalLM, from_hf, pack_for_cpu


@dataclass
class LoadedPolicy:
    model: CausalLM
    tokenizer: object
    version: str
    path: Path
    eos_id: int | None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def read_version(path: Path) -> str:
    """From the folder's manifest.json, or its parent's (a model-store version holds policy/ and rm/)."""
    for manifest in (path / "manifest.json", path.parent / "manifest.json"):
        if manifest.exists():
            return str(json.loads(manifest.read_text())["version"])
    return path.name


def load_policy(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu",
                cpu_pack: str = "all") -> LoadedPolicy:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub download at run time is a bug
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy import, at the edge

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint folder (no config.json)")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = pack_for_cpu(from_hf(hf).to(device), cpu_pack)
    del hf
    eos = tok.eos_token_id if tok.eos_token_id is not None else model_eos(path)
    return LoadedPolicy(model=model, tokenizer=tok, version=read_version(path), path=path, eos_id=eos)


def model_eos(path: Path) -> int | None:
    cfg = json.loads((path / "config.json").read_text())
    eos = cfg.get("eos_token_id")
    return eos[0] if isinstance(eos, list) else eos
