"""Screen reward-model recipes by cross-validation: many `bench/rm_cv.py` runs at once (one GPU,
or a CPU with cores to spare), compared pair by pair against the first recipe.

    python bench/rm_sweep.py --configs recipes.txt --seeds 0 1 --workers 8 --deadline 240 \\
        --bundle sweep.json -- --device cuda
    python bench/rm_sweep.py --quick            (two recipes, one seed, rm_cv --quick: a smoke run)

recipes.txt holds one recipe a line: a name, then train.rm_train flags (`lr3e-5 --lr 3e-5`; a name
alone is the defaults; # starts a comment). Flags after -- go to every run. Each (recipe, seed) is
one rm_cv process (seeds outermost, so a deadline cuts the later seeds of every recipe, not the
later recipes); rm_cv rewrites its held-out margins after every fold, so a run the deadline stops
still counts the folds it finished. A recipe is compared with the first on the pairs both held out
under the same seed: the mean paired difference in accuracy and its standard error over pairs
clustered by pair (each pair is held out once per seed, and seeds reuse the pairs), far tighter
than two pooled accuracies' (0.011 each).
The bundle (--bundle) holds every run's margins and the summary; last line: the summary as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from train.rules import paired_difference  # noqa: E402


def read_recipes(path: Path) -> list[tuple[str, list[str]]]:
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, *flags = shlex.split(line)
            out.append((name, flags))
    if not out:
        raise SystemExit(f"{path}: no recipes")
    return out


def correctness(diffs: list) -> dict[int, float]:
    """Pair index -> 1 if the RM ranked chosen above rejected, 1/2 on a tie, 0 if not (held-out pairs only)."""
    return {i: 1.0 if d > 0 else 0.5 if d == 0 else 0.0 for i, d in enumerate(diffs) if d is not None}


def summarize(recipes, seeds, margins: dict) -> dict:
    """Per recipe: accuracy over every held-out pair of its finished folds (all seeds), and against
    the first recipe on the pairs both scored under the same seed: the first's accuracy there, the
    mean difference and its standard error clustered by pair (seeds reuse the same pairs, so one
    pair's differences across seeds are not independent; train/rules.paired_difference)."""
    base = recipes[0][0]
    out = {}
    for name, flags in recipes:
        right, mine, first, pair_ids = [], [], [], []
        for s in seeds:
            c = correctness(margins.get(f"{name}/{s}") or [])
            right += list(c.values())
            b = correctness(margins.get(f"{base}/{s}") or [])
            for i in sorted(set(c) & set(b)):
                mine.append(c[i])
                first.append(b[i])
                pair_ids.append(i)
        row = {"flags": flags, "pairs_scored": len(right),
               "accuracy": sum(right) / len(right) if right else None}
        if name != base and mine:
            d = paired_difference(torch.tensor(mine), torch.tensor(first), pair_ids)
            row.update(vs_first=d.diff, vs_first_se=d.se, vs_first_pairs=d.n,
                       first_on_same_pairs=sum(first) / len(first))
        out[name] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", type=Path, help="recipes file (see above)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--workers", type=int, default=1, help="rm_cv processes at once")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per process (0: cores / workers)")
    ap.add_argument("--deadline", type=float, default=0, help="seconds after which runs are stopped (0: none)")
    ap.add_argument("--min-left", type=float, default=30,
                    help="with --deadline, start no run with fewer seconds left (about a fold's time)")
    ap.add_argument("--fold-seed", type=int, default=0, help="rm_cv's partition into folds")
    ap.add_argument("--bundle", type=Path, default=None, help="JSON file: every run's margins, logs' ends and the summary")
    ap.add_argument("--quick", action="store_true", help="defaults and --lr 1e-4, seed 0, rm_cv --quick")
    ap.add_argument("common", nargs="*", help="flags for every run (after --)")
    a = ap.parse_args()
    if a.quick:
        recipes = [("defaults", []), ("lr1e-4", ["--lr", "1e-4"])]
    elif a.configs:
        recipes = read_recipes(a.configs)
    else:
        ap.error("--configs FILE or --quick")
    if len({n for n, _ in recipes}) != len(recipes):
        raise SystemExit("recipe names must differ")
    threads = a.threads or max(1, (os.cpu_count() or 1) // a.workers)
    t0 = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="rm_sweep."))
    jobs = [(name, flags, s) for s in a.seeds for name, flags in recipes]
    margins, logs, status = {}, {}, {}

    def collect(name: str, s: int) -> None:
        f = tmp / f"{name}.{s}.json"
        if f.exists():   # rm_cv replaces it whole after each fold (os.replace), so it is never half written
            margins[f"{name}/{s}"] = json.loads(f.read_text())

    lock = threading.Lock()   # runs finish on several threads; one writes the bundle at a time

    def write_bundle() -> dict:
        with lock:
            summary = summarize(recipes, a.seeds, margins)
            if a.bundle:
                tmp_bundle = a.bundle.with_name(a.bundle.name + ".tmp")
                tmp_bundle.write_text(json.dumps({"summary": summary, "status": status, "margins": margins,
                                                  "logs": logs, "seconds": round(time.time() - t0, 1)}))
                os.replace(tmp_bundle, a.bundle)
            return summary

    def run(job) -> None:
        name, flags, s = job
        key = f"{name}/{s}"
        left = a.deadline - (time.time() - t0) if a.deadline else None
        if left is not None and left < a.min_left:
            status[key] = "not started (deadline)"
            return
        cmd = [sys.executable, str(REPO / "bench/rm_cv.py"), "--fold-seed", str(a.fold_seed),
               "--save-diffs", str(tmp / f"{name}.{s}.json"), *(["--quick"] if a.quick else []),
               "--", *a.common, *flags, "--seed", str(s), "--threads", str(threads)]
        t = time.time()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=left,
                               env={**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"})
            status[key] = "done" if p.returncode == 0 else f"exit {p.returncode}"
            err = p.stderr
        except subprocess.TimeoutExpired as e:
            status[key] = "stopped (deadline)"
            err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        logs[key] = "\n".join(line for line in err.splitlines() if "[rm_cv]" in line or "Error" in line)[-2000:]
        collect(name, s)
        done = sum(v is not None for v in margins.get(key, []))
        print(f"[rm_sweep] {key}: {status[key]}, {done} pairs held out, {time.time() - t:.0f} s "
              f"(at {time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
        write_bundle()

    with ThreadPoolExecutor(a.workers) as pool:
        list(pool.map(run, jobs))
    summary = write_bundle()
    for name, row in summary.items():
        acc = "-" if row["accuracy"] is None else f"{row['accuracy']:.3f}"
        vs = (f"{row['vs_first']:+.4f} +- {row['vs_first_se']:.4f} ({row['vs_first_pairs']} pairs; "
              f"the first there {row['first_on_same_pairs']:.3f})"
              if "vs_first" in row else "")
        print(f"{name:>24}  {acc}  n={row['pairs_scored']:5d}  {vs}", file=sys.stderr)
    print(json.dumps({"bench": "rm_sweep", "seeds": a.seeds, "fold_seed": a.fold_seed, "common": a.common,
                      "seconds": round(time.time() - t0, 1), "summary": summary}))


if __name__ == "__main__":
    main()
