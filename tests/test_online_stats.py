"""The learning report's statistics (online/stats.py, online/report.summarise) by hand."""
from __future__ import annotations

import math

from online import stats
from online.report import summarise


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_n():
    x = [0.0, 1.0] * 50
    lo, hi = stats.bootstrap_ci(x, seed=1)
    assert lo < 0.5 < hi
    # the standard error of a mean of 100 fair coins is 0.05: a 95% interval is about +-0.1
    assert 0.15 < hi - lo < 0.25
    lo4, hi4 = stats.bootstrap_ci(x * 4, seed=1)
    assert 0.4 < (hi4 - lo4) / (hi - lo) < 0.6          # 4x the data, half the width
    assert stats.bootstrap_ci([2.0] * 10) == (2.0, 2.0)
    assert all(math.isnan(v) for v in stats.bootstrap_ci([]))


def test_linear_fit_hand_computed():
    a, b, r2 = stats.linear_fit([0.0, 1.0, 2.0], [1.0, 3.0, 5.0])
    assert (a, b, r2) == (1.0, 2.0, 1.0)
    a, b, r2 = stats.linear_fit([0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 1.0, 2.0])
    # b = sxy/sxx = 3/5 = 0.6, a = 1 - 0.6*1.5 = 0.1; residuals -.1, .3, -.3, .1: ss_res 0.2, syy 2
    assert abs(b - 0.6) < 1e-12 and abs(a - 0.1) < 1e-12 and abs(r2 - 0.9) < 1e-12
    assert math.isnan(stats.linear_fit([1.0, 2.0], [1.0, 2.0])[2])


def test_improvement_and_regressions_need_disjoint_intervals():
    versions = {
        "v0000": {"parent": None, "true_score_ci": (0.30, 0.36), "true_score": 0.33, "kl": 0.0, "rm_reward": 0.0},
        "v0001": {"parent": "v0000", "true_score_ci": (0.35, 0.41), "true_score": 0.38, "kl": 1.0, "rm_reward": 0.5},
        "v0002": {"parent": "v0001", "true_score_ci": (0.28, 0.34), "true_score": 0.31, "kl": 4.0, "rm_reward": 1.0},
        "v0003": {"parent": "v0002", "true_score_ci": (0.40, 0.46), "true_score": 0.43, "kl": 9.0, "rm_reward": 1.5},
    }
    assert stats.regressions(versions) == ["v0002"]     # 0.34 < 0.35; v0001 overlaps v0000, no regression
    assert stats.beats((0.40, 0.46), (0.30, 0.36)) and not stats.beats((0.35, 0.41), (0.30, 0.36))
    for v in versions.values():
        v.update(kl_ci=(v["kl"], v["kl"]), rm_reward_ci=(v["rm_reward"], v["rm_reward"]))
    s = summarise([], versions)
    assert s["improved"] and s["regressions"] == ["v0002"] and abs(s["true_score_gain"] - 0.10) < 1e-12
    # rewards 0, .5, 1, 1.5 against sqrt(KL) 0, 1, 2, 3: a perfect line
    assert abs(s["reward_vs_sqrt_kl"]["r2"] - 1) < 1e-12 and s["reward_vs_sqrt_kl"]["points"] == 4


def test_word_stats_show_a_collapse_onto_one_answer():
    from online.measure import word_stats
    s = word_stats([{"text": "I can help you."}, {"text": "I can help you"}, {"text": "Sure, rice is easy."}])
    assert s["words_per_answer"] == 4.0 and s["distinct_words"] == 8       # i can help you sure rice is easy
    assert abs(s["repeated_answers"] - 1 / 3) < 1e-12                    # the second is the first, up to punctuation
