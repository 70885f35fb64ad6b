"""Validation of feedback (pure: no I/O). Used by the gRPC service before producing and by the
consumer before storing, so a record that slips past one is caught by the other."""
from __future__ import annotations

from dataclasses import dataclass

from rlhf.v1 import feedback_pb2 as fb


class Invalid(ValueError):
    """The message says what is wrong, naming the field."""


@dataclass(frozen=True)
class Limits:
    max_text_chars: int = 32_000
    """Longest prompt or response text accepted."""
    min_k: int = 2
    max_k: int = 9
    """K-wise rankings: InstructGPT's labelers ranked 4 to 9; 2 is a comparison."""
    max_id_chars: int = 128


def check_text(name: str, value: str, lim: Limits, required: bool = True) -> None:
    """A text field within the limits; raises Invalid naming it."""
    if required and (not value or value.isspace()):
        raise Invalid(f"{name}: missing")
    if len(value) > lim.max_text_chars:
        raise Invalid(f"{name}: {len(value)} characters, more than the limit of {lim.max_text_chars}")


def _enum(name: str, value: int, enum) -> None:
    """proto3 enums are open: a client can send any int32. Only the defined values mean something."""
    if value not in enum.values():
        raise Invalid(f"{name}: {value} is not one of {', '.join(f'{n} ({v})' for n, v in enum.items())}")


def _source(src: fb.Source, lim: Limits) -> None:
    _enum("source.kind", src.kind, fb.SourceKind)
    if src.kind == fb.SOURCE_KIND_UNSPECIFIED:
        raise Invalid("source.kind: missing (user or labeler)")
    if not src.id or len(src.id) > lim.max_id_chars:
        raise Invalid(f"source.id: missing or longer than {lim.max_id_chars} characters")


def _response(name: str, r: fb.Response, lim: Limits, resolved: bool) -> None:
    if not r.response_id and not r.text:
        raise Invalid(f"{name}: needs a response_id or a text")
    if resolved and not r.model_version:
        raise Invalid(f"{name}.model_version: missing")
    # a response given by id may be served text that is empty (the model stopped at once): the id,
    # resolved against the interactions log, is what identifies it, so only id-less ones need a text
    check_text(f"{name}.text", r.text, lim, required=resolved and not r.response_id)


def event_id(f: fb.Feedback) -> str:
    kind = f.WhichOneof("kind")
    return getattr(f, kind).event_id if kind else ""


def responses(f: fb.Feedback) -> list[tuple[str, fb.Response]]:
    """(field name, Response) of every response a piece of feedback refers to."""
    kind = f.WhichOneof("kind")
    if kind == "comparison":
        return [("comparison.a", f.comparison.a), ("comparison.b", f.comparison.b)]
    if kind == "ranking":
        return [(f"ranking.responses[{i}]", r) for i, r in enumerate(f.ranking.responses)]
    if kind == "rating":
        return [("rating.response", f.rating.response)]
    return []


def check(f: fb.Feedback, lim: Limits, resolved: bool) -> None:
    """Raises Invalid unless f is well formed. resolved=True (the consumer's view) also requires
    every response to carry its text and model version."""
    kind = f.WhichOneof("kind")
    if kind is None:
        raise Invalid("feedback: empty (set comparison, ranking or rating)")
    msg = getattr(f, kind)
    if len(msg.event_id) > lim.max_id_chars:
        raise Invalid(f"{kind}.event_id: longer than {lim.max_id_chars} characters")
    if resolved and not msg.event_id:
        raise Invalid(f"{kind}.event_id: missing")
    if not msg.HasField("source"):
        raise Invalid(f"{kind}.source: missing")
    _source(msg.source, lim)
    check_text(f"{kind}.prompt", msg.prompt, lim)
    for name, r in responses(f):
        _response(name, r, lim, resolved)
    if kind == "comparison":
        _enum("comparison.preferred", msg.preferred, fb.Comparison.Choice)
        _enum("comparison.strength", msg.strength, fb.Comparison.Strength)
        if msg.preferred == fb.Comparison.CHOICE_UNSPECIFIED:
            raise Invalid("comparison.preferred: missing (A, B or TIE)")
        if _same(msg.a, msg.b):
            raise Invalid("comparison: a and b are the same response")
    elif kind == "ranking":
        k = len(msg.responses)
        if not lim.min_k <= k <= lim.max_k:
            raise Invalid(f"ranking.responses: K={k}, must be in [{lim.min_k}, {lim.max_k}]")
        keys = [r.response_id or r.text for r in msg.responses]
        if len(set(keys)) != k:
            raise Invalid("ranking.responses: duplicates")
    elif kind == "rating":
        which = msg.WhichOneof("score")
        if which is None:
            raise Invalid("rating.score: missing (thumbs_up or likert)")
        if which == "likert" and not 1 <= msg.likert <= 7:
            raise Invalid(f"rating.likert: {msg.likert}, must be in [1, 7]")


def _same(a: fb.Response, b: fb.Response) -> bool:
    if a.response_id and b.response_id:
        return a.response_id == b.response_id
    return not a.response_id and not b.response_id and a.text == b.text
