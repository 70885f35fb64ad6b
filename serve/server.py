"""The policy gRPC server: rlhf.v1.PolicyService plus grpc.health.v1 and server reflection.

Handlers run on gRPC's thread pool; each submits a Request to the engine thread and waits
on the request's event queue. A cancelled call or an expired deadline sets the request's
cancel flag, and the engine frees its slots before its next step.
"""
from __future__ import annotations

import logging
import queue
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common import auth
from common.model_store import ModelStore
from common.omp import release_thread_pool
from rlhf.v1 import policy_pb2 as pb
from rlhf.v1 import policy_pb2_grpc as pb_grpc

from . import convert, kernels, metrics
from .config import ServerConfig
from .engine import (DoneEvent, Engine, EngineConfig, ErrorEvent, Finish, QueueFull, Request, ShuttingDown,
                     TokenEvent)
from .interactions import InteractionLog
from .loader import LoadedPolicy, load_policy
from .model import KVCache, StepLayout, num_parameters
from .served_scoring import Sample, ServedScorer
from .versions import Refused, ServedModel, UpdateWatcher, VersionManager, add_admin_service

log = logging.getLogger(__name__)
SERVICE = "rlhf.v1.PolicyService"


class TextTracker:
    """Incremental detokenisation of one sequence: emits only text that is final (no partial
    UTF-8 at the end, nothing that could still turn into a stop sequence, nothing of a stop sequence
    that one token completed: the engine emits that token's event before it finds the stop)."""

    def __init__(self, decode, stops: tuple[str, ...]):
        self.decode, self.stops = decode, stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.sent = 0

    def delta(self, ids: list[int], final: bool, text_end: int | None = None) -> str:
        text = self.decode(ids)
        if text_end is not None:
            text = text[:text_end]
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            text = text[:min(hits)]
        if not final:   # a character still split across tokens is not text yet: it must not use up the hold-back
            text = text.rstrip("\ufffd")
        end = len(text) if final else max(self.sent, len(text) - self.hold)
        out, self.sent = text[self.sent:end], max(self.sent, end)
        return out


class _Recorded:
    """Counts one RPC's outcome exactly once: OK, the status it aborted with, or CANCELLED."""

    def __init__(self, rpc: str, context):
        self.rpc, self.context, self.t0, self.done = rpc, context, time.monotonic(), False
        context.rlhf_recorded = self  # _abort marks it

    def ok(self) -> None:
        self.mark("OK")
        metrics.LATENCY.labels(self.rpc).observe(time.monotonic() - self.t0)

    def mark(self, status: str) -> None:
        if not self.done:
            self.done = True
            metrics.REQUESTS.labels(self.rpc, status).inc()

    def close(self) -> None:
        self.mark("CANCELLED")  # ended with no status of ours: the client went away


def _ended_status(context) -> str:
    """The status of a call that ended on the client's side before it was done: its deadline, or a cancel."""
    left = context.time_remaining()
    return "DEADLINE_EXCEEDED" if left is not None and left <= 0 else "CANCELLED"


def _abort(context, code: grpc.StatusCode, msg: str):
    rec = getattr(context, "rlhf_recorded", None)
    if rec is not None:
        rec.mark(code.name)
    context.abort(code, msg)


