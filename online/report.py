"""The online loop's report: PNG plots and a JSON summary (matplotlib, headless).

Per version (online/measure.py, all measured the same way after the run): the true-preference
score of what it served, its KL to v0000 and its reward under the last RM, each with a 95%
bootstrap interval; the reward-vs-sqrt(KL) fit over those per-version points (Bai et al. 2022,
fig. 4). Per cycle (the trainer's CYCLE lines): the KL beta and the critic's explained variance.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .stats import beats, linear_fit, regressions


def _errorbar(ax, xs, measured: dict, key: str) -> None:
    ys = [measured[v][key] for v in xs]
    lo = [y - measured[v][key + "_ci"][0] for v, y in zip(xs, ys)]
    hi = [measured[v][key + "_ci"][1] - y for v, y in zip(xs, ys)]
    ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o-", capsize=4)


def summarise(cycles: list[dict], measured: dict[str, dict]) -> dict:
    versions = sorted(measured)
    pts = [(math.sqrt(max(measured[v]["kl"], 0.0)), measured[v]["rm_reward"]) for v in versions]
    a, b, r2 = linear_fit([p[0] for p in pts], [p[1] for p in pts])
    first, last = versions[0], versions[-1]
    return {"versions": measured, "cycles": cycles,
            "improved": len(versions) > 1 and beats(measured[last]["true_score_ci"], measured[first]["true_score_ci"]),
            "true_score_gain": measured[last]["true_score"] - measured[first]["true_score"],
            "regressions": regressions(measured),
            "reward_vs_sqrt_kl": {"intercept": a, "slope": b, "r2": r2, "points": len(pts)}}


def write(out: Path, cycles: list[dict], measured: dict[str, dict], live: dict | None = None) -> dict:
    import matplotlib   # only where a report is drawn; the Agg backend must be chosen before pyplot loads
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(cycles, measured)
    summary["live_served"] = live or {}
    versions = sorted(measured)
    for key, ylabel, title, name in (
            ("true_score", "true-preference score (mean, 95% CI)", "What users get, per version", "served_true_score.png"),
            ("kl", "KL to v0000 on its own samples (nats)", "KL per version", "kl_per_version.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        _errorbar(ax, versions, measured, key)
        ax.set(xlabel="model version", ylabel=ylabel, title=title)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)

    fit = summary["reward_vs_sqrt_kl"]
    xs = [math.sqrt(max(measured[v]["kl"], 0.0)) for v in versions]
    ys = [measured[v]["rm_reward"] for v in versions]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(xs, ys, yerr=[[y - measured[v]["rm_reward_ci"][0] for v, y in zip(versions, ys)],
                              [measured[v]["rm_reward_ci"][1] - y for v, y in zip(versions, ys)]], fmt="o", capsize=4)
    for v, x, y in zip(versions, xs, ys):
        ax.annotate(v, (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
    if not math.isnan(fit["slope"]):
        ax.plot([min(xs), max(xs)], [fit["intercept"] + fit["slope"] * x for x in (min(xs), max(xs))], "r-",
                label=f"fit: {fit['intercept']:.2f} + {fit['slope']:.2f} sqrt(KL), R^2 = {fit['r2']:.2f}")
        ax.legend()
    ax.set(xlabel="sqrt(KL to v0000)", ylabel=f"reward under {versions[-1]}'s RM",
           title="RM reward vs sqrt(KL), per version (Bai et al. 2022, fig. 4)")
    fig.tight_layout()
    fig.savefig(out / "reward_vs_sqrt_kl.png", dpi=100)
    plt.close(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    nums = [c["cycle"] for c in cycles]
    ax1.plot(nums, [c.get("kl_coef_end", float("nan")) for c in cycles], "o-")
    ax1.set(xlabel="cycle", ylabel="KL beta at the cycle's end", title="Adaptive KL coefficient")
    ax2.plot(nums, [c.get("ppo_explained_variance", float("nan")) for c in cycles], "o-", label="last iteration")
    ax2.plot(nums, [c.get("ppo_explained_variance_mean", float("nan")) for c in cycles], "s--", label="cycle mean")
    ax2.set(xlabel="cycle", ylabel="explained variance", title="Critic, before fitting each batch")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out / "ppo_per_cycle.png", dpi=100)
    plt.close(fig)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
