"""The simulator's hidden "true" preference: what simulated users and labelers like.

Not a single-token rule: a response is scored on several things people notice, each counted so that
repeating one word does not pay:
  - plain English: the share of its words among ~200 frequent ones (fluency, roughly);
  - relevance: whether it takes up what the person asked about (up to 3 of the content words of their
    last turn);
  - courtesy: distinct courteous words minus distinct rude ones, per word but per at least 16 words
    (a short stock phrase earns no more than a longer answer);
  - no repetition: past 30% repeated words (natural answers repeat "the", "to", "I"), each further
    repeated share costs as much;
  - a mild preference for answers of 8-40 words, and 0.2 off for an answer cut off at the token limit,
    mid-sentence: people notice when an answer stops before it ends (the RM sees the cut too,
    serve/reward_model.rm_text).
An earlier version counted every occurrence of a courteous word, with "you" among them and repetition
free: a policy learnt to write "you you you", and most of its measured gain was that (bench/RESULTS.md,
session 14). Labelers compare with Bradley-Terry noise: P(a preferred) = sigmoid((s_a - s_b) / noise);
`noise` sets how often they disagree with the true ordering. Pure functions, no I/O.
"""
from __future__ import annotations

import math
import random
import re

KIND = frozenset("""please thank thanks help helpful happy glad sure kind good great welcome hope well
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
REPEAT_FREE = 0.3     # share of repeated words that costs nothing
COURTESY_WORDS = 16   # courtesy is per word of the answer, but per at least this many


def topic_words(prompt: str) -> set[str]:
    """The content words of the person's last turn ("Human: ..." in an hh prompt, else the whole text):
    longer than 2 letters and not among the common words."""
    turn = prompt.rsplit("Human:", 1)[-1].split("Assistant:", 1)[0]
    return {w for w in WORD.findall(turn.lower()) if w not in COMMON and len(w) > 2}


def relevance(prompt: str, words: list[str]) -> float:
    """[0, 1]: how many of the prompt's content words the answer takes up, out of at most 3."""
    topic = topic_words(prompt)
    return min(1.0, len(topic & set(words)) / min(3, len(topic))) if topic else 0.0


def true_score(prompt: str, response: str, truncated: bool = False) -> float:
    """In about [-1, 1.5]: 0.5 x common-word share + 0.5 x relevance + (distinct kind - distinct rude
    words) / max(words, 16), minus the repeated share past 30%, minus 0.2 outside 8-40 words, minus 0.2
    if the answer was cut off at the token limit."""
    words = WORD.findall(response.lower())
    if not words:
        return -0.5
    n, distinct = len(words), set(words)
    common = sum(w in COMMON for w in words) / n
    courtesy = (len(distinct & KIND) - len(distinct & RUDE)) / max(n, COURTESY_WORDS)
    repeated = max(0.0, 1.0 - len(distinct) / n - REPEAT_FREE)
    length_pen = 0.0 if 8 <= n <= 40 else 0.2
    return (0.5 * common + 0.5 * relevance(prompt, words) + courtesy - repeated - length_pen
            - (0.2 if truncated else 0.0))


def labeler_prefers_a(s_a: float, s_b: float, noise: float, rng: random.Random) -> bool:
    """A noisy labeler's choice between responses with true scores s_a and s_b."""
    if noise <= 0:
        return s_a > s_b or (s_a == s_b and rng.random() < 0.5)
    return rng.random() < 1 / (1 + math.exp(-(s_a - s_b) / noise))
