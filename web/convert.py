"""The one place where the pages' JSON meets the gRPC messages (pure: no I/O).

The pages refer to responses by the `response_id` the policy server gave them; the feedback
service fills in their text, model version, finish reason and prompt from the interactions log, so a
page cannot submit a text, or a prompt, the policy never served. Only the shape is checked here; the feedback
service validates the content and answers INVALID_ARGUMENT naming the field.
"""
from __future__ import annotations

import re
from typing import Any

from rlhf.v1 import feedback_pb2 as fb
from rlhf.v1 import policy_pb2 as pb


class BadInput(ValueError):
    """A request the pages would never send; the message names the field."""


CHOICES = {"a": fb.Comparison.CHOICE_A, "b": fb.Comparison.CHOICE_B, "tie": fb.Comparison.CHOICE_TIE}
STRENGTHS = {"": fb.Comparison.STRENGTH_UNSPECIFIED, "slightly": fb.Comparison.STRENGTH_SLIGHTLY_BETTER,
             "clearly": fb.Comparison.STRENGTH_CLEARLY_BETTER}
SOURCES = {"chat": fb.SOURCE_KIND_USER, "label": fb.SOURCE_KIND_LABELER}
KINDS = {"chat": ("comparison", "rating"), "label": ("ranking", "rating")}
"""What each page submits: users compare and rate (Bai et al. 2022); labelers rank and rate (InstructGPT)."""
CHAT_ROLES = ("user", "assistant")
FINISH = {v: pb.FinishReason.Name(v).removeprefix("FINISH_REASON_").lower() for v in pb.FinishReason.values()}
_EVENT_ID = re.compile(r"[A-Za-z0-9_-]{8,128}")


INT32 = 1 << 31
INT64 = 1 << 63


def _get(d: dict, key: str, kind: type, where: str):
    """d[key] of type `kind`: a str that is valid Unicode (JSON's \\ud800 escapes decode to a lone surrogate,
    which a protobuf string refuses), an int within int32."""
    v = d.get(key)
    if not isinstance(v, kind) or isinstance(v, bool) != (kind is bool):
        raise BadInput(f"{where}.{key}: expected {kind.__name__}")
    if kind is str and not _encodable(v):
        raise BadInput(f"{where}.{key}: not valid Unicode text (a lone surrogate)")
    if kind is int and not -INT32 <= v < INT32:
        raise BadInput(f"{where}.{key}: out of range")
    return v


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def chat_request(body: Any, max_messages: int, max_chars: int, **params) -> pb.GenerateRequest:
    """{"messages": [{"role": "user"|"assistant", "content": str}, ...]} ending with the person's
    message -> a GenerateRequest rendered by the model's chat template."""
    msgs = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(msgs, list) or not 1 <= len(msgs) <= max_messages:
        raise BadInput(f"messages: expected a list of 1 to {max_messages} messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            raise BadInput(f"messages[{i}].role: expected one of {CHAT_ROLES}")
        content = _get(m, "content", str, f"messages[{i}]")
        if len(content) > max_chars:
            raise BadInput(f"messages[{i}].content: longer than {max_chars} characters")
        out.append(pb.ChatMessage(role=m["role"], content=content))
    if out[-1].role != "user" or not out[-1].content.strip():
        raise BadInput("messages: the last one must be the person's (role user), not empty")
    return pb.GenerateRequest(messages=out, params=pb.SamplingParams(**params))


def label_request(prompt: str, **params) -> pb.GenerateRequest:
    return pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content=prompt)],
                              params=pb.SamplingParams(**params))


def stream_events(chunk: pb.GenerateStreamChunk) -> list[tuple[str, dict]]:
    """One stream chunk -> server-sent events: "delta" for new text, then "done" on a sample's
    last chunk (with the prompt as the model saw it, which feedback on the sample quotes)."""
    head = {"index": chunk.index, "response_id": chunk.response_id, "model_version": chunk.model_version}
    events = [("delta", {**head, "text": chunk.text_delta})] if chunk.text_delta else []
    if chunk.finish_reason:
        events.append(("done", {**head, "finish_reason": FINISH[chunk.finish_reason],
                                "prompt_text": chunk.prompt_text}))
    return events


