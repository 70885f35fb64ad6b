"""The online loop's report: PNG plots and a JSON summary (matplotlib, headless)."""
from __future__ import annotations

import json
import math
from pathlib import Path


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


def write(out: Path, cycles: list[dict], served: dict[str, dict]) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out.mkdir(parents=True, exist_ok=True)
    versions = sorted(served)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(versions, [served[v]["true_score"] for v in versions], "o-")
    ax.set(xlabel="model version", ylabel="true-preference score of served responses",
           title="What users received, per version")
    fig.tight_layout()
    fig.savefig(out / "served_true_score.png", dpi=100)
    plt.close(fig)

    pub = [c for c in cycles if c.get("published")]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([c["version"] for c in pub], [c.get("ppo_kl", float("nan")) for c in pub], "o-")
    ax.set(xlabel="model version", ylabel="KL to the initial policy (nats / response)", title="KL per version")
    fig.tight_layout()
    fig.savefig(out / "kl_per_version.png", dpi=100)
    plt.close(fig)

    pts = [(math.sqrt(max(kl, 0.0)), r) for c in cycles for r, kl in c.get("ppo_trace", [])]
    a, b, r2 = linear_fit([p[0] for p in pts], [p[1] for p in pts])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=12)
    if pts and not math.isnan(b):
        xs = [min(p[0] for p in pts), max(p[0] for p in pts)]
        ax.plot(xs, [a + b * x for x in xs], "r-", label=f"fit: {a:.2f} + {b:.2f} sqrt(KL), R^2 = {r2:.2f}")
        ax.legend()
    ax.set(xlabel="sqrt(KL to the initial policy)", ylabel="RM reward of PPO rollouts",
           title="RM reward vs sqrt(KL) (Bai et al. 2022, fig. 4)")
    fig.tight_layout()
    fig.savefig(out / "reward_vs_sqrt_kl.png", dpi=100)
    plt.close(fig)

    summary = {"served": served, "cycles": cycles, "reward_vs_sqrt_kl": {"intercept": a, "slope": b, "r2": r2,
                                                                          "points": len(pts)}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
