"""Trainer throughput: RM pairs/s and PPO samples/s on a fixed small setup, and the same RM steps
with TRL's RewardTrainer on the same model, batch and texts, in the same run.

    python bench/train_throughput.py            (--quick: under a minute)

RM: MiniLM-L6 (the default backbone), 8 pairs per step, texts under 64 tokens (TRL filters out
longer samples instead of truncating, so both must see whole texts), Bradley-Terry loss, fp32.
PPO: the default small policy config (4 layers, d=256) built from scratch, 32 rollouts of 24
tokens per iteration through serve.engine, 4 PPO epochs of minibatch 8 (samples/s = rollouts /
iteration time, generation included).
TRL runs in a subprocess with its own interpreter (--trl-python; default: this one if `import trl`
works, else a venv in build/trl-venv with the pinned trl installed with --system-site-packages so it
shares torch and transformers). TRL 1.x has no PPO trainer (it was removed), so the PPO ratio is
reported as unavailable with that reason. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
TRL_VERSION = "1.16.0"

WORDS = "apple river stone cloud music paper garden window silver coffee mountain letter".split()


def pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        # short enough (< 50 tokens) that neither side truncates; TRL drops samples over max_length
        base = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
        p = f"\n\nHuman: tell me about {base}\n\nAssistant: {base}"
        out.append((f"{p}, thank you kindly", f"{p}, go away now"))
    return out


def ours_rm(steps: int, batch: int, max_length: int) -> dict:
    import torch

    from common.malloc import keep_freed_memory
    from serve import reward_model
    from train.rm_update import Group, RMUpdateConfig, train_rm
    keep_freed_memory()   # as train.loop and train.rm_train do at start-up
    torch.manual_seed(0)
    rm, tok = reward_model.build(reward_model.default_backbone(), max_length)
    data = [Group(p) for p in pairs(steps * batch)]
    # without dropout, as TRL's RewardConfig (disable_dropout=True) and train.rm_train; the online trainer
    # keeps the backbone's dropout (--rm.dropout -1, see RMUpdateConfig.dropout)
    cfg = RMUpdateConfig(epochs=1, batch_groups=batch, max_steps=steps, max_length=max_length, lr=5e-5, dropout=0.0)
    train_rm(rm, tok, data[:batch], replace(cfg, max_steps=1), progress=False)   # warm-up step
    t0 = time.perf_counter()
    st = train_rm(rm, tok, data, cfg, progress=False)
    dt = time.perf_counter() - t0
    return {"pairs_per_s": steps * batch / dt, "seconds": dt, "final_loss": st["rm_loss"]}


TRL_SCRIPT = r"""
import json, sys, time, os
os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
if sys.argv[6] == "same-allocator":   # the allocator settings our trainer sets (common/malloc.py)
    sys.path.insert(0, sys.argv[7])
    from common.malloc import keep_freed_memory
    assert keep_freed_memory()
import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
from trl import RewardConfig, RewardTrainer
backbone, steps, batch, max_length, out_dir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
data = json.loads(sys.stdin.read())
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(backbone)
tok.truncation_side = "left"
if tok.eos_token is None:   # TRL appends EOS to every text; BERT's end-of-sequence is [SEP]
    tok.eos_token = tok.sep_token
model = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=1)
ds = Dataset.from_list([{"chosen": c, "rejected": r} for c, r in data])
cfg = RewardConfig(output_dir=out_dir, per_device_train_batch_size=batch, max_steps=steps + 1, max_length=max_length,
                   learning_rate=5e-5, logging_steps=10**9, save_strategy="no", report_to=[], use_cpu=True,
                   dataloader_num_workers=0, disable_tqdm=True, center_rewards_coefficient=None,
                   bf16=False, gradient_checkpointing=False)   # as ours: fp32, no checkpointing (TRL 1.x
                                                               # defaults to both; bf16 is emulated on AVX2 CPUs)
