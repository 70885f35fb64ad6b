"""The trainer's decision rules (train/rules.py) against hand-computed cases."""
from __future__ import annotations

import math

import pytest
import torch

from train import rules


def due(new, seconds, paused=False, left=None):
    return rules.cycle_due(new, seconds, paused=paused, versions_left=left, cycle_groups=64, min_groups=16,
                           cycle_seconds=600)


def test_cycle_due_counts_groups_then_time_never_when_paused_or_out_of_versions():
    assert not due(63, 0) and due(64, 0)
    assert not due(15, 10_000) and due(16, 600) and not due(16, 599)
    assert not due(1000, 10_000, paused=True)
    assert not due(1000, 10_000, left=0) and due(64, 0, left=1)


def test_heldout_split_is_by_prompt_stable_and_near_the_fraction():
    prompts = [f"\n\nHuman: question number {i}?\n\nAssistant:" for i in range(4000)]
    held = [p for p in prompts if rules.is_heldout(p, 0.2)]
    assert held == [p for p in prompts if rules.is_heldout(p, 0.2)]
    assert 0.17 < len(held) / len(prompts) < 0.23
    # the same prompt with other case or spacing lands on the same side
    for p in prompts[:200]:
        assert rules.is_heldout(p, 0.2) == rules.is_heldout("  " + p.upper().replace(" ", "   "), 0.2)


def test_paired_difference_hand_computed():
    # one item per cluster: the usual standard error of a mean difference, var(d) / n
    a, b = torch.tensor([1.0, 1.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 0.0, 0.0])
    p = rules.paired_difference(a, b, [0, 1, 2, 3])
    # d = [1, 0, 0, 1], mean 0.5, deviations +-0.5: sum of squares 1, / 16 * 4/3 = 1/12
    assert p.diff == 0.5 and abs(p.se - math.sqrt(1 / 12)) < 1e-12 and p.n == 4 and p.clusters == 4
    # the same d in two clusters {0, 3} and {1, 2}: cluster sums of deviations +1 and -1
    q = rules.paired_difference(a, b, ["x", "y", "y", "x"])
    assert abs(q.se - math.sqrt((1 + 1) / 16 * 2 / 1)) < 1e-12
    # one cluster: no honest standard error
    assert rules.paired_difference(a, b, [7, 7, 7, 7]).se == math.inf
    with pytest.raises(ValueError):
        rules.paired_difference(a, b, [0, 1])


def test_pair_correctness_orders_every_pair_of_each_group():
    # group 0: 3 texts best first scored 3, 1, 2 -> pairs (3>1) right, (3>2) right, (1>2) wrong
    # group 1: 2 texts with equal scores -> a half
    right, owner = rules.pair_correctness(torch.tensor([3.0, 1.0, 2.0, 5.0, 5.0]), [3, 2])
    assert right.tolist() == [1.0, 1.0, 0.0, 0.5] and owner == [0, 0, 0, 1]


def test_rm_gate_is_paired_against_current_and_best():
    n = 40
    clusters = list(range(n))
    best = torch.ones(n)                       # right on every pair
    current = torch.cat([torch.ones(30), torch.zeros(10)])
    # the candidate equals the current RM: a paired difference of exactly 0 passes
    g = rules.rm_gate(current.clone(), {"current": current}, clusters, z=2.0, min_pairs=30)
    assert g.passed and g.stats["rm_diff_current"] == 0.0
    # ...but it is 10 pairs below the best so far: d = -1 on 10 of 40, mean -0.25, se ~0.069 -> refused
    g = rules.rm_gate(current.clone(), {"current": current, "best": best}, clusters, z=2.0, min_pairs=30)
    assert not g.passed and "best" in g.why
    assert abs(g.stats["rm_diff_best"] + 0.25) < 1e-12
    # one pair worse than the current: mean -1/40, se = sqrt((1 - 1/40)^2 + 39 (1/40)^2) / 40 * sqrt(40/39)
    cand = current.clone()
    cand[0] = 0.0
    se = math.sqrt((1 - 1 / 40) ** 2 + 39 * (1 / 40) ** 2) / 40 * math.sqrt(40 / 39)
    g = rules.rm_gate(cand, {"current": current}, clusters, z=2.0, min_pairs=30)
    assert g.passed and abs(g.stats["rm_diff_current_se"] - se) < 1e-12
    assert not rules.rm_gate(cand, {"current": current}, clusters, z=0.0, min_pairs=30).passed
    # too few pairs to judge: passes and says so
    g = rules.rm_gate(torch.zeros(5), {"current": torch.ones(5)}, list(range(5)), z=2.0, min_pairs=30)
    assert g.passed and g.why.startswith("skipped")


