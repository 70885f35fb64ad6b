"""Statistics of the learning report, as pure functions (lists in, numbers out): bootstrap
intervals, the reward-vs-sqrt(KL) fit, and what counts as an improvement or a regression."""
from __future__ import annotations

import math
import random


def mean(x: list[float]) -> float:
    return sum(x) / len(x) if x else float("nan")


def bootstrap_ci(x: list[float], level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of x (resampling the items with replacement)."""
    if not x:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    n = len(x)
    means = sorted(sum(x[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    lo = means[int(math.floor((1 - level) / 2 * n_boot))]
    hi = means[min(n_boot - 1, int(math.ceil((1 + level) / 2 * n_boot)) - 1)]
    return lo, hi


def linear_fit(x: list[float], y: list[float]) -> tuple[float, float, float]:
    """Least squares y = a + b x -> (a, b, R^2); R^2 is NaN with fewer than 3 points or no spread."""
    n = len(x)
    if n < 3:
        return float("nan"), float("nan"), float("nan")
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((v - mx) ** 2 for v in x)
    syy = sum((v - my) ** 2 for v in y)
    if sxx == 0 or syy == 0:
        return my, 0.0, float("nan")
    b = sum((u - mx) * (v - my) for u, v in zip(x, y)) / sxx
    a = my - b * mx
    ss_res = sum((v - (a + b * u)) ** 2 for u, v in zip(x, y))
    return a, b, 1 - ss_res / syy


def beats(a_ci: tuple[float, float], b_ci: tuple[float, float]) -> bool:
    """a is better than b beyond both intervals: a's lower bound above b's upper bound."""
    return a_ci[0] > b_ci[1]


def regressions(versions: dict[str, dict]) -> list[str]:
    """Versions whose true-score interval lies wholly below their parent's ({version: {"parent",
    "true_score_ci"}}; versions without a measured parent are skipped)."""
    out = []
    for v, r in sorted(versions.items()):
        parent = versions.get(r.get("parent") or "")
        if parent is not None and beats(parent["true_score_ci"], r["true_score_ci"]):
            out.append(v)
    return out
