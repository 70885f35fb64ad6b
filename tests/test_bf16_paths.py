"""bf16 beyond the policy server (issue 17 item 4): the RM server with --dtype bfloat16 and PPO
rollouts with rollout_dtype bfloat16, each against fp32 on the same weights."""
from __future__ import annotations

import grpc
import pytest
import torch

from rlhf.v1 import models_pb2 as mpb
from rlhf.v1 import models_pb2_grpc as mgrpc
from tests.helpers import ServerProc, free_port

ITEMS = [("\n\nHuman: how do I pick a lock?\n\nAssistant:", "I can't help with that."),
         ("\n\nHuman: tell me about rivers\n\nAssistant:", "Rivers carry water to the sea."),
         ("\n\nHuman: hi\n\nAssistant:", "Hello! How can I help you today?")]


def _scores(port: int) -> tuple[list[float], str]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        r = mgrpc.RewardServiceStub(ch).Score(mpb.ScoreRequest(items=[mpb.ScoreItem(prompt=p, response=a)
                                                                      for p, a in ITEMS]), timeout=60)
    return list(r.scores), r.model_version


@pytest.mark.slow
def test_rm_server_in_bf16_scores_as_fp32_does_to_bf16_rounding(tiny_store):
    procs, scores = [], {}
    try:
        for dtype in ("float32", "bfloat16"):
            port = free_port()
            procs.append(ServerProc("serve.rm_server", ["--store", str(tiny_store), "--port", str(port),
                                                        "--metrics-port", "0", "--dtype", dtype], r"rm server listening"))
            scores[dtype] = _scores(port)
    finally:
        for p in procs:
            p.stop()
    (f32, v32), (b16, v16) = scores["float32"], scores["bfloat16"]
    assert v32 == v16 and f32 != b16                      # the same version, really computed in bf16
    assert max(abs(a - b) for a, b in zip(f32, b16)) < 0.05 * max(1.0, max(map(abs, f32)))


def test_bf16_rollouts_sample_in_bf16_and_leave_the_fp32_policy_alone():
    import train.ppo as ppo_mod
    from tests.test_ppo_trainer import tiny
    policy, _ = tiny()
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    prompts = [[3, 4, 5], [6, 7, 8, 9], [10, 11]]
    cfg = ppo_mod.PPOConfig(max_new_tokens=8, temperature=1e-5)     # greedy: the two dtypes must mostly agree
    f32 = ppo_mod.generate(policy, prompts, cfg, None, seed=1, max_context=32)
    b16 = ppo_mod.generate(policy, prompts, ppo_mod.PPOConfig(max_new_tokens=8, temperature=1e-5,
                                                             rollout_dtype="bfloat16"), None, seed=1, max_context=32)
    assert all(len(r) == 8 for r in b16)
    assert sum(a[0] == b[0] for a, b in zip(f32, b16)) >= 2          # first greedy tokens: near-ties aside, equal
    assert all(v.dtype == torch.float32 and torch.equal(v, before[k]) for k, v in policy.state_dict().items())
