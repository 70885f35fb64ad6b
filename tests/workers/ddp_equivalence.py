"""Run alone or under torchrun: a few RM steps and one PPO update on fixed data; rank 0 saves the
resulting parameters to argv[1] so the test can compare 1 process with 2 (same global batch)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from train import dist  # noqa: E402
from train.ppo import PPOConfig, PPOTrainer, build_critic, pack  # noqa: E402
from train.rm_update import Group, RMUpdateConfig, train_rm  # noqa: E402


def tiny_rm(tok_dir: str):
    from transformers import BertConfig, BertModel
    from serve.reward_model import RewardConfig, RewardModel, load_tokenizer
    torch.manual_seed(0)
    bb = BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                              attention_probs_dropout_prob=0.0))
    return RewardModel(bb, RewardConfig(pooling="mean", max_length=32)), load_tokenizer(Path(tok_dir), 32)


def tiny_policy():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(1)
    cfg = GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=1, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval(), GPT2LMHeadModel(cfg).eval()


def main(out: str, tok_dir: str) -> None:
    dist.init()
    rm, tok = tiny_rm(tok_dir)
    # a ranking loss only sees reward differences, so these two biases (a constant shift of every
    # reward) get a gradient of exactly 0 up to rounding, which Adam's first step blows up to +-lr
    # differently in 1 and 2 processes; freezing them keeps the comparison about real gradients
    rm.head.bias.requires_grad_(False)
    rm.backbone.encoder.layer[-1].output.LayerNorm.bias.requires_grad_(False)
    groups = [Group((f"\n\nHuman: q{i}\n\nAssistant: thank you kindly {i}", f"\n\nHuman: q{i}\n\nAssistant: go away {i}"))
              for i in range(12)] + [Group(("a b c", "d e f", "g h i"))] + [Group(("x y", "y x"), tie=True)]
    init = {"rm": {k: v.clone() for k, v in rm.state_dict().items()}}
    train_rm(rm, tok, groups, RMUpdateConfig(epochs=1, batch_groups=7, lr=1e-3, max_steps=2), progress=False)

    policy, ref = tiny_policy()
    ref.load_state_dict(policy.state_dict())
    init["policy"] = {k: v.clone() for k, v in policy.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 97, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist() for _ in range(8)]
    responses = [torch.randint(1, 97, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist() for _ in range(8)]
    ro = pack(prompts, responses, pad_id=0)
    ro.scores = torch.randn(8, generator=g)
    tr = PPOTrainer(policy, ref, build_critic(policy), PPOConfig(minibatch=4, ppo_epochs=2, lr=1e-3), 0, None)
    a = tr.advantages(ro)
    tr.update(ro, a, seed=5)
    if dist.is_main():
        torch.save({"rm": {k: v.clone() for k, v in rm.state_dict().items()},
                    "policy": {k: v.clone() for k, v in policy.state_dict().items()},
                    "critic": {k: v.clone() for k, v in tr.critic.state_dict().items()}, "init": init}, out)
    dist.destroy()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
