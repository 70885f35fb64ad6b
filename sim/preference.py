"""The simulator's hidden "true" preference: what simulated users and labelers like.

Not a single-token rule: a response is scored by the density of courteous, helpful words over
all its words, minus rude ones, with a mild preference for answers of 8-40 words. A small policy
can move toward it within minutes (many tokens carry signal), and an RM has to learn a lexicon
from comparisons to find it. Labelers compare with Bradley-Terry noise: P(a preferred) =
sigmoid((s_a - s_b) / noise); `noise` sets how often they disagree with the true ordering.
Pure functions, no I/O.
"""
from __future__ import annotations

import math
import random
import re

KIND = frozenset("""you your please thank thanks help helpful happy glad sure kind good great welcome hope well
nice safe care friend friends love understand sorry yes can will certainly absolutely gladly wonderful
appreciate respect together support best""".split())
RUDE = frozenset("""stupid idiot hate kill shut dumb ugly damn hell bad never no not worst die""".split())
WORD = re.compile(r"[a-z']+")


def true_score(prompt: str, response: str) -> float:
    """In about [-1, 1]: (kind - rude) word density, minus 0.2 outside 8-40 words."""
    words = WORD.findall(response.lower())
    if not words:
        return -0.5
    kind = sum(w in KIND for w in words)
    rude = sum(w in RUDE for w in words)
    length_pen = 0.0 if 8 <= len(words) <= 40 else 0.2
    return (kind - rude) / len(words) - length_pen


def labeler_prefers_a(s_a: float, s_b: float, noise: float, rng: random.Random) -> bool:
    """A noisy labeler's choice between responses with true scores s_a and s_b."""
    if noise <= 0:
        return s_a > s_b or (s_a == s_b and rng.random() < 0.5)
    return rng.random() < 1 / (1 + math.exp(-(s_a - s_b) / noise))
