"""The traffic simulator: users who ask the policy server things and labelers who compare answers.

Each user thread loops: pick a prompt from the prompt set, ask the policy server for two samples
(n=2), and, with probability `label_rate`, a labeler compares them by response id through the
feedback service (the service resolves the texts from the interactions topic), choosing with the
hidden true preference plus Bradley-Terry noise (sim/preference.py). Every served response's true
score is recorded per model version: that is the ground truth the online loop should improve.
"""
from __future__ import annotations

import random
import re
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import grpc

from common.data import jsonl_texts
from rlhf.v1 import feedback_pb2 as fb
from rlhf.v1 import feedback_pb2_grpc as fb_grpc
from rlhf.v1 import policy_pb2 as pb
from serve.client import PolicyClient

from .preference import labeler_prefers_a, true_score

TRUNCATED = (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_CONTEXT)   # cut at a limit, not ended


def first_turn_prompts(path: Path) -> list[str]:
    """The distinct first human turns (under 300 characters) of an hh-rlhf JSONL file, in file
    order, as prompts ("\n\nHuman: ...\n\nAssistant:")."""
    out, seen = [], set()
    for text in jsonl_texts(path, "chosen"):   # ValueError naming the line of a malformed record
        m = re.match(r"\s*Human: (.*?)\n\nAssistant:", text, re.S)
        if m and len(m.group(1)) < 300 and (p := f"\n\nHuman: {m.group(1).strip()}\n\nAssistant:") not in seen:
            seen.add(p)
            out.append(p)
    if not out:
        raise ValueError(f"{path}: no hh-rlhf dialogues to take prompts from")
    return out


def prompt_split(path: Path, n_eval: int = 128, seed: int = 0) -> tuple[list[str], list[str]]:
    """(the simulated users' prompts, evaluation prompts): one fixed shuffle (seed 0 whatever the
    run's seed), the last n_eval held out, so a version is measured on prompts no user asked and
    no PPO rollout trained on."""
    prompts = first_turn_prompts(path)
    if len(prompts) <= n_eval:
        raise ValueError(f"{path}: {len(prompts)} prompts, fewer than the {n_eval} evaluation prompts + 1")
    random.Random(seed).shuffle(prompts)
    return prompts[:-n_eval], prompts[-n_eval:]


@dataclass
class SimConfig:
    users: int = 4
    label_rate: float = 1.0
    noise: float = 0.05
    max_new_tokens: int = 24
    temperature: float = 1.0
    think_s: float = 0.2      # a user's pause between requests
    seed: int = 0


class Simulator:
    def __init__(self, policy_target: str, feedback_target: str, prompts: list[str], cfg: SimConfig):
        self.cfg, self.prompts = cfg, prompts
        self.policy = PolicyClient(policy_target, timeout=120)   # "h:p,h:p": policy-server replicas, round robin
        self.fb_channel = grpc.insecure_channel(feedback_target)
        self.feedback = fb_grpc.FeedbackServiceStub(self.fb_channel)
        self.lock = threading.Lock()
        self.scores: dict[str, list[float]] = defaultdict(list)   # version -> true scores served
        self.requests_ok = self.requests_failed = self.comparisons = self.feedback_failed = 0
        self.errors: list[str] = []
        self.acked: set[str] = set()   # event ids the feedback service acknowledged
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._user, args=(i,), daemon=True, name=f"user{i}")
                         for i in range(cfg.users)]

    def start(self) -> "Simulator":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=150)
        self.policy.close()
        self.fb_channel.close()

    def _user(self, i: int) -> None:
        rng = random.Random(self.cfg.seed * 1000 + i)
        while not self._stop.is_set():
            prompt = rng.choice(self.prompts)
            try:
                resp = self.policy.generate(prompt, n=2, max_new_tokens=self.cfg.max_new_tokens,
                                            temperature=self.cfg.temperature, seed=rng.getrandbits(32))
            except grpc.RpcError as e:
                with self.lock:
                    self.requests_failed += 1
                    self.errors.append(f"generate: {e.code().name} {e.details()}")
                time.sleep(0.5)
                continue
            comps = list(resp.completions)
            s = [true_score(prompt, c.text, truncated=c.finish_reason in TRUNCATED) for c in comps]
            with self.lock:
                self.requests_ok += 1
                self.scores[resp.model_version].extend(s)
            if len(comps) == 2 and rng.random() < self.cfg.label_rate:
                self._label(prompt, comps, s, rng)
            self._stop.wait(self.cfg.think_s * rng.random() * 2)

    def _label(self, prompt: str, comps, s: list[float], rng: random.Random) -> None:
        a, b = comps
        if abs(s[0] - s[1]) < 1e-9:   # equally good to the labeler: an explicit tie
            choice = fb.Comparison.CHOICE_TIE
        else:
            choice = fb.Comparison.CHOICE_A if labeler_prefers_a(s[0], s[1], self.cfg.noise, rng) else fb.Comparison.CHOICE_B
        c = fb.Comparison(source=fb.Source(kind=fb.SOURCE_KIND_LABELER, id=f"sim-labeler-{rng.randint(1, 5)}"),
                          prompt=prompt, a=fb.Response(response_id=a.response_id),
                          b=fb.Response(response_id=b.response_id),
                          preferred=choice)
        try:
            res = self.feedback.SubmitComparison(c, timeout=30)
            with self.lock:
                self.comparisons += 1
                self.acked.add(res.event_id)
        except grpc.RpcError as e:
            with self.lock:
                self.feedback_failed += 1
                self.errors.append(f"feedback: {e.code().name} {e.details()}")

    def summary(self) -> dict:
        with self.lock:
            per_version = {v: {"true_score": sum(x) / len(x), "responses": len(x)}
                           for v, x in sorted(self.scores.items()) if x}
            return {"requests_ok": self.requests_ok, "requests_failed": self.requests_failed,
                    "comparisons": self.comparisons, "feedback_failed": self.feedback_failed,
                    "served": per_version, "errors": self.errors[:5]}
