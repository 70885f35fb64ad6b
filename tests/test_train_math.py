"""RM and PPO math against hand-computed values and invariances."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from train import ppo_math as P
from train import rm_losses as R


def test_pairwise_loss_hand_computed_and_ties():
    ra, rb = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    got = R.pairwise_loss(ra, rb, torch.tensor([1.0, 1.0]))
    want = (-math.log(1 / (1 + math.exp(-1))) + math.log(2)) / 2
    assert abs(got.item() - want) < 1e-6
    # swapping a and b with the label flipped is the same loss
    assert torch.allclose(R.pairwise_loss(rb, ra, torch.tensor([0.0, 0.0])), got)
    # a tie is minimised when the rewards are equal
    t = torch.tensor([0.5])
    assert R.pairwise_loss(torch.tensor([1.0]), torch.tensor([1.0]), t) < R.pairwise_loss(
        torch.tensor([1.5]), torch.tensor([1.0]), t)
    assert abs(R.pairwise_loss(torch.tensor([3.0]), torch.tensor([3.0]), t).item() - math.log(2)) < 1e-6


def test_kwise_loss_equals_mean_over_pairs_and_ignores_padding():
    r = torch.tensor([[3.0, 1.0, 0.5, 99.0]])   # K=3 real, one padded slot
    got = R.kwise_ranking_loss(r, torch.tensor([3]))
    pairs = [(3.0, 1.0), (3.0, 0.5), (1.0, 0.5)]
    want = sum(-F.logsigmoid(torch.tensor(a - b)).item() for a, b in pairs) / 3
    assert abs(got.item() - want) < 1e-6
    # K=2 ranking is a comparison
    r2 = torch.tensor([[2.0, 1.0, 0.0, 0.0]])
    assert torch.allclose(R.kwise_ranking_loss(r2, torch.tensor([2])),
                          R.pairwise_loss(torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([1.0])))
    # each ranking weighs the same in the batch mean, whatever its K
    both = R.kwise_ranking_loss(torch.cat([r, r2]), torch.tensor([3, 2]))
    assert abs(both.item() - (want + R.kwise_ranking_loss(r2, torch.tensor([2])).item()) / 2) < 1e-6


def test_accuracy_and_calibration():
    assert R.pairwise_accuracy(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, 2.0])).item() == 0.5
    big = torch.full((100,), 10.0)
    assert R.expected_calibration_error(big, torch.zeros(100)).item() < 1e-3  # confident and right
    assert R.expected_calibration_error(torch.zeros(100), big).item() > 0.99  # confident and wrong


def test_fit_bt_scale_hand_computed():
    # margins [1, -1, 1]: maximise 2 log s(w) + log s(-w) -> 2 s(-w) = s(w) -> s(w) = 2/3 -> w = ln 2
    assert abs(R.fit_bt_scale(torch.tensor([1.0, -1.0, 1.0]), l2=0.0) - math.log(2)) < 1e-9
    # the sign follows the data; scaling the feature by 2 halves w; the L2 term shrinks it
    assert abs(R.fit_bt_scale(torch.tensor([-1.0, 1.0, -1.0]), l2=0.0) + math.log(2)) < 1e-9
    assert abs(R.fit_bt_scale(torch.tensor([2.0, -2.0, 2.0]), l2=0.0) - math.log(2) / 2) < 1e-9
    assert 0 < R.fit_bt_scale(torch.tensor([1.0, -1.0, 1.0]), l2=0.1) < math.log(2)
    assert R.fit_bt_scale(torch.tensor([1.0, -1.0]), l2=0.0) == 0.0     # no signal: no weight


def test_fit_bt_two_features_hand_computed():
    # each feature is non-zero on its own rows, so the fit splits into two one-feature fits; each
    # has 2 margins of +1 and 1 of -1: sigmoid(w) = 2/3, w = log 2 (mean over all rows: same zero)
    d = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, -1.0]])
    assert torch.allclose(R.fit_bt(d, l2=0.0), torch.full((2,), math.log(2), dtype=torch.float64), atol=1e-9)
    d = torch.tensor([[1.0, 1.0], [-1.0, 0.0], [1.0, 0.0], [0.0, -2.0]])   # correlated: the fit's gradient is 0
    w = R.fit_bt(d, l2=0.1)
    grad = d.double().T @ (1 - torch.sigmoid(d.double() @ w)) / 4 - 0.1 * w
    assert grad.abs().max() < 1e-9


def test_gae_with_gamma_lambda_1_is_reward_to_go_minus_value():
    rewards = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    values = torch.tensor([[0.3, 0.2, 0.1, 9.0], [1.0, 2.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    adv, ret = P.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    rtg = torch.tensor([[3.0, 2.0, 2.0, 0.0], [1.0, 0.5, 0.0, 0.0]])
    assert torch.allclose(ret, rtg)
    assert torch.allclose(adv, (rtg - values) * mask)


def test_gae_hand_computed_gamma_lambda():
    r, v, m = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.25]]), torch.ones(1, 2)
    adv, _ = P.gae(r, v, m, gamma=0.9, lam=0.5)
    d1 = 1.0 - 0.25
    d0 = 0.0 + 0.9 * 0.25 - 0.5
    assert torch.allclose(adv, torch.tensor([[d0 + 0.9 * 0.5 * d1, d1]]))


def test_padding_does_not_change_losses():
    torch.manual_seed(0)
    lp, olp, adv = torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3)
    m = torch.ones(2, 3)
    pad = lambda x, v=0.0: torch.cat([x, torch.full((2, 2), v)], 1)  # noqa: E731
    mp = pad(m)
    a, _ = P.policy_loss(lp, olp, adv, m)
    b, _ = P.policy_loss(pad(lp, 5.0), pad(olp, -3.0), pad(adv, 7.0), mp)
    assert torch.allclose(a, b)
    va, _ = P.value_loss(lp, olp, adv, m)
    vb, _ = P.value_loss(pad(lp, 1.0), pad(olp, 2.0), pad(adv, 3.0), mp)
    assert torch.allclose(va, vb)
    # KL-penalised rewards: -0.1 (logp - ref) per token, score 1.0 added on the last real token
    klp, klref = torch.tensor([[-1.0, -0.5, -2.0]]), torch.tensor([[-1.5, -0.5, -1.0]])   # logp - ref = [0.5, 0, -1]
    ra, _ = P.kl_penalized_rewards(torch.tensor([1.0]), klp, klref, m[:1], 0.1)
    assert torch.allclose(ra, torch.tensor([[-0.05, 0.0, 0.1 + 1.0]]))
    klp_pad, klref_pad = torch.tensor([[-1.0, -0.5, -2.0, 4.0, 4.0]]), torch.tensor([[-1.5, -0.5, -1.0, 0.0, 0.0]])
    rb, _ = P.kl_penalized_rewards(torch.tensor([1.0]), klp_pad, klref_pad, mp[:1], 0.1)
    assert torch.allclose(rb, torch.tensor([[-0.05, 0.0, 1.1, 0.0, 0.0]]))


def test_kl_penalty_puts_the_score_on_the_last_real_token():
    lp = torch.tensor([[-1.0, -2.0, -3.0]])
    ref = torch.tensor([[-1.5, -2.0, -1.0]])
    m = torch.tensor([[1, 1, 0]])
    r, kl = P.kl_penalized_rewards(torch.tensor([4.0]), lp, ref, m, kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, 0.0, 0.0]]))
    assert torch.allclose(r, torch.tensor([[-0.05, 4.0, 0.0]]))


def test_clipped_policy_loss_hand_computed():
    adv = torch.tensor([[1.0, -1.0]])
    old = torch.zeros(1, 2)
    new = torch.tensor([[math.log(1.5), math.log(0.5)]])
    loss, st = P.policy_loss(new, old, adv, torch.ones(1, 2), clip=0.2)
    # token 0: min(1.5, 1.2) * 1 -> 1.2; token 1: max(0.5, 0.8) * -1 -> loss 0.8 ... -min(-0.5, -0.8) = 0.8
    assert abs(loss.item() - (-1.2 + 0.8) / 2) < 1e-6
    assert st["clipfrac"].item() == 1.0


def test_unequal_ragged_micro_batches_with_denom_sum_to_one_batch():
    """Shards of unequal size and token count, each trimmed to its own longest row (as `_trimmed`
    does), with denom = the batch's token count: their losses and gradients add up to the token
    mean of the whole batch. A per-shard token mean would weigh the 1-token row like 6 tokens."""
    torch.manual_seed(1)
    w = torch.randn(4, requires_grad=True)
    x, adv, olp = torch.randn(8, 6, 4), torch.randn(8, 6), torch.randn(8, 6) * 0.1
    old_v, ret = torch.randn(8, 6), torch.randn(8, 6)
    lens = torch.tensor([6, 2, 5, 1, 3, 6, 4, 2])
    mask = (torch.arange(6)[None, :] < lens[:, None]).float()           # (8, 6) right-padded
    n_tok = float(mask.sum())

    def loss_of(lo, hi, denom):
        T = int(lens[lo:hi].max())
        sl = (slice(lo, hi), slice(0, T))
        lp = (x[sl] @ w) * 0.1                                           # (hi - lo, T)
        pg, _ = P.policy_loss(lp, olp[sl], adv[sl], mask[sl], denom=denom)
        vf, _ = P.value_loss(lp * 10, old_v[sl], ret[sl], mask[sl], denom=denom)
        return pg + vf

    full = loss_of(0, 8, None)
    g_full, = torch.autograd.grad(full, w)
    shards = [(0, 3), (3, 4), (4, 8)]
    parts = [loss_of(lo, hi, n_tok) for lo, hi in shards]
    assert torch.allclose(sum(parts), full, atol=1e-6)
    g_acc = sum(torch.autograd.grad(p, w)[0] for p in parts)
    assert torch.allclose(g_full, g_acc, atol=1e-6)
    # without denom the shards' mean is not the batch's: the invariance above is not vacuous
    g_naive = sum(torch.autograd.grad(loss_of(lo, hi, None), w)[0] for lo, hi in shards) / len(shards)
    assert not torch.allclose(g_full, g_naive, atol=1e-3)


def test_whiten_and_explained_variance():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[1, 1, 1, 0]])
    w = P.whiten(x, m)
    assert abs(P.masked_mean(w, m).item()) < 1e-6 and w[0, 3] == 0
    assert abs(P.masked_var(w, m).item() - 1) < 1e-4
    r = torch.tensor([[1.0, 2.0, 3.0]])
    assert abs(P.explained_variance(r, r, torch.ones(1, 3)).item() - 1) < 1e-6


def test_adaptive_kl_controller():
    c = P.AdaptiveKLController(value=0.1, target=6.0, horizon=10000)
    c.update(12.0, 1000)          # error clipped to +0.2
    assert abs(c.value - 0.1 * 1.02) < 1e-12
    c.update(0.0, 1000)           # error clipped to -0.2
    assert abs(c.value - 0.1 * 1.02 * 0.98) < 1e-12
    assert P.FixedKLController(0.05).update(100.0, 10) == 0.05
