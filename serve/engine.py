"""The generation engine: continuous batching over a slot KV cache.

One engine thread owns the model and the cache. Each iteration (vLLM's scheduler,
simplified to one process):
  1. drop cancelled and expired sequences (their slots are free at once),
  2. admit waiting requests into free slots,
  3. one forward: a decode token for every live sequence plus the packed prompts of the
     admitted requests (prefill rides along with decode, so a new arrival costs no extra weight pass);
     a request's prompt is prefilled once whatever its n: its other samples get a copy of that KV,
  4. hand each new token to its request's queue; finished sequences leave.
Live sequences always occupy slots [0, B): a finished one is replaced by the last, so
attention reads the cache through views and nothing is copied per decode step.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable

import torch

from . import kernels
from .model import CausalLM, KVCache, StepLayout

if TYPE_CHECKING:   # the engine runs any CausalLM; the server hands it the LoadedPolicy around it
    from .loader import LoadedPolicy

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The waiting queue is at its limit (the server answers RESOURCE_EXHAUSTED)."""


class ShuttingDown(Exception):
    """The engine is draining for shutdown: no new requests (the server answers UNAVAILABLE)."""


class Finish:
    LENGTH, EOS, STOP, CONTEXT = "length", "eos", "stop", "context"   # EOS: any of the engine's end ids
    CANCELLED, DEADLINE, ERROR = "cancelled", "deadline", "error"
    SHUTDOWN = "shutdown"   # still waiting when the server began to shut down


