"""Feedback records -> the RM's training groups (texts best first), with no I/O.

- A comparison is a group of 2 (a tie: a tie group, trained with target 1/2).
- A ranking of K is a group of K (InstructGPT's K-wise loss).
- Ratings become comparisons: ratings by one rater, on one scale (thumbs or Likert), of different
  responses to one prompt are compared pairwise, the higher-rated preferred and equal ratings a
  tie (InstructGPT's labelers rated each of a prompt's K outputs on a Likert scale; a rating only
  says something relative to the rater's other ratings of the same prompt). A rating alone, with
  nothing to compare it to, trains nothing. A rater who rates one response twice counts once,
  with the latest rating.

Every response keeps how it ended (Response.finish_reason), so the RM sees the same text for a
response cut at the token limit as PPO's scorer does (serve/reward_model.rm_text).
"""
from __future__ import annotations

from itertools import combinations

from rlhf.v1 import feedback_pb2 as fb

from serve.reward_model import is_truncated, rm_text

from .rm_update import Group


def _text(prompt: str, r: fb.Response) -> str:
    return rm_text(prompt, r.text, is_truncated(r.finish_reason))


def _rating_key(rt: fb.Rating) -> tuple:
    """Ratings comparable with each other: same prompt, same rater, same scale."""
    return (rt.prompt, rt.source.kind, rt.source.id, rt.WhichOneof("score"))


def _rating_value(rt: fb.Rating) -> float:
    return float(rt.thumbs_up) if rt.WhichOneof("score") == "thumbs_up" else float(rt.likert)


def _response_key(r: fb.Response) -> str:
    return r.response_id or r.text


_CHOICES = (fb.Comparison.CHOICE_A, fb.Comparison.CHOICE_B, fb.Comparison.CHOICE_TIE)
"""The comparison outcomes that train (proto3 enums are open: anything else is ignored)."""


def groups_from_records(records: list[bytes]) -> list[Group]:
    """Serialized FeedbackRecords, in stored order -> training groups. Comparisons and rankings in
    order, then the pairs from ratings (by rating group, in order of first appearance)."""
    out: list[Group] = []
    ratings: dict[tuple, dict[str, tuple[float, fb.Response, str]]] = {}
    for blob in records:
        rec = fb.FeedbackRecord.FromString(blob)
        f = rec.feedback
        kind = f.WhichOneof("kind")
        if kind == "comparison":
            c = f.comparison
            a, b = _text(c.prompt, c.a), _text(c.prompt, c.b)
            if c.preferred == fb.Comparison.CHOICE_TIE:
                out.append(Group((a, b), tie=True, event_id=rec.event_id, prompt=c.prompt))
            elif c.preferred in _CHOICES:   # A or B here; an undefined value trains nothing
                out.append(Group((a, b) if c.preferred == fb.Comparison.CHOICE_A else (b, a),
                                 event_id=rec.event_id, prompt=c.prompt))
        elif kind == "ranking":
            r = f.ranking
            out.append(Group(tuple(_text(r.prompt, x) for x in r.responses), event_id=rec.event_id, prompt=r.prompt))
        elif kind == "rating":
            rt = f.rating
            ratings.setdefault(_rating_key(rt), {})[_response_key(rt.response)] = (
                _rating_value(rt), rt.response, rec.event_id)   # a later rating of the same response replaces it
    for key, rated in ratings.items():
        prompt = key[0]
        for (va, ra, ea), (vb, rb, eb) in combinations(rated.values(), 2):
            a, b = _text(prompt, ra), _text(prompt, rb)
            if va == vb:
                out.append(Group((a, b), tie=True, event_id=f"{ea}+{eb}", prompt=prompt))
            else:
                out.append(Group((a, b) if va > vb else (b, a), event_id=f"{ea}+{eb}", prompt=prompt))
    return out


class GroupCounter:
    """How many training groups the records seen so far make, updated one record at a time (the
    trainer's cadence counts these, not raw feedback events: a lone rating trains nothing, and a
    rating that joins k others of its prompt makes k comparisons)."""

    def __init__(self) -> None:
        self.total = 0
        self._rated: dict[tuple, set[str]] = {}

    def add(self, blob: bytes) -> int:
        """Counts one serialized FeedbackRecord; returns how many groups it added."""
        f = fb.FeedbackRecord.FromString(blob).feedback
        kind = f.WhichOneof("kind")
        new = 0
        if kind == "ranking" or (kind == "comparison" and f.comparison.preferred in _CHOICES):
            new = 1
        elif kind == "rating":
            seen = self._rated.setdefault(_rating_key(f.rating), set())
            r = _response_key(f.rating.response)
            if r not in seen:
                new = len(seen)
                seen.add(r)
        self.total += new
        return new