def label_item(index: int, prompt: str, resp: pb.GenerateResponse) -> dict:
    return {"index": index, "prompt": prompt, "prompt_text": resp.prompt_text, "model_version": resp.model_version,
            "responses": [{"response_id": c.response_id, "text": c.text} for c in resp.completions]}


def _response_id(d: dict, key: str, where: str) -> fb.Response:
    rid = _get(d, key, str, where)
    if not rid:
        raise BadInput(f"{where}.{key}: missing")
    return fb.Response(response_id=rid)


def _common(d: dict, where: str, source: fb.Source) -> dict:
    eid = _get(d, "event_id", str, where)
    if not _EVENT_ID.fullmatch(eid):
        raise BadInput(f"{where}.event_id: 8 to 128 letters, digits, '-' or '_'")
    created = d.get("created_unix_ms", 0)
    if not isinstance(created, int) or isinstance(created, bool) or not 0 <= created < INT64:
        raise BadInput(f"{where}.created_unix_ms: expected a non-negative integer (int64)")
    return dict(event_id=eid, source=source, prompt=_get(d, "prompt", str, where), created_unix_ms=created)


def _comparison(d: dict, where: str, source: fb.Source) -> fb.Feedback:
    choice, strength = d.get("choice"), d.get("strength", "")
    if choice not in CHOICES:
        raise BadInput(f"{where}.choice: expected one of {sorted(CHOICES)}")
    if strength not in STRENGTHS or (choice == "tie") != (strength == ""):
        raise BadInput(f"{where}.strength: 'slightly' or 'clearly' for A or B, none for a tie")
    return fb.Feedback(comparison=fb.Comparison(
        a=_response_id(d, "a", where), b=_response_id(d, "b", where), preferred=CHOICES[choice],
        strength=STRENGTHS[strength], **_common(d, where, source)))


def _ranking(d: dict, where: str, source: fb.Source) -> fb.Feedback:
    ids = d.get("response_ids")
    if not isinstance(ids, list) or not all(isinstance(r, str) and r and _encodable(r) for r in ids):
        raise BadInput(f"{where}.response_ids: expected a list of response ids, best first")
    return fb.Feedback(ranking=fb.Ranking(responses=[fb.Response(response_id=r) for r in ids],
                                          **_common(d, where, source)))


def _rating(d: dict, where: str, source: fb.Source) -> fb.Feedback:
    score = {k: d[k] for k in ("thumbs_up", "likert") if k in d}
    if len(score) != 1:
        raise BadInput(f"{where}: give thumbs_up or likert")
    if "thumbs_up" in score:
        _get(d, "thumbs_up", bool, where)
    else:
        _get(d, "likert", int, where)
    return fb.Feedback(rating=fb.Rating(response=_response_id(d, "response_id", where), **score,
                                        **_common(d, where, source)))


_BUILDERS = {"comparison": _comparison, "ranking": _ranking, "rating": _rating}


def feedback_batch(page: str, person_id: str, body: Any) -> fb.FeedbackBatch:
    """{"items": [{"kind": ..., "event_id": ..., ...}, ...]} from a page -> the batch to submit,
    each item from the page's kind of source (user on the chat page, labeler on the labeling page)."""
    items = body.get("items") if isinstance(body, dict) else None
    if not isinstance(items, list) or not 1 <= len(items) <= 16:
        raise BadInput("items: expected a list of 1 to 16 submissions")
    source = fb.Source(kind=SOURCES[page], id=person_id)
    out = []
    for i, d in enumerate(items):
        where = f"items[{i}]"
        if not isinstance(d, dict) or d.get("kind") not in KINDS[page]:
            raise BadInput(f"{where}.kind: the {page} page submits {' or '.join(KINDS[page])}")
        out.append(_BUILDERS[d["kind"]](d, where, source))
    return fb.FeedbackBatch(items=out)
