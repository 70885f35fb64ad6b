"""Creates a small policy checkpoint locally, with no download: a byte-level BPE tokenizer
trained on a text corpus, and a GPT-2 or Llama model built from a config (random init,
seeded). The result is an ordinary Hugging Face folder that `serve` and `train` load; its tokenizer
carries HH_CHAT_TEMPLATE, so the server renders `messages` requests in the hh format it is trained on.

    python -m serve.make_policy --out models/policy-v0            # the default small policy
    python -m serve.make_policy --out /tmp/tiny --size tiny       # what the tests use
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from common.config_cli import parse_config
from common.data import HH_PAIRS

# (n_layer, d_model, n_head, n_positions); vocab from the tokenizer unless model_vocab_size is set
SIZES = {
    "tiny": (2, 64, 4, 1024),
    "small": (4, 256, 4, 512),
    "gpt2-small": (12, 768, 12, 1024),
}

HH_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '\\n\\nHuman: ' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '\\n\\nAssistant: ' + m['content'] }}"
    "{% else %}{{ m['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n\\nAssistant:' }}{% endif %}"
)
"""The chat template of the default policy: Anthropic's hh-rlhf dialogue format (Bai et al. 2022), the
text the simulator asks and SFT, the RM and PPO train on: "\\n\\nHuman: {user}\\n\\nAssistant: {assistant}"
turns, then "\\n\\nAssistant:" as the generation prompt; a system message is written as it is, first.
No special tokens: a turn ends with eos, which SFT teaches (train/sft.py) and the engine stops at."""

FALLBACK_CORPUS = """Human: What is the capital of France? Assistant: The capital of France is Paris.
Human: Can you help me write a poem about the sea? Assistant: Of course. The sea is wide and blue.
Human: How do I bake bread? Assistant: Mix flour, water, salt and yeast, let it rise, then bake it.
Human: Tell me a joke. Assistant: Why did the chicken cross the road? To get to the other side.
Human: What is two plus two? Assistant: Two plus two is four.
Human: How can I be more productive? Assistant: Make a short list, start with the hardest task, take breaks.
"""


@dataclass(frozen=True)
class PolicySpec:
    """Build a local policy checkpoint (tokenizer + randomly initialised causal LM)."""

    out: Path
    """Folder to write the checkpoint into (created)."""
    arch: str = "gpt2"
    """Model family: gpt2 or llama."""
    size: str = "small"
    """Preset: tiny, small or gpt2-small."""
    vocab_size: int = 4096
    """Tokenizer vocabulary size (byte-level BPE)."""
    model_vocab_size: int = 0
    """Embedding rows if larger than the tokenizer's (0: the tokenizer's size)."""
    corpus: Path = HH_PAIRS
    """JSONL (hh-rlhf style, fields chosen/rejected) or plain text to train the tokenizer on ("builtin": a six-line built-in text, for tests)."""
    seed: int = 0
    """Seed of the random initialisation."""
    version: str = "v0"
    """Model version written to manifest.json."""

    def __post_init__(self) -> None:
        if self.arch not in ("gpt2", "llama"):
            raise ValueError(f"arch must be gpt2 or llama, got {self.arch!r}")
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {sorted(SIZES)}, got {self.size!r}")
        if self.vocab_size < 300:
            raise ValueError("vocab_size must be >= 300 (256 bytes + merges + specials)")


def corpus_lines(path: Path) -> list[str]:
    if str(path) == "builtin":
        return FALLBACK_CORPUS.splitlines()
    if not path.is_file():
        raise SystemExit(f"tokenizer corpus {path} not found (the repository ships {HH_PAIRS.name} in data/)")
    if path.suffix == ".jsonl":
        lines = []
        for row in path.read_text().splitlines():
            rec = json.loads(row)
            lines.extend(rec[k] for k in ("chosen", "rejected") if k in rec)
        return lines
    return path.read_text().splitlines()


def train_tokenizer(lines: list[str], vocab_size: int):

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((re.sub(r"\n+", "\n", x) for x in lines), trainer=trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    out.chat_template = HH_CHAT_TEMPLATE  # saved as chat_template.jinja by transformers 5
    return out


def build(spec: PolicySpec) -> Path:
    # imported here, not at the top: the two model classes cost ~5 s of import on a 2-core EPYC, and
    # train.sft, train.loop and their --help import this module without building a model
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = train_tokenizer(corpus_lines(spec.corpus), spec.vocab_size)
    vocab = max(len(tok), spec.model_vocab_size)
    n_layer, d, n_head, n_pos = SIZES[spec.size]
    eos = tok.eos_token_id
    torch.manual_seed(spec.seed)
    if spec.arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_positions=n_pos, n_embd=d, n_layer=n_layer, n_head=n_head,
                         bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=int(8 * d / 3) // 32 * 32,
                          num_hidden_layers=n_layer, num_attention_heads=n_head,
                          num_key_value_heads=max(1, n_head // 2), max_position_embeddings=n_pos,
                          bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg)
    spec.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(spec.out, safe_serialization=True)
    tok.save_pretrained(spec.out)
    (spec.out / "manifest.json").write_text(json.dumps({"version": spec.version, "parent": None,
                                                        "created_by": "serve.make_policy"}, indent=2))
    return spec.out


def main(argv: list[str] | None = None) -> None:
    spec = parse_config(PolicySpec, argv, prog="python -m serve.make_policy", description=__doc__)
    out = build(spec)
    print(f"wrote {spec.arch}/{spec.size} policy to {out}")


if __name__ == "__main__":
    main()
