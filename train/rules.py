"""The trainer's decision rules, as pure functions: numbers and tensors in, decisions out (no I/O,
no config objects, no logging). The trainer (loop.py) calls them; tests/test_rules.py pins them
with hand-computed cases.

- `cycle_due`: the cadence (Bai et al. 2022 retrain on new feedback as it arrives);
- `is_heldout`: the RM's held-out split, by prompt (InstructGPT splits by user, so that no prompt
  is on both sides: another comparison of the same prompt, or the same pair sent again under a
  new event id, must not land in training);
- `paired_difference`, `rm_gate`: the candidate RM against the current and the best-so-far RM on
  the same held-out pairs, with a standard error clustered by prompt;
- `normalisation`: gain and bias so that a policy's own samples score mean 0 and std 1
  (lm-human-preferences normalize_before / normalize_after);
- `kl_gate`, `policy_gate`: the policy about to be published, judged on fresh samples of it;
- `cycle_seed`: seeds derived from the version trained from, so a restart does not repeat them.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Hashable, Sequence

import torch


# ---- cadence ----

def groups_for_cycle(published: int, cycle_groups: int, first_cycle_groups: int) -> int:
    """New training groups that start the next cycle: `first_cycle_groups` while only v0000 is
    published (0: the same as the others), else `cycle_groups`. Why a larger first batch: from 64
    comparisons the first RM is a guess (6 held-out pairs, too few for its gate) and PPO moved the policy
    1.5-3 nats for little true gain; from 128, v0001 gained in every seed measured (bench/RESULTS.md)."""
    return first_cycle_groups if first_cycle_groups and published <= 1 else cycle_groups


def cycle_due(new_groups: int, seconds_since_last: float, *, paused: bool, versions_left: int | None,
              cycle_groups: int, min_groups: int, cycle_seconds: float) -> bool:
    """A cycle starts after `cycle_groups` new training groups (comparisons, rankings, and pairs
    from ratings), or after `cycle_seconds` with at least `min_groups` new ones; never while
    paused or once no versions are left to publish (versions_left 0; None: no limit)."""
    if paused or versions_left == 0:
        return False
    if new_groups >= cycle_groups:
        return True
    return new_groups >= min_groups and seconds_since_last >= cycle_seconds


# ---- held-out split ----

def prompt_key(prompt: str) -> str:
    """What makes two prompts the same for the split: case and whitespace do not count."""
    return " ".join(prompt.lower().split())


def is_heldout(prompt: str, frac: float) -> bool:
    """Deterministic split by prompt (stable across restarts and as the data grows): every
    comparison, ranking or rating of one prompt falls on the same side."""
    return (zlib.crc32(prompt_key(prompt).encode()) % 10_000) < frac * 10_000


# ---- paired comparisons with a clustered standard error ----

@dataclass(frozen=True)
class Paired:
    diff: float       # mean over items of (a - b)
    se: float         # standard error of diff, clustered (inf with fewer than 2 clusters)
    n: int            # items
    clusters: int     # distinct clusters


def paired_difference(a: torch.Tensor, b: torch.Tensor, clusters: Sequence[Hashable]) -> Paired:
    """Mean of a - b over N paired items (N,), and its cluster-robust standard error: items of one
    cluster (the pairs of one prompt, of one ranking) are not independent, so the variance of the
    mean is sum_c (sum_{i in c} (d_i - mean))^2 / N^2, times C / (C - 1) (Liang-Zeger with the
    small-sample factor; with one item per cluster it is the usual var(d) / N)."""
    d = (a.double() - b.double()).tolist()
    n = len(d)
    if n != len(clusters):
        raise ValueError(f"{n} items but {len(clusters)} cluster labels")
    if n == 0:
        return Paired(float("nan"), float("inf"), 0, 0)
    mean = sum(d) / n
    sums: dict[Hashable, float] = {}
    for x, c in zip(d, clusters):
        sums[c] = sums.get(c, 0.0) + (x - mean)
    C = len(sums)
    if C < 2:
        return Paired(mean, float("inf"), n, C)
    var = sum(s * s for s in sums.values()) / (n * n) * C / (C - 1)
    return Paired(mean, math.sqrt(var), n, C)


def pair_correctness(scores: torch.Tensor, sizes: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
    """Per ordered pair of each group (texts best first, `sizes` texts per group, scores (sum of
    sizes,)): 1 where the better text scores higher, 1/2 on equal scores, 0 otherwise. Returns the
    (P,) correctness and, per pair, the index of its group."""
    out, owner, i = [], [], 0
    for g, k in enumerate(sizes):
        r = scores[i:i + k]
        i += k
        for a in range(k):
            for b in range(a + 1, k):
                out.append(float(r[a] > r[b]) + 0.5 * float(r[a] == r[b]))
                owner.append(g)
    return torch.tensor(out, dtype=torch.float64), owner


@dataclass(frozen=True)
class Gate:
    passed: bool
    why: str
    stats: dict = field(default_factory=dict)


def rm_gate(candidate: torch.Tensor, incumbents: dict[str, torch.Tensor], clusters: Sequence[Hashable],
            z: float, min_pairs: int, min_prompts: int = 10) -> Gate:
    """The candidate RM against each incumbent ("current", "best", ...) on the same held-out pairs:
    (P,) correctness of each (pair_correctness), `clusters` the prompt of each pair. It passes iff,
    against every incumbent, mean(candidate - incumbent) >= -z * SE: the candidate may be worse only
    by what the held-out set cannot tell apart, and never by more than that below the best so far.
    With fewer than `min_pairs` pairs, or pairs of fewer than `min_prompts` prompts, it passes and says
    it could not judge: the SE is clustered by prompt, so one prompt's many pairs (a 9-way ranking has 36)
    give no SE at all (infinite: anything would pass as "judged"), and a few prompts give one that is
    itself too noisy for a z threshold."""
    n = len(candidate)
    acc = float(candidate.mean()) if n else float("nan")
    prompts = len(set(clusters))
    stats = {"rm_accuracy": acc, "heldout_pairs": n, "heldout_prompts": prompts}
    for name, inc in incumbents.items():
        stats[f"rm_accuracy_{name}"] = float(inc.mean()) if n else float("nan")
    if n < min_pairs:
        return Gate(True, f"skipped: {n} held-out pairs < {min_pairs}", stats)
    if prompts < min_prompts:
        return Gate(True, f"skipped: held-out pairs of {prompts} prompts < {min_prompts}", stats)
    for name, inc in incumbents.items():
        p = paired_difference(candidate, inc, clusters)
        stats[f"rm_diff_{name}"], stats[f"rm_diff_{name}_se"] = p.diff, p.se
        if not p.diff >= -z * p.se:
            return Gate(False, f"RM gate: held-out accuracy {acc:.3f} is below the {name} RM's "
                               f"{float(inc.mean()):.3f} by {-p.diff:.3f} > {z:g} x SE {p.se:.3f} "
                               f"({n} pairs, {p.clusters} prompts)", stats)
    return Gate(True, "passed", stats)


# ---- reward normalisation ----

def normalisation(raw: torch.Tensor, eps: float = 1e-6) -> tuple[float, float]:
    """(gain, offset) such that gain * (raw - offset) has mean 0 and std 1 over `raw`, (N,) raw
    RM scores of a policy's own samples (population std; lm-human-preferences sets the reward's
    gain and bias the same way, on samples of the policy it is about to train)."""
    raw = raw.double()
    if raw.numel() < 2:
        raise ValueError("normalisation needs at least 2 scores")
    mean, std = float(raw.mean()), float(raw.std(unbiased=False))
    return 1.0 / max(std, eps), mean


# ---- policy gates, on fresh samples of the candidate ----

def kl_gate(kl_per_sample: torch.Tensor, budget: float) -> Gate:
    """KL(candidate || reference) per response (N,), measured on fresh samples of the candidate
    itself (not on rollouts drawn before its last updates): refuse when the mean is above budget
    or anything is not finite."""
    kl = kl_per_sample.double()
    mean = float(kl.mean())
    se = float(kl.std() / math.sqrt(len(kl))) if len(kl) > 1 else float("inf")
    stats = {"kl": mean, "kl_se": se}
    if not torch.isfinite(kl).all():
        return Gate(False, "KL gate: a KL is NaN or infinite", stats)
    if mean > budget:
        return Gate(False, f"KL gate: KL {mean:.2f} nats (SE {se:.2f}) on fresh samples is above the budget "
                           f"{budget:g}", stats)
    return Gate(True, "passed", stats)


def policy_gate(candidate: torch.Tensor, parent: torch.Tensor, clusters: Sequence[Hashable], z: float) -> Gate:
    """Rewards (N,) of the candidate's and the parent's fresh samples on the same prompts, under the
    same (new) RM, paired by prompt (`clusters`): refuse a candidate whose mean reward is below its
    parent's by more than z SE (z = 0: below it at all). The RM is the trainer's only view of what
    people prefer; a PPO run that did not move the policy up on it has nothing to publish."""
    p = paired_difference(candidate, parent, clusters)
    stats = {"reward_gain": p.diff, "reward_gain_se": p.se}
    if not math.isfinite(p.diff):
        return Gate(False, "policy gate: rewards are not finite", stats)
    if not p.diff >= -z * p.se:
        return Gate(False, f"policy gate: the candidate's reward on fresh samples is {p.diff:+.3f} (SE {p.se:.3f}) "
                           f"against its parent's, below -{z:g} SE", stats)
    return Gate(True, "passed", stats)


# ---- seeds ----

def cycle_seed(base: int, parent_version: int, feedback_events: int) -> int:
    """The seed of a cycle: from the run's base seed, the version it trains from and the amount
    of feedback it sees, so a restarted trainer (whose cycle counter starts again at 0) does not
    repeat the seeds of earlier cycles, and a retried cycle on new data draws new samples."""
    h = zlib.crc32(f"{base}/{parent_version}/{feedback_events}".encode())
    return h & 0x7FFF_FFFF
