"""Does the main job make what users get better, every time? The main job (`python -m online`)
with its defaults, on a fresh workdir, once per seed (each seed its own simulated users, labelers
and trainer seed), each version measured the same way after its run (online/measure.py).

    python bench/online_learning.py            (3 seeds, ~5 min each after the one-time SFT)
    python bench/online_learning.py --quick    (1 seed, 2 versions, 64 measurement prompts)

Per version and seed: the served true-preference score with its 95% bootstrap interval over
responses (the same prompts, seeds and number of answers for every version, asked after the run
with the server pinned to the version), the KL to v0000 on fresh samples of the version, and the
reward of those samples under one fixed RM (the run's last); the reward-vs-sqrt(KL) fit is over
these per-version points. The baseline of each seed is its own v0000, measured in the same run.

Writes reports/bench-online/ (each seed's report folder and a plot of every seed's versions) and
prints one JSON object as its last line: seeds, true_score_gain_median (last version minus
v0000, median over seeds), seeds_improved (last version better than v0000 beyond both intervals),
regressions_published (versions whose interval lies below their parent's, over all seeds),
r2_reward_vs_sqrt_kl_median, minutes_median (the online loop; the one-time SFT is not in it), and
the per-seed figures.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def ensure_policy(policy: Path, minutes: float) -> None:
    """The main job's one-time SFT, if the default policy has not had it (as scripts/run.sh does)."""
    if (policy / "sft.json").exists():
        return
    if not (policy / "config.json").exists():
        subprocess.run([sys.executable, "-m", "serve.make_policy", "--out", str(policy)], cwd=REPO, check=True)
    print(f"[bench] pretraining {policy} ({minutes} min, once)", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "train.sft", "--model", str(policy), "--minutes", str(minutes)], cwd=REPO,
                   check=True)


def run_seed(seed: int, out: Path, extra: list[str]) -> dict:
    """One main-job run; its summary.json plus the wall time of the whole command."""
    report = out / f"seed-{seed}"
    cmd = [sys.executable, "-m", "online", "--seed", str(seed), "--workdir", str(REPO / ".run" / f"bench-online-{seed}"),
           "--report", str(report), *extra]
    print(f"[bench] seed {seed}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    with open(out / f"seed-{seed}.log", "w") as log:
        r = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    minutes = (time.monotonic() - t0) / 60
    if r.returncode != 0:
        raise RuntimeError(f"seed {seed}: python -m online exited {r.returncode}; see {out / f'seed-{seed}.log'}")
    summary = json.loads((report / "summary.json").read_text())
    summary["minutes"] = minutes
    return summary


def per_seed(seed: int, s: dict) -> dict:
    v = s["versions"]
    first, last = min(v), max(v)
    return {"seed": seed, "minutes": round(s["minutes"], 2), "improved": s["improved"],
            "true_score_gain": s["true_score_gain"], "regressions": s["regressions"],
            "r2": s["reward_vs_sqrt_kl"]["r2"],
            "refused_cycles": sum(not c.get("published") for c in s["cycles"]),
            "versions": {k: {"true_score": round(x["true_score"], 4),
                             "true_score_ci": [round(y, 4) for y in x["true_score_ci"]],
                             "kl": round(x["kl"], 3), "rm_reward": round(x["rm_reward"], 3),
                             "truncated_rate": round(x["truncated_rate"], 3), "parent": x["parent"],
                             **{k: x[k] for k in ("words_per_answer", "distinct_words", "repeated_answers") if k in x}}
                         for k, x in sorted(v.items())},
            "first": first, "last": last}


def plot(seeds: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, s in enumerate(seeds):
        vs = sorted(s["versions"])
        xs = [j + (i - (len(seeds) - 1) / 2) * 0.08 for j in range(len(vs))]
        ys = [s["versions"][v]["true_score"] for v in vs]
        err = [[y - s["versions"][v]["true_score_ci"][0] for v, y in zip(vs, ys)],
               [s["versions"][v]["true_score_ci"][1] - y for v, y in zip(vs, ys)]]
        ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=3, label=f"seed {s['seed']}")
    ax.set_xticks(range(len(vs)), vs)
    ax.set(xlabel="model version", ylabel="true-preference score (95% CI)", title="What users get, per version and seed")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "true_score_by_seed.png", dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 seed, 2 versions, 64 measurement prompts")
    ap.add_argument("--seeds", type=int, nargs="*", default=None, help="seeds to run (default 0 1 2; --quick: 0)")
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "bench-online", help="report folder")
    ap.add_argument("--policy", type=Path, default=REPO / "models" / "policy-v0", help="the main job's initial policy")
    ap.add_argument("--sft-minutes", type=float, default=4.0, help="the one-time SFT, if the policy has not had it")
    ap.add_argument("--online-args", default="", help="more flags for python -m online (e.g. to try a trainer setting: "
                    "--online-args='--trainer-args=...'; default: the main job's defaults)")
    a = ap.parse_args()
    seeds = a.seeds if a.seeds is not None else ([0] if a.quick else [0, 1, 2])
    extra = (["--init-policy", str(a.policy)] + (["--cycles", "2", "--measure-prompts", "64"] if a.quick else [])
             + shlex.split(a.online_args))
    ensure_policy(a.policy, a.sft_minutes)
    a.out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in seeds:
        r = per_seed(seed, run_seed(seed, a.out, extra))
        results.append(r)
        print(f"[bench] seed {seed}: " + ", ".join(f"{v} {x['true_score']:+.3f} [{x['true_score_ci'][0]:+.3f}, "
                                                    f"{x['true_score_ci'][1]:+.3f}]" for v, x in r["versions"].items())
              + f" | improved {r['improved']} | regressions {r['regressions']} | R^2 {r['r2']:.3f} | "
                f"{r['minutes']:.1f} min", file=sys.stderr, flush=True)
    plot(results, a.out)
    out = {"bench": "online_learning", "quick": a.quick, "seeds": len(results),
           "true_score_gain_median": statistics.median(r["true_score_gain"] for r in results),
           "seeds_improved": sum(r["improved"] for r in results),
           "regressions_published": sum(len(r["regressions"]) for r in results),
           "r2_reward_vs_sqrt_kl_median": statistics.median(r["r2"] for r in results),
           "minutes_median": statistics.median(r["minutes"] for r in results),
           "per_seed": results}
    (a.out / "summary.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
