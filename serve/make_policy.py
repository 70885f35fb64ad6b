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
import tempfile
from pathlib import Path

from common.config_cli import check_command_line, parse_config
from common.data import HH_PAIRS, jsonl_records
from common.durable import recover, replace_dir

from .config import SIZES, PolicySpec

if __name__ == "__main__":   # --help and a bad flag answered before torch and transformers are imported
    check_command_line(PolicySpec, "python -m serve.make_policy", __doc__)

import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

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


def corpus_lines(path: Path) -> list[str]:
    if str(path) == "builtin":
        return FALLBACK_CORPUS.splitlines()
    if not path.is_file():
        raise SystemExit(f"tokenizer corpus {path} not found (the repository ships {HH_PAIRS.name} in data/)")
    if path.suffix == ".jsonl":
        try:
            records = jsonl_records(path)
        except ValueError as e:
            raise SystemExit(f"tokenizer corpus {e}") from e
        lines = [rec[k] for _, rec in records for k in ("chosen", "rejected") if isinstance(rec.get(k), str)]
    else:
        lines = path.read_text().splitlines()
    if not any(x.strip() for x in lines):
        raise SystemExit(f"tokenizer corpus {path} holds no text (a .jsonl file needs \"chosen\" or \"rejected\" fields)")
    return lines


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
    # train.sft and train.loop import this module without building a model
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    recover(spec.out)   # a policy a crash of train.sft's save left at <out>.replaced is back, and refused below
    if spec.out.exists() and (not spec.out.is_dir() or any(spec.out.iterdir())):
        # a folder holding a model already (maybe SFT'd: sft.json) would keep files of the old one beside the new
        raise SystemExit(f"--out {spec.out} exists and is not an empty folder: choose a new one or delete it first")
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
    # written beside --out, then renamed to it: an interrupted build leaves no half-written folder that
    # scripts/setup.sh (which builds only where config.json is missing) would take for a policy
    out = spec.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))   # private: two builds do not meet
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "manifest.json").write_text(json.dumps({"version": spec.version, "parent": None,
                                                   "created_by": "serve.make_policy"}, indent=2))
    replace_dir(tmp, out)
    return spec.out


def main(argv: list[str] | None = None) -> None:
    spec = parse_config(PolicySpec, argv, prog="python -m serve.make_policy", description=__doc__)
    out = build(spec)
    print(f"wrote {spec.arch}/{spec.size} policy to {out}")


if __name__ == "__main__":
    main()
