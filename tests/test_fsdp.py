"""FSDP2 (`--rm.parallel fsdp`, `--ppo.parallel fsdp`): two gloo processes on the CPU train sharded
copies of the RM, the policy and the critic, and end with the same parameters as one process that
took the same steps on the same global batches (as the DDP test in tests/test_trainer.py)."""
from __future__ import annotations

import os

import pytest
import torch

from common.net import free_port


def _steps(parallel: str, tok_dir: str) -> dict:
    """Two RM steps, one pass of value warm-up and one PPO update (2 epochs x 2 minibatches) on
    fixed data; every module's parameters after them, and whether training ran on FSDP2 shards."""
    from tests.workers.ddp_equivalence import tiny_policy, tiny_rm
    from train import dist
    from train.ppo import PPOConfig, PPOTrainer, build_critic, pack
    from train.rm_update import Group, RMUpdateConfig, train_rm

    rm, tok = tiny_rm(tok_dir)
    # rewards only enter the loss as differences: these two biases get gradients of 0 up to rounding,
    # which Adam's first step blows up to +-lr differently in 1 and 2 processes (the DDP test's reason)
    rm.head.bias.requires_grad_(False)
    rm.backbone.encoder.layer[-1].output.LayerNorm.bias.requires_grad_(False)
    groups = [Group((f"\n\nHuman: q{i}\n\nAssistant: thank you kindly {i}", f"\n\nHuman: q{i}\n\nAssistant: go away {i}"))
              for i in range(12)] + [Group(("a b c", "d e f", "g h i"))] + [Group(("x y", "y x"), tie=True)]
    train_rm(rm, tok, groups, RMUpdateConfig(epochs=1, batch_groups=7, lr=1e-3, max_steps=2, parallel=parallel),
             progress=False)

    policy, ref = tiny_policy()
    ref.load_state_dict(policy.state_dict())
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 97, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist() for _ in range(8)]
    responses = [torch.randint(1, 97, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist() for _ in range(8)]
    ro = pack(prompts, responses, pad_id=0)
    ro.scores = torch.randn(8, generator=g)
    tr = PPOTrainer(policy, ref, build_critic(policy), PPOConfig(minibatch=4, ppo_epochs=2, lr=1e-3, parallel=parallel),
                    0, None)
    a = tr.advantages(ro)
    tr.fit_values(ro, a["mc_returns"], epochs=1, seed=4)
    tr.update(ro, tr.advantages(ro), seed=5)
    return {"rm": {k: v.clone() for k, v in rm.state_dict().items()},
            "policy": {k: v.clone() for k, v in policy.state_dict().items()},
            "critic": {k: v.clone() for k, v in tr.critic.state_dict().items()},
            "sharded": [dist.is_sharded_copy(tr.policy_d), dist.is_sharded_copy(tr.critic_d)]}


def _rank(rank: int, world: int, port: int, tok_dir: str, out: str) -> None:
    """One of the processes: joins over gloo as torchrun would have it (the env), runs the steps."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from train import dist
    dist.init("cpu")
    try:
        res = _steps("fsdp", tok_dir)
        if dist.is_main():
            torch.save(res, out)
    finally:
        dist.destroy()


@pytest.mark.slow
def test_fsdp_two_processes_equal_one_for_the_same_global_batches(tmp_path):
    import torch.multiprocessing as mp

    from serve.reward_model import default_backbone
    out = tmp_path / "two.pt"
    mp.spawn(_rank, args=(2, free_port(), str(default_backbone()), str(out)), nprocs=2, join=True)
    two = torch.load(out)
    assert two["sharded"] == [True, True]   # the steps ran on FSDP2 shards, not on whole modules
    one = _steps("fsdp", str(default_backbone()))   # in one process "fsdp" trains the module itself
    assert one["sharded"] == [False, False]
    for part in ("rm", "policy", "critic"):
        assert one[part].keys() == two[part].keys(), part
        for name, v in one[part].items():
            assert torch.allclose(v, two[part][name], atol=1e-5), (part, name, (v - two[part][name]).abs().max())
    # and the steps moved the weights: a comparison of untouched ones would pass trivially
    from tests.workers.ddp_equivalence import tiny_policy
    init = tiny_policy()[0].state_dict()
    assert max((one["policy"][k] - init[k]).abs().max().item() for k in init) > 1e-4


def test_wrap_refuses_an_unknown_parallel_choice():
    from train import dist
    from train.ppo import PPOConfig
    from train.rm_update import RMUpdateConfig
    with pytest.raises(ValueError, match="parallel"):
        dist.wrap(torch.nn.Linear(2, 2), "zero3")
    with pytest.raises(ValueError, match="parallel"):
        PPOConfig(parallel="zero3")
    with pytest.raises(ValueError, match="parallel"):
        RMUpdateConfig(parallel="fsdp2")
