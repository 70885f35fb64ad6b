"""Every published version measured the same way, after the run: what users get from it.

For each version in the store, the policy server is pinned to it (AdminService.PinVersion) and
asked the evaluation prompts (prompts no simulated user asked, sim/traffic.prompt_split),
`samples` answers each with the same seeds for every version. Per served response:
  - its hidden true-preference score (sim/preference.true_score), as the simulator scores answers;
  - its KL to v0000: the exact per-token KL(version || v0000) over the vocabulary, summed over the
    tokens served (teacher-forced through both policies; train/ppo.token_stats);
  - its reward under one fixed RM, the last version's (normalised so v0000's samples score mean 0,
    std 1), so that rewards of different versions are comparable.
Each mean comes with a 95% bootstrap interval over the responses (online/stats.py). The server
is unpinned at the end (back to following the newest version).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import torch

from common import model_store
from serve.client import PolicyClient
from serve.reward_model import load as load_rm
from serve.reward_model import rm_text
from rlhf.v1 import models_pb2 as mpb
from rlhf.v1 import models_pb2_grpc as mgrpc
from sim.preference import WORD, true_score
from sim.traffic import TRUNCATED
from train.loop import load_policy_hf
from train.ppo import pack, token_stats
from train.rm_eval import score_texts

from .stats import bootstrap_ci, mean


def serve_answers(target: str, version: str, prompts: list[str], samples: int, max_new_tokens: int,
                  seed: int) -> list[dict]:
    """Pins the policy server to `version` and asks every prompt for `samples` answers (prompt i
    uses seed + 1000 i). One dict per answer: prompt, prompt_ids, ids, text, truncated."""
    with grpc.insecure_channel(target) as ch:
        mgrpc.AdminServiceStub(ch).PinVersion(mpb.PinVersionRequest(version=version), timeout=600)
    with PolicyClient(target, timeout=300) as c:
        def ask(i: int):
            r = c.generate(prompts[i], n=samples, max_new_tokens=max_new_tokens, temperature=1.0, seed=seed + 1000 * i)
            if r.model_version != version:
                raise RuntimeError(f"asked {version}, served by {r.model_version}")
            return [{"prompt": prompts[i], "prompt_ids": list(r.prompt_token_ids), "ids": list(x.token_ids),
                     "text": x.text, "truncated": x.finish_reason in TRUNCATED} for x in r.completions]
        with ThreadPoolExecutor(16) as pool:
            return [a for answers in pool.map(ask, range(len(prompts))) for a in answers]


@torch.no_grad()
def kl_to_v0000(policy, ref, answers: list[dict], pad_id: int, batch: int = 64) -> list[float]:
    """Per answer: the exact KL(policy || ref) summed over its tokens, nats."""
    out: list[float] = []
    for i in range(0, len(answers), batch):
        chunk = answers[i:i + batch]
        ro = pack([a["prompt_ids"] for a in chunk], [a["ids"] or [pad_id] for a in chunk], pad_id)
        kl = token_stats(policy, ref, ro, 1.0)["kl_exact"].sum(1)
        out += [float(k) if a["ids"] else 0.0 for k, a in zip(kl, chunk)]
    return out


@torch.no_grad()
def rm_rewards(rm, tok, answers: list[dict]) -> list[float]:
    """Per answer: the normalised reward under rm (the RM's view of a served answer, rm_text)."""
    raw = score_texts(rm, tok, [rm_text(a["prompt"], a["text"], a["truncated"]) for a in answers])
    return (rm.rcfg.gain * (raw - rm.rcfg.offset)).tolist()


def summarise(answers: list[dict], kl: list[float], reward: list[float], parent: str | None, seed: int) -> dict:
    ts = [true_score(a["prompt"], a["text"], a["truncated"]) for a in answers]
    return {"parent": parent, "responses": len(answers),
            "true_score": mean(ts), "true_score_ci": bootstrap_ci(ts, seed=seed),
            "kl": mean(kl), "kl_ci": bootstrap_ci(kl, seed=seed),
            "rm_reward": mean(reward), "rm_reward_ci": bootstrap_ci(reward, seed=seed),
            "truncated_rate": mean([float(a["truncated"]) for a in answers]), **word_stats(answers)}


def word_stats(answers: list[dict]) -> dict:
    """What a reader needs to see a policy collapsing onto a few words or one stock answer: words per
    answer, distinct words over all answers, and the share of answers that are another's exact copy."""
    words = [WORD.findall(a["text"].lower()) for a in answers]
    texts = [" ".join(w) for w in words]
    return {"words_per_answer": mean([float(len(w)) for w in words]),
            "distinct_words": len({x for w in words for x in w}),
            "repeated_answers": 1.0 - len(set(texts)) / len(texts) if texts else 0.0}


def measure_versions(target: str, store_root: Path, prompts: list[str], samples: int, max_new_tokens: int,
                     seed: int = 0, log=print) -> dict[str, dict]:
    """{version: summary} for every version in the store (see the module docstring)."""
    store = model_store.ModelStore(store_root)
    versions = store.versions()
    answers = {}
    for v in versions:
        answers[v] = serve_answers(target, v, prompts, samples, max_new_tokens, seed)
        log(f"[measure] {v}: {len(answers[v])} answers served")
    with grpc.insecure_channel(target) as ch:
        mgrpc.AdminServiceStub(ch).Unpin(mpb.UnpinRequest(), timeout=600)
    ref, tok = load_policy_hf(store.path(versions[0]) / "policy")
    rm, rm_tok = load_rm(store.path(versions[-1]) / "rm")
    out = {}
    for v in versions:
        policy = ref if v == versions[0] else load_policy_hf(store.path(v) / "policy")[0]
        kl = kl_to_v0000(policy, ref, answers[v], tok.pad_token_id)
        out[v] = summarise(answers[v], kl, rm_rewards(rm, rm_tok, answers[v]), store.manifest(v).get("parent"), seed)
        r = out[v]
        log(f"[measure] {v}: true score {r['true_score']:+.3f} [{r['true_score_ci'][0]:+.3f}, "
            f"{r['true_score_ci'][1]:+.3f}] | KL to v0000 {r['kl']:.2f} | reward under {versions[-1]}'s RM "
            f"{r['rm_reward']:+.3f} | truncated {r['truncated_rate']:.2f} | {r['words_per_answer']:.1f} words an "
            f"answer, {r['distinct_words']} distinct, {r['repeated_answers']:.0%} repeated answers")
    return out