@dataclass(frozen=True)
class SamplingSpec:
    """Validated sampling parameters of one request (the server checks ranges)."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    max_new_tokens: int = 16
    stop: tuple[str, ...] = ()
    seed: int = 0
    n: int = 1
    logprobs: bool = False
    ignore_eos: bool = False


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 32
    """Sequences decoded together at most (= KV-cache slots)."""
    max_queue: int = 64
    """Requests waiting for a slot at most; beyond it submissions are refused."""
    max_context: int = 512
    """Prompt plus generated tokens per sequence at most (= KV-cache length)."""
    max_prefill_tokens: int = 4096
    """Prompt tokens prefilled in one step at most (bounds the latency of a step)."""
    prefix_reuse_min_tokens: int = 0
    """Prefix reuse (0: off): a finished sequence's KV stays in the slot it frees, and a prompt that starts
    with at least this many of its tokens (the same conversation going on) copies them instead of
    prefilling them. Off by default: the reused KV was computed in another step, so results then equal a
    full prefill's to rounding (1e-6), not bit for bit, and depend on what earlier requests left."""

    def __post_init__(self) -> None:
        for k in ("max_batch_size", "max_queue", "max_context", "max_prefill_tokens"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1")
        if self.prefix_reuse_min_tokens < 0:
            raise ValueError("prefix_reuse_min_tokens must be >= 0")


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """Sequence `seq_index` sampled `token_id`; it then had `tokens_so_far` tokens (seq.out may already be longer)."""
    seq_index: int
    token_id: int
    logprob: float
    tokens_so_far: int


@dataclass(frozen=True, slots=True)
class DoneEvent:
    """Sequence `seq_index` ended for `finish` (a Finish value)."""
    seq_index: int
    finish: str


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    """Generation of sequence `seq_index` failed (the server answers INTERNAL)."""
    seq_index: int
    message: str


Event = TokenEvent | DoneEvent | ErrorEvent


@dataclass(eq=False)
class Sequence:
    """One sample being generated."""
    request: "Request"
    index: int                      # which of the request's n samples
    seed: int
    response_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    out: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    cached: int = 0                 # tokens already in the KV cache
    slot: int = -1
    finish: str | None = None
    text_end: int | None = None     # char offset where a stop sequence begins


@dataclass(eq=False)
class Request:
    """One client call: n sequences sharing a prompt. Events (TokenEvent, DoneEvent, ErrorEvent) go
    to `events`; each sequence ends with one DoneEvent or ErrorEvent."""
    prompt: list[int]
    spec: SamplingSpec
    deadline: float | None = None   # time.monotonic() seconds
    events: "queue.Queue[Event]" = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    model_version: str = ""
    seqs: list[Sequence] = field(default_factory=list)
    submitted: float = field(default_factory=time.monotonic)
    stream: bool = True             # False: no per-token events (a unary call only needs the DoneEvent)
    first_token_at: float | None = None
    served_by: LoadedPolicy | None = None   # the engine's `policy` of the version that ran it (its tokenizer, its path)

    def cancel(self) -> None:
        self.cancelled.set()


def end_id_set(eos: int | Iterable[int] | None) -> frozenset[int]:
    """The ids a sequence ends at: one end-of-sequence id, several (a chat model's end-of-turn tokens
    besides its eos), or none."""
    return frozenset() if eos is None else frozenset((eos,) if isinstance(eos, int) else eos)


@dataclass
class _Swap:
    model: CausalLM
    version: str
    eos_id: int | Iterable[int] | None
    decode: Callable[[list[int]], str]
    policy: LoadedPolicy | None
    done: threading.Event = field(default_factory=threading.Event)
    error: Exception | None = None


class Engine:
    """Weight swaps (`swap`) happen between steps: admission pauses, the running batch finishes on
    the version it started with, then the new weights take over, so no batch mixes versions and every
    request is served start to end by one version (Request.model_version / served_by)."""

    def __init__(self, model: CausalLM, cfg: EngineConfig, eos_id: int | Iterable[int] | None,
                 decode: Callable[[list[int]], str], model_version: str,
                 on_step: Callable[[dict], None] | None = None, policy: LoadedPolicy | None = None):
        self.model, self.cfg, self.end_ids, self.decode = model, cfg, end_id_set(eos_id), decode
        self.model_version = model_version
        self.policy = policy   # what the server knows of the version served (None when a trainer runs the engine)
        self._swap: _Swap | None = None
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.cache = KVCache(model.args, cfg.max_batch_size, cfg.max_context, self.dtype, self.device)
        self.waiting: deque[Request] = deque()
        self.active: list[Sequence] = []       # active[i].slot == i
        self.kept: dict[int, list[int]] = {}   # free slot -> the tokens whose KV it holds (prefix reuse)
        self.cv = threading.Condition()
        self.on_step = on_step or (lambda stats: None)
        self._stop = False
        self._draining = False
        self._held = False     # a swap is coming (`hold`, `swap`): admit nothing, let the batch drain
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)

    # ---- client side (any thread) ----
    def start(self) -> "Engine":
        self._thread.start()
        return self

    def stop(self) -> None:
        with self.cv:
            self._stop = True
            self.cv.notify_all()
        self._thread.join(timeout=30)

    def drain(self) -> int:
        """Shutdown, first step: admit nothing more and fail every waiting request at once with
        Finish.SHUTDOWN (clients retry elsewhere instead of waiting out the grace period); the
        running batch goes on to its end. Returns how many requests were refused."""
        with self.cv:
            self._draining = True
            refused, self.waiting = list(self.waiting), deque()
            self.cv.notify_all()
        for r in refused:
            for s in r.seqs:
                s.finish = Finish.SHUTDOWN
                r.events.put(DoneEvent(s.index, Finish.SHUTDOWN))
        return len(refused)

    def submit(self, req: Request) -> Request:
        if req.spec.n > self.cfg.max_batch_size:
            raise ValueError(f"n={req.spec.n} is above max_batch_size={self.cfg.max_batch_size}")
        req.seqs = [Sequence(req, i, (req.spec.seed + i) % (1 << 64)) for i in range(req.spec.n)]
        with self.cv:
            if self._draining:
                raise ShuttingDown("the server is shutting down; retry on another replica")
            if len(self.waiting) >= self.cfg.max_queue:
                self._purge_waiting()   # requests whose clients went away must not fill the queue
            if len(self.waiting) >= self.cfg.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests already waiting (max_queue={self.cfg.max_queue})")
            self.waiting.append(req)
            self.cv.notify_all()
        return req

    def hold(self) -> None:
        """A swap is being prepared: admit nothing more and let the running batch finish, so it drains
        while the new version is verified and loaded instead of after (then the swap applies at once).
        Requests wait in the queue; `swap` or `release` ends the hold."""
        with self.cv:
            self._held = True
            self.cv.notify_all()

    def release(self) -> None:
        """The prepared version was refused: admit again, on the current version."""
        with self.cv:
            self._held = False
            self.cv.notify_all()

    def swap(self, model: CausalLM, version: str, eos_id: int | Iterable[int] | None,
             decode: Callable[[list[int]], str], policy: LoadedPolicy | None = None, timeout: float | None = None) -> bool:
        """Serve `model` as `version` once the running batch has drained. Blocks until swapped
        (True) or timeout (False; the swap still happens later)."""
        sw = _Swap(model, version, eos_id, decode, policy)
        with self.cv:
            self._swap = sw
            self._held = True   # drain before a swap (already so after `hold`)
            self.cv.notify_all()
        done = sw.done.wait(timeout)
        if sw.error is not None:
            raise sw.error
        return done

    def _apply_swap(self) -> None:
        """Engine thread, batch empty: new weights, and a new cache if the shapes changed. A failure (no
        memory for the new cache) leaves the old version served, whole, and is raised to `swap`'s caller."""
        sw, self._swap = self._swap, None
        self._held = False
        try:
            p = next(sw.model.parameters())
            cache = self.cache
            if sw.model.args != self.model.args or p.dtype != self.dtype:
                cache = KVCache(sw.model.args, self.cfg.max_batch_size, self.cfg.max_context, p.dtype, p.device)
            self.cache, self.device, self.dtype = cache, p.device, p.dtype
            self.kept.clear()   # KV of the old weights
            self.model, self.model_version, self.end_ids, self.decode, self.policy = (
                sw.model, sw.version, end_id_set(sw.eos_id), sw.decode, sw.policy)
            log.info("now serving %s", sw.version)
        except Exception as e:
            log.exception("swap to %s failed; still serving %s", sw.version, self.model_version)
            sw.error = e
        finally:
            sw.done.set()

    def wake(self) -> None:
        with self.cv:
            self.cv.notify_all()

    # ---- engine thread ----
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.cv:
                # idle: nothing running, no swap to apply, and nothing to admit (or admission held)
                while not self._stop and not self.active and self._swap is None and (self._held or not self.waiting):
                    self.cv.wait()
                if self._stop:
                    break
            prefilled = 0
            try:
                self._drop_dead()
                with self.cv:
                    self._purge_waiting()   # also while held: a queue of dead requests refuses live ones
                    if self._swap is not None and not self.active:
                        self._apply_swap()
                    admitted = [] if self._held else self._admit()   # held: a swap is coming, drain first
                if admitted or self.active:
                    prefilled = self._step(admitted)
            except Exception as e:  # a bug must not hang clients: fail everything live, keep serving
                log.exception("engine step failed; failing %d live sequences", len(self.active))
                for s in list(self.active):
                    self._finish(s, Finish.ERROR, error=repr(e))
            self.on_step({"batch": len(self.active), "waiting": len(self.waiting), "prefill_tokens": prefilled})
        for s in list(self.active):
            self._finish(s, Finish.CANCELLED)
        for r in self.waiting:
            for s in r.seqs:
                r.events.put(DoneEvent(s.index, Finish.CANCELLED))

    def _purge_waiting(self) -> None:
        """Drops waiting requests that were cancelled or passed their deadline, wherever they are in the
        queue, with their final event. Caller holds cv."""
        now = time.monotonic()
        if not any(r.cancelled.is_set() or (r.deadline is not None and now > r.deadline) for r in self.waiting):
            return
        live = deque()
        for req in self.waiting:
            dead = req.cancelled.is_set() or (req.deadline is not None and now > req.deadline)
            if not dead:
                live.append(req)
                continue
            reason = Finish.CANCELLED if req.cancelled.is_set() else Finish.DEADLINE
            for s in req.seqs:
                req.events.put(DoneEvent(s.index, reason))
        self.waiting = live

    def _admit(self) -> list[Sequence]:
        """Moves waiting requests into free slots (whole requests only), FIFO. A request takes n slots
        but one prompt's worth of the step's prefill budget (its samples share one prefill). Caller holds cv."""
        now = time.monotonic()
        admitted: list[Sequence] = []
        budget = self.cfg.max_prefill_tokens
        while self.waiting:
            req = self.waiting[0]
            if req.cancelled.is_set() or (req.deadline is not None and now > req.deadline):
                self.waiting.popleft()
                reason = Finish.CANCELLED if req.cancelled.is_set() else Finish.DEADLINE
                for s in req.seqs:
                    req.events.put(DoneEvent(s.index, reason))
                continue
            need = len(req.prompt)
            free = self.cfg.max_batch_size - len(self.active) - len(admitted)
            if req.spec.n > free or (admitted and need > budget):
                break
            self.waiting.popleft()
            budget -= need
            req.model_version, req.served_by = self.model_version, self.policy
            admitted.extend(req.seqs)
        return admitted

    def _drop_dead(self) -> None:
        now = time.monotonic()
        for s in list(self.active):
            r = s.request
            if r.cancelled.is_set():
                self._finish(s, Finish.CANCELLED)
            elif r.deadline is not None and now > r.deadline:
                self._finish(s, Finish.DEADLINE)

    def _step(self, new: list[Sequence]) -> int:
        """One forward for the whole batch: a decode token for each live sequence and, packed after
        them, the prompt of each newly admitted request, once. A request's samples 1..n-1 ("forks")
        are not in the forward: they take the slots after it, get a copy of sample 0's prompt KV and
        sample from its last-position logits with their own seeds. With prefix reuse a prompt's start
        may come from a kept slot instead (_reuse_prefix). Returns the prompt tokens prefilled."""
        old = list(self.active)
        heads = [s for s in new if s.index == 0]
        forks = [s for s in new if s.index > 0]
        for k, s in enumerate(heads + forks):  # new sequences take the slots right after the live ones
            s.slot = len(old) + k
        self.active.extend(heads + forks)      # before the forward: a failed step fails them too
        if self.cfg.prefix_reuse_min_tokens:
            for h in heads:
                self._reuse_prefix(h)
            for f in forks:
                self.kept.pop(f.slot, None)
        prefilled = sum(len(s.request.prompt) - s.cached for s in heads)
        logits = self._forward(old, heads)     # (len(old) + len(heads), V), row i = slot i
        if forks:
            for f in forks:
                head = f.request.seqs[0]
                self.cache.move(head.slot, f.slot, head.cached)
                f.cached = head.cached
            rows = torch.tensor([f.request.seqs[0].slot for f in forks], device=self.device)
            logits = torch.cat((logits, logits.index_select(0, rows)))   # (B, V)
        self._sample_and_emit(old + heads + forks, logits)
        return prefilled

    def _reuse_prefix(self, s: Sequence) -> None:
        """Puts in s's (new) slot the KV of the longest start of its prompt a free slot holds, if it is
        at least prefix_reuse_min_tokens long, and marks it cached. The prompt's last token is always
        prefilled (its logits are needed). Kept slots are exchanged, not overwritten, so what s's slot
        held stays available to the sequences admitted after it."""
        prompt = s.request.prompt
        src, n = max(((slot, _common_prefix(toks, prompt)) for slot, toks in self.kept.items()),
                     key=lambda x: x[1], default=(-1, 0))
        n = min(n, len(prompt) - 1)
        mine = self.kept.pop(s.slot, None)     # the slot is s's now
        if n < self.cfg.prefix_reuse_min_tokens:
            return
        if src != s.slot and mine is None:     # the source keeps its content
            self.cache.move(src, s.slot, n)
        elif src != s.slot:
            self.cache.swap(src, s.slot, n, len(mine))
            self.kept[src] = mine
        s.cached = n

    def _forward(self, old: list[Sequence], heads: list[Sequence]) -> torch.Tensor:
        """The model over slots [0, S), S = len(old) + len(heads): the last token of each live
        sequence, then the uncached prompt of each head -> logits at each one's last token (S, V)."""
        seqs = old + heads
        lens = [1] * len(old) + [len(s.request.prompt) - s.cached for s in heads]
        starts = [s.cached for s in seqs]      # a head's cached: its reused prefix (0 without)
        tokens = torch.tensor([s.out[-1] for s in old] + list(itertools.chain.from_iterable(
            s.request.prompt[s.cached:] for s in heads)), device=self.device)
        if not heads:  # decode fast path: one query per sequence
            lay = StepLayout.build_decode(0, starts, self.device)
            logits = self.model(tokens, lay, self.cache)                   # (S, V)
        else:
            lay = StepLayout.build(0, lens, starts, self.device)
            last = torch.cumsum(torch.tensor(lens, device=self.device), 0) - 1
            logits = self.model(tokens, lay, self.cache, logits_for=last)  # (S, V)
        for s, n in zip(seqs, lens):
            s.cached += n
        return logits

    def _sample_and_emit(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        specs = [s.request.spec for s in seqs]
        f = lambda xs, dt: torch.tensor(xs, dtype=dt, device=self.device)  # noqa: E731
        seeds = [s.seed - (1 << 64) if s.seed >= (1 << 63) else s.seed for s in seqs]
        tok, logp = kernels.sample(
            logits, f([p.temperature for p in specs], torch.float32), f([p.top_k for p in specs], torch.int64),
            f([p.top_p for p in specs], torch.float32), f([p.min_p for p in specs], torch.float32),
            f(seeds, torch.int64), f([len(s.out) for s in seqs], torch.int64))
        for s, t, lp in zip(seqs, tok.tolist(), logp.tolist()):   # the one host sync of the step
            s.out.append(t)
            s.logprobs.append(lp)
            r = s.request
            if r.first_token_at is None:
                r.first_token_at = time.monotonic()
            if r.stream:
                r.events.put(TokenEvent(s.index, t, lp, len(s.out)))
            reason = self._finish_reason(s)
            if reason:
                self._finish(s, reason)

    def _finish_reason(self, s: Sequence) -> str | None:
        spec = s.request.spec
        if s.out[-1] in self.end_ids and not spec.ignore_eos:
            return Finish.EOS
        if spec.stop:
            text = self.decode(s.out)
            hits = [i for i in (text.find(st) for st in spec.stop) if i >= 0]
            if hits:
                s.text_end = min(hits)
                return Finish.STOP
        if len(s.out) >= spec.max_new_tokens:
            return Finish.LENGTH
        if s.cached + 1 >= self.cfg.max_context:
            return Finish.CONTEXT
        return None

    def _finish(self, s: Sequence, reason: str, error: str | None = None) -> None:
        """Frees s's slot at once by moving the last live sequence into it. With prefix reuse the two
        slots' contents are exchanged instead, so s's KV stays, in the slot freed, for a continuation."""
        s.finish = reason
        i = s.slot
        last = self.active.pop()
        keep = self.cfg.prefix_reuse_min_tokens > 0 and error is None
        if last is not s:
            if keep:
                self.cache.swap(i, last.slot, s.cached, last.cached)
            else:
                self.cache.move(last.slot, i, last.cached)
            last.slot = i
            self.active[i] = last
        if keep:
            self.kept[len(self.active)] = (s.request.prompt + s.out)[:s.cached]
        s.slot = -1
        s.request.events.put(DoneEvent(s.index, reason) if error is None else ErrorEvent(s.index, error))


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common start of a and b."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
