"""PPO trainer details found by review against InstructGPT, lm-human-preferences, TRL and OpenRLHF:
a fresh PPO-ptx batch per step, the missing-EOS penalty, the critic's own optimiser and value
warm-up, a KL controller that moves online, KL of the policy as it is now, the DDP backend, and
ListVersions that verifies."""
from __future__ import annotations

import torch

import train.ppo as ppo_mod
from train import dist
from train import ppo_math as P
from train.ppo import PPOConfig, PPOTrainer, PtxBatches, build_critic, pack

EOS = 0


def tiny(seed=1):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=1, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, eos_token_id=EOS, bos_token_id=EOS)
    policy, ref = GPT2LMHeadModel(cfg).eval(), GPT2LMHeadModel(cfg).eval()
    ref.load_state_dict(policy.state_dict())
    return policy, ref


def trainer(cfg: PPOConfig, ptx=None):
    policy, ref = tiny()
    return PPOTrainer(policy, ref, build_critic(policy), cfg, pad_id=EOS, end_ids=EOS, ptx=ptx)


def batch(n=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, 97, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
    responses = [torch.randint(1, 97, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
    ro = pack(prompts, responses, pad_id=EOS)
    ro.scores = torch.randn(n, generator=g)
    return ro


def test_ptx_draws_a_fresh_batch_for_every_optimiser_step():
    seqs = [[1 + i % 90, 2 + i % 90, 3, 4, 5] for i in range(200)]
    ptx = PtxBatches(seqs, batch=4, seed=0)
    drawn: list[list[list[int]]] = []
    draw = ptx.draw
    ptx.draw = lambda: drawn.append(draw()) or drawn[-1]
    tr = trainer(PPOConfig(minibatch=4, ppo_epochs=2, ptx_coef=1.0), ptx)
    ro = batch()
    tr.update(ro, tr.advantages(ro), seed=5)
    assert len(drawn) == 4                                  # 8 sequences / minibatch 4 x 2 epochs
    assert all(len(b) == 4 for b in drawn)
    assert len({tuple(map(tuple, b)) for b in drawn}) == 4  # each step its own batch
    # under DDP a rank draws its share of the global batch from its own stream
    assert PtxBatches(seqs, 4, 0).draw() != PtxBatches(seqs, 4, 1).draw()


def test_ptx_batches_follow_the_cycle_seed_not_the_process(monkeypatch):
    """run() reseeds the pretraining stream with the cycle's seed: a restarted trainer (a new PtxBatches
    from the same base seed) draws what the cycle's seed says, not its first cycle's batches again."""
    seqs = [[1 + i % 90, 2 + i % 90, 3, 4, 5] for i in range(200)]
    seen = {}
    for cycle_seed in (11, 12):
        ptx = PtxBatches(seqs, batch=4, seed=0)        # what every (re)started trainer builds
        tr = trainer(PPOConfig(iterations=1, rollouts=2, ptx_coef=1.0), ptx)
        monkeypatch.setattr(tr, "iteration", lambda prompts, score_fn, seed, warmup: {"reward": 0.0, "kl": 0.0})
        ppo_mod.run(tr, [[1, 2], [3, 4]], None, seed=cycle_seed, progress=False)
        seen[cycle_seed] = ptx.draw()
    assert seen[11] != seen[12]
    assert seen[11] == PtxBatches(seqs, 4, 11).draw()   # the stream of the cycle's seed


def test_missing_eos_penalty_lowers_unfinished_responses_only(monkeypatch):
    monkeypatch.setattr(ppo_mod, "generate", lambda policy, prompts, cfg, eos, seed, ctx: [[5, 6, EOS], [5, 6, 7]][:len(prompts)])
    tr = trainer(PPOConfig(missing_eos_penalty=0.75, max_new_tokens=3))
    zeros = lambda ps, rs: torch.zeros(len(rs))  # noqa: E731
    ro = tr.rollout([[1, 2], [3, 4]], zeros, seed=0)
    assert ro.scores.tolist() == [0.0, -0.75]
    s = tr.sample([[1, 2], [3, 4]], zeros, seed=0)          # the gates see the RM score and the stop apart
    assert s["scores"].tolist() == [0.0, 0.0] and s["ended"].tolist() == [1.0, 0.0]
    assert ppo_mod.ended([[EOS], [], [3, EOS, 4]], EOS).tolist() == [1.0, 0.0, 0.0]
    assert ppo_mod.ended([[5, 7], [5, 9], [7, 5], [EOS]], (7, 9)).tolist() == [1.0, 1.0, 0.0, 0.0]


def test_rollouts_stop_at_any_end_of_turn_id_as_the_server_does():
    """A chat model's turn ends at its template's end-of-turn token (Llama 3's <|eot_id|>, ChatML's
    <|im_end|>) as well as at eos: rollouts stop there, and `ended` counts them as finished."""
    policy, _ = tiny()
    cfg = PPOConfig(max_new_tokens=12)
    prompts = [[3, 4, 5], [6, 7, 8, 9]]
    free = ppo_mod.generate(policy, prompts, cfg, None, seed=3, max_context=32)   # no stop at all
    assert all(len(r) == 12 for r in free)
    stop = [free[0][4], free[1][6]]       # same seed, same draws: each stops at its first such token
    got = ppo_mod.generate(policy, prompts, cfg, stop, seed=3, max_context=32)
    want = [r[:next(i for i, t in enumerate(r) if t in stop) + 1] for r in free]
    assert got == want and ppo_mod.ended(got, stop).tolist() == [1.0, 1.0]


def test_critic_has_its_own_optimiser_and_the_warmup_fits_the_returns():
    tr = trainer(PPOConfig(lr=1e-5, critic_lr=3e-3, minibatch=4))
    assert tr.opt.param_groups[0]["lr"] == 1e-5 and tr.critic_opt.param_groups[0]["lr"] == 3e-3
    policy_ids = {id(p) for p in tr.policy.parameters()}
    assert not policy_ids & {id(p) for g in tr.critic_opt.param_groups for p in g["params"]}
    ro = batch(16)
    ro.scores = ro.scores * 3   # returns of several units
    a = tr.advantages(ro)
    before = a["explained_variance"]
    assert before < 0.05                                     # a zero value head predicts nothing
    tr.fit_values(ro, a["mc_returns"], epochs=40, seed=0)
    after = tr.advantages(ro)["explained_variance"]
    assert after > 0.5, (before, after)
    # the Monte-Carlo returns are the reward-to-go of the KL-penalised rewards (gamma 1)
    rewards, _ = P.kl_penalized_rewards(ro.scores, a["logp"], a["logp"], ro.mask, tr.kl_ctl.value)
    assert torch.allclose(a["mc_returns"], rewards.flip(1).cumsum(1).flip(1) * ro.mask, atol=1e-6)


def test_kl_controller_defaults_move_beta_within_a_cycle():
    cfg = PPOConfig()
    ctl = P.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    for _ in range(6):                                       # one cycle of the main job: 6 x 32 rollouts
        ctl.update(2 * cfg.kl_target, 32)
    assert ctl.value > 1.15 * cfg.kl_coef
    for _ in range(12):
        ctl.update(0.0, 32)
    assert ctl.value < cfg.kl_coef


def test_sample_measures_the_kl_of_the_policy_as_it_is_now():
    tr = trainer(PPOConfig(max_new_tokens=6))
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    zeros = lambda ps, rs: torch.zeros(len(rs))  # noqa: E731
    assert tr.sample(prompts, zeros, seed=0)["kl"].abs().max() < 1e-5     # policy == reference
    with torch.no_grad():
        for p in tr.policy.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    kl = tr.sample(prompts, zeros, seed=0)["kl"]
    assert (kl > 1e-3).all()


def test_dist_backend_follows_the_tensors_device(monkeypatch):
    assert dist.backend_for("cpu") == "gloo" and dist.backend_for(torch.device("cuda", 0)) == "nccl"
    got = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)   # a GPU machine
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: got.setdefault("backend", backend))
    monkeypatch.setattr(dist, "rank", lambda: 0)
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    dist.init("cpu")                                        # the trainer keeps its tensors on the CPU
    assert got["backend"] == "gloo"


def test_list_versions_verifies_each_version(tmp_path):
    from common.model_store import ModelStore
    from train.loop import version_infos
    st = ModelStore(tmp_path)
    for v in ("v0000", "v0001"):
        st.publish(v, lambda tmp: (tmp / "w.bin").write_bytes(b"weights"), None, {}, {})
    cache: dict = {}
    infos = version_infos(st, "v0001", cache)
    assert [(i.version, i.verified, i.serving) for i in infos] == [("v0000", True, False), ("v0001", True, True)]
    (tmp_path / "v0000" / "w.bin").write_bytes(b"corrupt")
    bad = version_infos(st, "v0001", cache)[0]
    assert not bad.verified and "does not match its blake3" in bad.refused_reason