marks = {}
class Clock(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 1:
            marks["t1"] = time.perf_counter()   # after the warm-up step, as for ours
        marks["end"] = time.perf_counter()
tr = RewardTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
tr.train()
dt = marks["end"] - marks["t1"]
print(json.dumps({"pairs_per_s": steps * batch / dt, "seconds": dt}))
"""


def trl_python() -> str | None:
    try:
        import trl  # noqa: F401
        return sys.executable
    except ImportError:
        pass
    venv = REPO / "build" / "trl-venv"
    py = venv / "bin" / "python"
    if not py.exists():
        print(f"installing trl=={TRL_VERSION} into {venv} (shares this interpreter's torch/transformers)",
              file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        r = subprocess.run([str(py), "-m", "pip", "install", "-q", f"trl=={TRL_VERSION}"], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"TRL did not install: {r.stderr[-500:]}", file=sys.stderr)
            return None
    return str(py)


def trl_rm(py: str, steps: int, batch: int, max_length: int, allocator: str = "default") -> dict:
    """TRL's RewardTrainer in its own process; allocator "same-allocator" gives it the glibc settings
    our trainer processes set at start-up (common/malloc.py), "default" runs it as a TRL user would."""
    from serve.reward_model import default_backbone
    data = pairs((steps + 1) * batch)
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run([py, "-c", TRL_SCRIPT, str(default_backbone()), str(steps), str(batch), str(max_length), d,
                            allocator, str(REPO)],
                           input=json.dumps(data), capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"TRL RewardTrainer failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def ours_ppo(iterations: int, rollouts: int) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from sim.preference import true_score  # noqa: F401  (documents the kind of reward; a fixed scorer here)
    from train.ppo import PPOConfig, PPOTrainer, build_critic
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=4096, n_positions=512, n_embd=256, n_layer=4, n_head=4, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, eos_token_id=0, bos_token_id=0)
    policy, ref = GPT2LMHeadModel(cfg).eval(), GPT2LMHeadModel(cfg).eval()
    ref.load_state_dict(policy.state_dict())
    pcfg = PPOConfig(rollouts=rollouts, minibatch=8, ppo_epochs=4, max_new_tokens=24, lr=1e-5)
    tr = PPOTrainer(policy, ref, build_critic(policy), pcfg, pad_id=0, end_ids=None)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 4096, (32,), generator=g).tolist() for _ in range(64)]
    score = lambda ps, rs: torch.tensor([float(sum(t % 7 == 0 for t in r)) / len(r) for r in rs])  # noqa: E731
    tr.iteration(prompts[:rollouts], score, seed=0)   # warm-up
    t0 = time.perf_counter()
    stats = [tr.iteration(prompts[:rollouts], score, seed=it + 1) for it in range(iterations)]
    dt = time.perf_counter() - t0
    parts = ("generate", "score", "logprobs", "update")
    spent = {k: sum(st[f"seconds_{k}"] for st in stats) for k in parts}
    # where an iteration's time goes (PPOTrainer.iteration's own clock): the next bottleneck
    return {"samples_per_s": iterations * rollouts / dt, "seconds": dt,
            "share": {k: round(v / dt, 3) for k, v in spent.items()},
            "share_other": round(1 - sum(spent.values()) / dt, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a run under a minute")
    ap.add_argument("--trl-python", default="", help="interpreter with trl installed (default: see above)")
    ap.add_argument("--no-trl", action="store_true", help="skip the TRL comparison")
    a = ap.parse_args()
    rm_steps, ppo_iters = (4, 1) if a.quick else (30, 4)
    batch, max_length, rollouts = 8, 64, 32
    res: dict = {"setup": {"rm_backbone": "MiniLM-L6", "rm_batch_pairs": batch, "rm_max_length": max_length,
                           "rm_steps": rm_steps, "ppo_policy": "gpt2 4x256", "ppo_rollouts": rollouts,
                           "ppo_new_tokens": 24, "ppo_iterations": ppo_iters, "threads": os.cpu_count()}}
    res["ours_rm"] = ours_rm(rm_steps, batch, max_length)
    print(f"ours: RM {res['ours_rm']['pairs_per_s']:.2f} pairs/s", file=sys.stderr, flush=True)
    py = None if a.no_trl else (a.trl_python or trl_python())
    if py:
        res["trl_rm"] = trl_rm(py, rm_steps, batch, max_length)
        res["rm_ratio_ours_over_trl"] = res["ours_rm"]["pairs_per_s"] / res["trl_rm"]["pairs_per_s"]
        print(f"TRL:  RM {res['trl_rm']['pairs_per_s']:.2f} pairs/s", file=sys.stderr, flush=True)
        # the same comparison with TRL given our allocator settings: what the code alone is worth
        res["trl_rm_same_allocator"] = trl_rm(py, rm_steps, batch, max_length, "same-allocator")
        res["rm_ratio_ours_over_trl_same_allocator"] = (res["ours_rm"]["pairs_per_s"]
                                                        / res["trl_rm_same_allocator"]["pairs_per_s"])
        print(f"TRL with our allocator settings: RM {res['trl_rm_same_allocator']['pairs_per_s']:.2f} pairs/s",
              file=sys.stderr, flush=True)
    else:
        res["trl_rm"] = "not run"
    res["ours_ppo"] = ours_ppo(ppo_iters, rollouts)
    print(f"ours: PPO {res['ours_ppo']['samples_per_s']:.2f} samples/s; time in "
          + ", ".join(f"{k} {v:.0%}" for k, v in res["ours_ppo"]["share"].items()), file=sys.stderr, flush=True)
    res["trl_ppo"] = (f"not available: trl {TRL_VERSION} (the newest that installs next to transformers 5.x) has "
                      "no PPO trainer")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