class PolicyServicer(pb_grpc.PolicyServiceServicer):
    def __init__(self, cfg: ServerConfig, policy: LoadedPolicy, engine: Engine, interactions=None, scorer=None):
        self.cfg, self.engine, self.interactions, self.scorer = cfg, engine, interactions, scorer
        self.max_context = engine.cfg.max_context

    # ---- helpers ----
    @property
    def policy(self) -> LoadedPolicy:
        """The version being served now. A hot-swap only accepts versions with the same tokenizer
        (serve/versions.py), so encoding and decoding do not depend on which version ran a request."""
        return self.engine.policy

    def _start(self, request: pb.GenerateRequest, context: grpc.ServicerContext, rpc: str,
               stream: bool) -> tuple[Request, str | None]:
        """Validates and submits a request: (the engine request, the rendered prompt of a `messages` one)."""
        try:
            prompt = convert.prompt(request, self.policy, self.max_context)
            spec = convert.sampling_spec(request.params, default_max_new=self.cfg.default_max_new_tokens,
                                         max_new_limit=self.cfg.max_new_tokens_limit,
                                         max_batch=self.cfg.max_batch_size, max_stops=self.cfg.max_stop_sequences)
        except convert.BadRequest as e:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None and remaining < 1e8 else None
        req = Request(prompt=prompt.ids, spec=spec, deadline=deadline, stream=stream)
        try:
            self.engine.submit(req)
        except QueueFull as e:
            _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except ShuttingDown as e:
            _abort(context, grpc.StatusCode.UNAVAILABLE, str(e))
        if not context.add_callback(self._on_done(req)):
            req.cancel()
        metrics.PROMPT_TOKENS.inc(len(prompt.ids) * spec.n)
        return req, prompt.rendered

    def _on_done(self, req: Request):
        def cb() -> None:  # runs when the RPC ends for any reason: cancel whatever is still live
            req.cancel()
            self.engine.wake()
        return cb

    def _events(self, req: Request, context: grpc.ServicerContext, rpc: str):
        """Yields engine events until every sequence is done; maps engine failures to statuses."""
        pending = req.spec.n
        first = True
        last_t = {}
        while pending:
            try:
                ev = req.events.get(timeout=0.25)
            except queue.Empty:
                if not context.is_active():
                    return
                continue
            if isinstance(ev, TokenEvent):
                now = time.monotonic()
                if first:
                    metrics.TTFT.observe(now - req.submitted)
                    first = False
                if ev.seq_index in last_t:
                    metrics.ITL.observe(now - last_t[ev.seq_index])
                last_t[ev.seq_index] = now
                metrics.GENERATED_TOKENS.inc()
            elif isinstance(ev, ErrorEvent):
                _abort(context, grpc.StatusCode.INTERNAL, f"generation failed: {ev.message}")
            elif isinstance(ev, DoneEvent):
                pending -= 1
                if ev.finish == Finish.DEADLINE:
                    _abort(context, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
                if ev.finish == Finish.CANCELLED:
                    _abort(context, grpc.StatusCode.CANCELLED, "cancelled")
                if ev.finish == Finish.SHUTDOWN:
                    _abort(context, grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another replica")
            yield ev

    def _log_interactions(self, req: Request, prompt: str | None = None, texts: list[str] | None = None) -> None:
        """After a request: the interactions topic, and a sample for served reward/KL scoring. `prompt` is
        the text served (a conversation's rendered prompt, chat template markup included), so the feedback
        service, the RM and PPO see what the policy saw; None: the prompt ids decoded."""
        if self.interactions is None and self.scorer is None:
            return
        prompt = self.policy.decode(req.prompt) if prompt is None else prompt
        texts = [self._text(s) for s in req.seqs] if texts is None else texts
        for s, text in zip(req.seqs, texts):
            if s.finish is None:   # never finished (the call ended first): not a response anyone got
                continue
            if self.interactions is not None:
                self.interactions.record(prompt, req.prompt, s, text, req.model_version)
            if self.scorer is not None and s.finish not in (Finish.CANCELLED, Finish.DEADLINE, Finish.ERROR,
                                                             Finish.SHUTDOWN):
                self.scorer.offer(Sample(req.model_version, req.served_by or self.policy, list(req.prompt),
                                         list(s.out), prompt, text, truncated=s.finish in ("length", "context")))

    def _text(self, seq) -> str:
        text = self.policy.decode(seq.out)
        return text[:seq.text_end] if seq.text_end is not None else text

    # ---- RPCs ----
    def Generate(self, request, context):
        return self._counted("Generate", context, lambda: self._generate(request, context))

    def GenerateStream(self, request, context):
        # a generator: the status is counted when it ends (normally, by abort, or closed on cancel)
        recorded = _Recorded("GenerateStream", context)
        try:
            yield from self._generate_stream(request, context)
            if context.is_active():
                recorded.ok()
            else:
                recorded.mark(_ended_status(context))
        finally:
            recorded.close()

    def _counted(self, rpc, context, fn):
        recorded = _Recorded(rpc, context)
        try:
            out = fn()
            if context.is_active():
                recorded.ok()
            else:
                recorded.mark(_ended_status(context))
            return out
        finally:
            recorded.close()

    def _generate(self, request, context):
        req, rendered = self._start(request, context, "Generate", stream=False)
        for _ in self._events(req, context, "Generate"):
            pass
        if req.first_token_at is not None:
            metrics.TTFT.observe(req.first_token_at - req.submitted)
        metrics.GENERATED_TOKENS.inc(sum(len(s.out) for s in req.seqs))
        if not context.is_active():
            return pb.GenerateResponse()
        prompt = rendered if rendered is not None else self.policy.decode(req.prompt)
        texts = [self._text(s) for s in req.seqs]  # decoded once
        self._log_interactions(req, prompt, texts)
        return pb.GenerateResponse(
            completions=[convert.completion(s, t) for s, t in zip(req.seqs, texts)],
            usage=pb.Usage(prompt_tokens=len(req.prompt), completion_tokens=sum(len(s.out) for s in req.seqs)),
            model_version=req.model_version, prompt_text=prompt, prompt_token_ids=req.prompt)

    def _generate_stream(self, request, context):
        req, rendered = self._start(request, context, "GenerateStream", stream=True)
        prompt_text = rendered if rendered is not None else self.policy.decode(req.prompt)
        trackers = [TextTracker(self.policy.decode, req.spec.stop) for _ in req.seqs]
        for ev in self._events(req, context, "GenerateStream"):
            i = ev.seq_index
            seq = req.seqs[i]
            if isinstance(ev, TokenEvent):
                yield pb.GenerateStreamChunk(index=i, response_id=seq.response_id, token_ids=[ev.token_id],
                                             logprobs=[ev.logprob] if req.spec.logprobs else [],
                                             text_delta=self._delta(trackers[i], seq, ev),
                                             model_version=req.model_version)
            elif isinstance(ev, DoneEvent):
                yield pb.GenerateStreamChunk(
                    index=i, response_id=seq.response_id, model_version=req.model_version,
                    text_delta=trackers[i].delta(seq.out, final=True, text_end=seq.text_end),
                    finish_reason=convert.FINISH_TO_PB.get(ev.finish, pb.FINISH_REASON_UNSPECIFIED),
                    usage=pb.Usage(prompt_tokens=len(req.prompt), completion_tokens=len(seq.out)),
                    prompt_text=prompt_text, seed=seq.seed)
        if not context.is_active():   # the client went away (deadline, cancel): nothing was served to log
            return
        self._log_interactions(req, prompt_text)

    @staticmethod
    def _delta(tracker: TextTracker, seq, ev: TokenEvent) -> str:
        # the engine may already have appended later tokens; decode only up to this event's token
        return tracker.delta(seq.out[:ev.tokens_so_far], final=False)

    def GetModelInfo(self, request, context):
        a = self.policy.model.args
        return pb.ModelInfo(model_version=self.engine.model_version, architecture=a.arch, vocab_size=a.vocab_size,
                            max_context=self.max_context, max_new_tokens_limit=self.cfg.max_new_tokens_limit,
                            max_batch_size=self.cfg.max_batch_size, num_parameters=num_parameters(self.policy.model),
                            model_path=str(self.policy.path))


def build_engine(cfg: ServerConfig, policy: LoadedPolicy) -> Engine:
    max_ctx = min(cfg.max_context, policy.model.args.max_position)
    ecfg = EngineConfig(max_batch_size=cfg.max_batch_size, max_queue=cfg.max_queue, max_context=max_ctx,
                        max_prefill_tokens=cfg.max_prefill_tokens,
                        prefix_reuse_min_tokens=cfg.prefix_reuse_min_tokens)
    return Engine(policy.model, ecfg, policy.end_ids, policy.decode, policy.version, on_step=metrics.on_step,
                  policy=policy)


@torch.no_grad()
def policy_canary(cand: LoadedPolicy, current: LoadedPolicy | None) -> None:
    """Refuses a candidate whose tokenizer or chat template differs from the served one (prompts are
    encoded and rendered before a request knows its version) or whose outputs on a fixed prompt are not
    finite and in range."""
    if current is not None and cand.tokenizer.get_vocab() != current.tokenizer.get_vocab():
        raise Refused(f"{cand.version}: tokenizer differs from the served version's (incompatible)")
    if current is not None and cand.chat_template != current.chat_template:
        raise Refused(f"{cand.version}: chat template differs from the served version's (incompatible)")
    ids = cand.encode("\n\nHuman: Hello, how are you?\n\nAssistant:")[-32:] or [0]
    p = next(cand.model.parameters())
    cache = KVCache(cand.model.args, 1, len(ids) + 2, p.dtype, p.device)
    # the two paths a request takes, once each: the prompt's prefill, then one decode step on its KV
    # (each pass reads every weight: on a 2-core CPU a GPT-2-small pass is ~0.1-0.3 s of the swap)
    logits = cand.model(torch.tensor(ids, device=p.device), StepLayout.build(0, [len(ids)], [0], p.device), cache,
                        logits_for=torch.tensor([len(ids) - 1], device=p.device))
    nxt = _canary_token(cand, logits, "prefill")
    logits = cand.model(torch.tensor([nxt], device=p.device), StepLayout.build_decode(0, [len(ids)], p.device), cache)
    _canary_token(cand, logits, "decode")


def _canary_token(cand: LoadedPolicy, logits: torch.Tensor, path: str) -> int:
    """The greedy token of (1, V) logits; refuses non-finite logits, logprob or an id outside the vocabulary."""
    if not torch.isfinite(logits).all():
        raise Refused(f"{cand.version}: non-finite logits on the canary prompt ({path})")
    nxt = int(logits[0].argmax())
    lp = kernels.token_logprobs(logits.float(), torch.tensor([nxt], device=logits.device))
    if not torch.isfinite(lp).all() or not 0 <= nxt < cand.model.args.vocab_size:
        raise Refused(f"{cand.version}: bad logprob or token on the canary prompt ({path})")
    return nxt


@dataclass(frozen=True)
class StoreFollower:
    """What follow_store started; the watcher is stopped at shutdown."""
    manager: VersionManager[LoadedPolicy]
    watcher: UpdateWatcher | None   # None without Kafka: versions change only through the admin RPCs


def follow_store(cfg: ServerConfig, engine: Engine, server) -> StoreFollower:
    """Hot-swap from the model store: VersionManager + (with Kafka) the model-updates watcher + admin RPCs."""
    store = ModelStore(cfg.store)

    def apply(new: ServedModel[LoadedPolicy]) -> None:
        pol = new.loaded
        engine.swap(pol.model, new.version, pol.end_ids, pol.decode, policy=pol)
        metrics.MODEL_VERSION.info({"version": new.version, "path": str(pol.path)})

    mgr = VersionManager(
        store=store, load=lambda v: load_policy(store.path(v) / "policy", dtype=getattr(torch, cfg.dtype),
                                                device=cfg.device, cpu_pack=cfg.cpu_pack,
                                                quantize_mode=cfg.quantize),
        canary=policy_canary, apply=apply, current=ServedModel(engine.model_version, engine.policy),
        on_event=lambda result, v: metrics.VERSION_EVENTS.labels(result).inc(),
        hold=engine.hold, release=engine.release, part="policy")
    add_admin_service(server, mgr)
    watcher = UpdateWatcher(cfg.kafka_bootstrap, mgr, "policy-server").start() if cfg.kafka_bootstrap else None
    return StoreFollower(mgr, watcher)


def build_scorer(cfg: ServerConfig):
    """Served reward/KL sampling (--served-score-fraction > 0): the reference policy is --reference,
    or the model store's first version (the trainer's PPO reference)."""
    if cfg.served_score_fraction <= 0:
        return None
    ref_path = cfg.reference or (str(Path(cfg.store) / "v0000" / "policy") if cfg.store else "")
    reference = load_policy(ref_path, cpu_pack="none") if ref_path else None
    if reference is None and not cfg.rm_target:
        log.warning("--served-score-fraction set but neither a reference policy nor --rm-target: nothing to score")
    token = Path(cfg.rm_token_file).read_text().strip() if cfg.rm_token_file else ""
    return ServedScorer(cfg.served_score_fraction, reference, cfg.rm_target, rm_token=token, rm_tls_ca=cfg.rm_tls_ca)


def serve(cfg: ServerConfig, policy: LoadedPolicy):
    """Starts engine and gRPC server; returns (server, bound port, engine, interaction log or None)."""
    engine = build_engine(cfg, policy).start()
    workers = cfg.max_batch_size + cfg.max_queue + 8
    opts = [("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes), *auth.EXCLUSIVE_PORT]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
                         options=opts, maximum_concurrent_rpcs=workers, interceptors=auth.interceptors(cfg.auth_tokens))
    interactions = None
    if cfg.kafka_bootstrap:
        interactions = InteractionLog(cfg.kafka_bootstrap)
    scorer = build_scorer(cfg)
    pb_grpc.add_PolicyServiceServicer_to_server(PolicyServicer(cfg, policy, engine, interactions, scorer), server)
    server.versions = follow_store(cfg, engine, server) if cfg.store else None
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (pb.DESCRIPTOR.services_by_name["PolicyService"].full_name, "rlhf.v1.AdminService", health.SERVICE_NAME,
             reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    port = auth.bind(server, f"{cfg.host}:{cfg.port}", cfg.tls_cert, cfg.tls_key)
    if port == 0:
        raise OSError(f"could not bind {cfg.host}:{cfg.port}")
    server.start()
    for name in ("", SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    metrics.KV_SLOTS_TOTAL.set(cfg.max_batch_size)
    for result in ("swapped", "refused"):   # series exist from the start (dashboards, alert rules)
        metrics.VERSION_EVENTS.labels(result)
    metrics.MODEL_VERSION.info({"version": policy.version, "path": str(policy.path)})
    release_thread_pool()   # the load's OpenMP pool would halve the engine thread's speed (common/omp.py)
    return server, port, engine, interactions
