"""Protobuf -> engine conversions and request validation for the policy server (the replies are
built where they are streamed, in server.py). Validation errors name the field (returned as INVALID_ARGUMENT)."""
from __future__ import annotations

import random
from dataclasses import dataclass

from rlhf.v1 import policy_pb2 as pb

from .engine import Finish, Sequence, SamplingSpec

FINISH_TO_PB = {
    Finish.LENGTH: pb.FINISH_REASON_LENGTH, Finish.EOS: pb.FINISH_REASON_EOS,
    Finish.STOP: pb.FINISH_REASON_STOP, Finish.CONTEXT: pb.FINISH_REASON_CONTEXT,
}


MAX_TEMPERATURE = 100.0
"""Hotter than this is uniform sampling for any model; larger values (inf, 3.4e38) are refused."""
GREEDY_BELOW = 1e-4
"""A positive temperature below this is greedy: logits / T would overflow float32 near 1e-38 (NaN
logprobs, a wrong token), and long before that the softmax is one-hot."""


class BadRequest(ValueError):
    """Invalid client input; the message starts with the offending field."""


ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Prompt:
    """A validated prompt. `rendered` is a conversation's text as the chat template wrote it (None for a
    text or token-ids prompt): the response and the interactions record carry it, since decoding the ids
    would drop the template's special tokens."""
    ids: list[int]
    rendered: str | None = None


def prompt(req: pb.GenerateRequest, policy, max_context: int) -> Prompt:
    """The prompt of a request; `policy` is a serve.loader.LoadedPolicy (encode, render_chat, ...)."""
    kind = req.WhichOneof("prompt")
    rendered = None
    if req.messages:
        if kind is not None:
            raise BadRequest(f"messages: set either messages or {kind}, not both")
        rendered = render(req.messages, policy)
        ids = policy.encode(rendered)
    elif kind is None:
        raise BadRequest("prompt: missing (set text, token_ids or messages)")
    elif kind == "text":
        if not req.text:
            raise BadRequest("prompt.text: empty")
        ids = policy.encode(req.text)
    else:
        ids = list(req.token_ids.ids)
        vocab_size = policy.model.args.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise BadRequest(f"prompt.token_ids: id {bad[0]} outside [0, {vocab_size})")
    if not ids:
        raise BadRequest("prompt: empty")
    if len(ids) >= max_context:
        raise BadRequest(f"prompt: {len(ids)} tokens, longer than the context allows (at most {max_context - 1})")
    return Prompt(ids, rendered)


def render(messages, policy) -> str:
    """A conversation through the model's chat template. Roles are checked here; a content may not
    hold a control token (<|im_end|>, eos, ...), which would let a user write turns of other roles and
    would not survive the rendered text's round trip through the trainer's tokenizer."""
    if policy.chat_template is None:
        raise BadRequest(f"messages: the model {policy.version} has no chat template; send text or token_ids")
    conv = []
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise BadRequest(f"messages[{i}].role: must be one of {', '.join(ROLES)}, got {m.role[:40]!r}")
        hit = policy.control_tokens.search(m.content) if policy.control_tokens is not None else None
        if hit:
            raise BadRequest(f"messages[{i}].content: holds the control token {hit.group()!r}")
        conv.append({"role": m.role, "content": m.content})
    try:
        return policy.render_chat(conv)
    except Exception as e:  # jinja's raise_exception (roles must alternate, ...) or a template error
        raise BadRequest(f"messages: the chat template refused them: {e}") from None


def sampling_spec(p: pb.SamplingParams, *, default_max_new: int, max_new_limit: int, max_batch: int,
                  max_stops: int) -> SamplingSpec:
    temperature = p.temperature if p.HasField("temperature") else 1.0
    if not 0 <= temperature <= MAX_TEMPERATURE:  # also catches NaN and inf
        raise BadRequest(f"params.temperature: must be in [0, {MAX_TEMPERATURE:g}], got {temperature}")
    if temperature < GREEDY_BELOW:
        temperature = 0.0
    if p.top_k < 0:
        raise BadRequest(f"params.top_k: must be >= 0, got {p.top_k}")
    top_p = p.top_p if p.HasField("top_p") else 1.0
    if not 0 < top_p <= 1:
        raise BadRequest(f"params.top_p: must be in (0, 1], got {top_p}")
    min_p = p.min_p if p.HasField("min_p") else 0.0
    if not 0 <= min_p < 1:
        raise BadRequest(f"params.min_p: must be in [0, 1), got {min_p}")
    max_new = p.max_new_tokens if p.HasField("max_new_tokens") else default_max_new
    if not 1 <= max_new <= max_new_limit:
        raise BadRequest(f"params.max_new_tokens: must be in [1, {max_new_limit}], got {max_new}")
    n = p.n if p.HasField("n") else 1
    if not 1 <= n <= max_batch:
        raise BadRequest(f"params.n: must be in [1, {max_batch}], got {n}")
    if len(p.stop) > max_stops or any(not s for s in p.stop):
        raise BadRequest(f"params.stop: at most {max_stops} non-empty strings")
    seed = p.seed if p.HasField("seed") else random.getrandbits(63)
    return SamplingSpec(temperature=temperature, top_k=p.top_k, top_p=top_p, min_p=min_p, max_new_tokens=max_new,
                        stop=tuple(p.stop), seed=seed, n=n, logprobs=p.return_logprobs,
                        ignore_eos=p.ignore_eos)


def completion(seq: Sequence, text: str) -> pb.Completion:
    return pb.Completion(response_id=seq.response_id, text=text, token_ids=seq.out,
                         logprobs=seq.logprobs if seq.request.spec.logprobs else [],
                         finish_reason=FINISH_TO_PB.get(seq.finish or "", pb.FINISH_REASON_UNSPECIFIED),
                         seed=seq.seed)
