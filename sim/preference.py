"""The simulator's hidden "true" preference: what simulated users and labelers like.

Not a single-token rule: a response is scored by how much of it is plain, common English (the
share of its words among ~200 frequent ones: fluency) plus the density of courteous, helpful words
minus rude ones, with a mild preference for answers of 8-40 words. Many tokens carry signal, so a
small policy can move toward it within minutes, and an RM has to learn two lexicons from
comparisons alone to find it. An answer cut off at the token limit, mid-sentence, loses 0.2: people
notice when an answer stops before it ends (the RM sees the cut too, serve/reward_model.rm_text). Labelers compare with Bradley-Terry noise: P(a preferred) =
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
COMMON = frozenset("""the be to of and a in that have i it for not on with he as you do at this but his by from
they we say her she or an will my one all would there their what so up out if about who get which go me when
make can like time no just him know take people into year your good some could them see other than then now
look only come its over think also back after use two how our work first well way even new want because any
these give day most us is are was were has had been did does doing said here why where very much more many
thing things really should need help sure yes thank thanks please sorry great nice kind hope glad happy best
safe care friend love understand question answer tell try make sense idea example way lot little long right
feel better might may let im dont its youre ive thats there's can't don't i'm it's you're""".split())
WORD = re.compile(r"[a-z']+")


def true_score(prompt: str, response: str, truncated: bool = False) -> float:
    """In about [-1, 1.5]: 0.5 x common-word share + (kind - rude) word density, minus 0.2 outside
    8-40 words, minus 0.2 if the answer was cut off at the token limit."""
    words = WORD.findall(response.lower())
    if not words:
        return -0.5
    common = sum(w in COMMON for w in words)
    kind = sum(w in KIND for w in words)
    rude = sum(w in RUDE for w in words)
    length_pen = 0.0 if 8 <= len(words) <= 40 else 0.2
    return 0.5 * common / len(words) + (kind - rude) / len(words) - length_pen - (0.2 if truncated else 0.0)


def labeler_prefers_a(s_a: float, s_b: float, noise: float, rng: random.Random) -> bool:
    """A noisy labeler's choice between responses with true scores s_a and s_b."""
    if noise <= 0:
        return s_a > s_b or (s_a == s_b and rng.random() < 0.5)
    return rng.random() < 1 / (1 + math.exp(-(s_a - s_b) / noise))