def test_rm_gate_does_not_judge_pairs_of_too_few_prompts():
    """36 pairs of one 9-way ranking are one cluster: the clustered SE is infinite, so "judged" would pass
    a candidate wrong on every pair against an incumbent right on every one. It says it could not judge;
    from 10 prompts on it judges, and refuses that candidate."""
    one_prompt = ["p"] * 36
    g = rules.rm_gate(torch.zeros(36), {"current": torch.ones(36)}, one_prompt, z=2.0, min_pairs=30)
    assert g.passed and g.why == "skipped: held-out pairs of 1 prompts < 10" and g.stats["heldout_prompts"] == 1
    # z = 0 with one cluster was -0 * inf = NaN: even identical RMs were refused
    assert rules.rm_gate(torch.ones(36), {"current": torch.ones(36)}, one_prompt, z=0.0, min_pairs=30).passed
    ten = [f"p{i % 10}" for i in range(40)]
    g = rules.rm_gate(torch.zeros(40), {"current": torch.ones(40)}, ten, z=2.0, min_pairs=30)
    assert not g.passed and "10 prompts" in g.why


def test_normalisation_gives_mean_0_std_1():
    gain, offset = rules.normalisation(torch.tensor([1.0, 3.0]))
    assert (gain, offset) == (1.0, 2.0)
    x = torch.tensor([0.3, -1.2, 4.0, 2.2, 0.0])
    gain, offset = rules.normalisation(x)
    y = gain * (x.double() - offset)
    assert abs(float(y.mean())) < 1e-12 and abs(float(y.std(unbiased=False)) - 1) < 1e-12
    with pytest.raises(ValueError):
        rules.normalisation(torch.tensor([1.0]))


def test_kl_gate_on_fresh_samples():
    assert rules.kl_gate(torch.tensor([1.0, 3.0]), budget=2.0).passed          # mean 2 <= 2
    g = rules.kl_gate(torch.tensor([1.0, 3.5]), budget=2.0)
    assert not g.passed and g.stats["kl"] == 2.25
    assert not rules.kl_gate(torch.tensor([1.0, float("nan")]), budget=20.0).passed


def test_policy_gate_paired_by_prompt():
    parent = torch.tensor([0.0, 1.0, -1.0, 0.5])
    assert rules.policy_gate(parent + 0.1, parent, [0, 1, 2, 3], z=0.0).passed
    g = rules.policy_gate(parent - torch.tensor([0.1, 0.0, 0.0, 0.1]), parent, [0, 1, 2, 3], z=0.0)
    assert not g.passed and abs(g.stats["reward_gain"] + 0.05) < 1e-7   # float32 inputs
    # d = [-.1, 0, 0, -.1]: se = sqrt(4 * 0.05^2 / 16 * 4/3) = 0.0289; -0.05 >= -2 se passes at z = 2
    assert rules.policy_gate(parent - torch.tensor([0.1, 0.0, 0.0, 0.1]), parent, [0, 1, 2, 3], z=2.0).passed


def test_cycle_seed_comes_from_the_version_not_a_counter():
    s = rules.cycle_seed(0, 3, 200)
    assert s == rules.cycle_seed(0, 3, 200)                       # deterministic
    assert len({rules.cycle_seed(0, v, 200) for v in range(50)}) == 50   # a restart at v0003 != v0000's
    assert rules.cycle_seed(0, 3, 201) != s and rules.cycle_seed(1, 3, 200) != s
    assert 0 <= s < 2 ** 31


def test_the_first_cycle_waits_for_its_own_count():
    assert rules.groups_for_cycle(1, 64, 128) == 128     # only v0000 published: the first cycle
    assert rules.groups_for_cycle(2, 64, 128) == 64      # later cycles
    assert rules.groups_for_cycle(1, 64, 0) == 64        # 0: no separate first count
