"""Synthetic feedback and interaction records (for tests and benchmarks that bypass the servers).

Responses are random word strings with a variable share of the preference's courteous words, so a
reward model can learn the hidden preference from the comparisons alone."""
from __future__ import annotations

import random
import time
import uuid

from rlhf.v1 import feedback_pb2 as fb

from .preference import KIND, RUDE, labeler_prefers_a, true_score

NEUTRAL = ("the a river stone cloud music paper garden window silver coffee mountain letter table chair "
           "road city book water light green small large today time people about make know").split()
TOPICS = "cooking travel music gardening history science sports money health school weather pets".split()


def prompt(rng: random.Random) -> str:
    return f"\n\nHuman: Can you tell me something about {rng.choice(TOPICS)}?\n\nAssistant:"


def response(rng: random.Random) -> str:
    n = rng.randint(6, 20)
    p_kind, p_rude = rng.random() * 0.5, rng.random() * 0.15
    words = [rng.choice(sorted(KIND)) if (u := rng.random()) < p_kind else
             rng.choice(sorted(RUDE)) if u < p_kind + p_rude else rng.choice(NEUTRAL) for _ in range(n)]
    return " ".join(words)


def comparison_record(rng: random.Random, noise: float = 0.05, labeler: str = "sim-labeler") -> fb.FeedbackRecord:
    p, a, b = prompt(rng), response(rng), response(rng)
    pick_a = labeler_prefers_a(true_score(p, a), true_score(p, b), noise, rng)
    eid = uuid.UUID(int=rng.getrandbits(128)).hex
    c = fb.Comparison(event_id=eid, source=fb.Source(kind=fb.SOURCE_KIND_LABELER, id=labeler), prompt=p,
                      a=fb.Response(response_id="r" + eid[:16] + "a", text=a, model_version="v0000"),
                      b=fb.Response(response_id="r" + eid[:16] + "b", text=b, model_version="v0000"),
                      preferred=fb.Comparison.CHOICE_A if pick_a else fb.Comparison.CHOICE_B,
                      created_unix_ms=int(time.time() * 1000))
    return fb.FeedbackRecord(event_id=eid, received_unix_ms=int(time.time() * 1000), feedback=fb.Feedback(comparison=c))


def interaction_record(rng: random.Random) -> fb.Interaction:
    return fb.Interaction(response_id=uuid.UUID(int=rng.getrandbits(128)).hex, prompt=prompt(rng),
                          response=response(rng), model_version="v0000", served_unix_ms=int(time.time() * 1000),
                          finish_reason="length")
