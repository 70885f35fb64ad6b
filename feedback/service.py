"""The feedback gRPC service (rlhf.v1.FeedbackService): validate, resolve served responses,
write to Kafka with acks=all, and answer OK only after the broker acknowledged.

    python -m feedback.service --bootstrap 127.0.0.1:19092 --port 50061   (see --help)
"""
from __future__ import annotations

import contextvars
import logging
import queue
import signal
import threading
import time
import uuid
from concurrent import futures
from dataclasses import dataclass

import grpc

from common import auth
from common.auth_options import AuthOptions
from common.config_cli import parse_config
from common.lifecycle import ShutdownDeadline, exit_now, startup_errors, stop_server
from common.net import check_ports
from protos.build import ensure_generated

ensure_generated()
from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # noqa: E402
from grpc_reflection.v1alpha import reflection  # noqa: E402

from rlhf.v1 import feedback_pb2 as fb  # noqa: E402
from rlhf.v1 import feedback_pb2_grpc as fb_grpc  # noqa: E402

from . import metrics, topics, validate  # noqa: E402
from .kafka_io import AckedProducer, ResponseIndex, Unavailable  # noqa: E402

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeedbackConfig(AuthOptions):
    """Accept comparisons, rankings and ratings over gRPC and write them to Kafka."""

    bootstrap: str = "127.0.0.1:19092"
    """Kafka bootstrap servers."""
    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = 50061
    """gRPC port (0 picks a free one; the chosen port is printed)."""
    metrics_port: int = 9102
    """Prometheus /metrics port (0 disables)."""
    kafka_timeout_s: float = 5.0
    """How long to wait for Kafka's acknowledgement before answering UNAVAILABLE."""
    response_lookup_wait_s: float = 2.0
    """How long one call may wait, in all, for the response ids it references to appear in the
    interactions log (bounded by the caller's deadline too)."""
    max_lookup_waits: int = 16
    """Unknown response ids one call may wait for; the ones after it are answered at once."""
    lookup_slots: int = 0
    """Calls that may wait for unknown response ids at the same time (0: a quarter of --workers):
    the other workers stay free for everything else, however many bad ids arrive."""
    max_text_chars: int = 32_000
    """Longest prompt or response text accepted."""
    max_message_bytes: int = 4 * 1024 * 1024
    """Largest gRPC message accepted."""
    workers: int = 32
    """gRPC handler threads."""
    max_batch_items: int = 10_000
    """Items in one SubmitBatch call at most."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kafka_timeout_s <= 0 or self.response_lookup_wait_s < 0:
            raise ValueError("timeouts must be positive")
        if self.max_text_chars < 1 or self.workers < 1 or self.max_lookup_waits < 0 or self.lookup_slots < 0:
            raise ValueError("max_text_chars and workers must be >= 1; max_lookup_waits and lookup_slots >= 0")
        if self.max_message_bytes < 1024 or self.max_batch_items < 1:
            raise ValueError("max_message_bytes must be >= 1024, max_batch_items >= 1")
        check_ports(port=self.port, metrics_port=self.metrics_port)


class LookupBudget:
    """One call's allowance for waiting on response ids not yet in the interactions index: a
    single deadline for the whole call (the configured wait, or the caller's deadline if sooner)
    and a count of waits. A call waits only while holding one of the service's lookup slots, so
    calls full of unknown ids can hold a few workers at most, never all of them."""

    def __init__(self, wait_s: float, time_remaining: float | None, max_waits: int, slots: threading.Semaphore):
        margin = 0.2   # to answer before the caller's deadline passes
        left = wait_s if time_remaining is None else min(wait_s, max(0.0, time_remaining - margin))
        self.deadline, self.waits_left, self.slots = time.monotonic() + left, max_waits, slots

    def lookup(self, index, response_id: str):
        """The Interaction, waiting within the budget if it is not indexed yet (None if unknown;
        Unavailable when it would wait but every lookup slot is taken)."""
        found = index.get(response_id, wait_s=0.0)
        left = self.deadline - time.monotonic()
        if found is not None or left <= 0 or self.waits_left <= 0:
            return found
        self.waits_left -= 1
        if not self.slots.acquire(blocking=False):   # the id may be fine: a retryable answer, not INVALID_ARGUMENT
            metrics.REJECTED.labels("lookup_busy").inc()
            raise Unavailable(f"response id {response_id!r} is not indexed yet and every lookup slot is busy; "
                              f"retry shortly")
        try:
            return index.get(response_id, wait_s=left)
        finally:
            self.slots.release()


class FeedbackServicer(fb_grpc.FeedbackServiceServicer):
    def __init__(self, cfg: FeedbackConfig, producer: AckedProducer, index: ResponseIndex):
        self.cfg, self.producer, self.index = cfg, producer, index
        self.limits = validate.Limits(max_text_chars=cfg.max_text_chars)
        self.lookup_slots = threading.Semaphore(cfg.lookup_slots or max(1, cfg.workers // 4))

    def _budget(self, context) -> LookupBudget:
        return LookupBudget(self.cfg.response_lookup_wait_s, context.time_remaining(), self.cfg.max_lookup_waits,
                            self.lookup_slots)

    def _resolve(self, f: fb.Feedback, budget: LookupBudget) -> None:
        """Fills text, model version and finish reason of responses given by id, and the prompt from what
        they were served for (the text the policy saw, as their texts are what it wrote); unknown ids, and
        responses given by id that were served for different prompts, are bad input."""
        served_for: set[str] = set()
        for name, r in validate.responses(f):
            if not r.response_id:
                if not r.model_version:
                    raise validate.Invalid(f"{name}.model_version: missing (needed when no response_id is given)")
                continue
            inter = budget.lookup(self.index, r.response_id)
            if inter is None:
                raise validate.Invalid(f"{name}.response_id: unknown response id {r.response_id!r}")
            if r.text and r.text != inter.response:
                raise validate.Invalid(f"{name}.text: differs from the served response {r.response_id!r}")
            r.text, r.model_version, r.finish_reason = inter.response, inter.model_version, inter.finish_reason
            served_for.add(inter.prompt)
        if len(served_for) > 1:
            raise validate.Invalid(f"{f.WhichOneof('kind')}: its responses were served for different prompts")
        if served_for:
            kind = f.WhichOneof("kind")
            getattr(f, kind).prompt = prompt = served_for.pop()
            validate.check_text(f"{kind}.prompt", prompt, self.limits)   # as the consumer will check it

    def _prepare(self, f: fb.Feedback, budget: LookupBudget) -> tuple[str, str, bytes]:
        """Validates and resolves one piece of feedback -> (kind, event_id, record bytes); raises Invalid."""
        validate.check(f, self.limits, resolved=False)
        self._resolve(f, budget)
        kind = f.WhichOneof("kind")
        msg = getattr(f, kind)
        if not msg.event_id:
            msg.event_id = uuid.uuid4().hex
        now_ms = int(time.time() * 1000)
        if not msg.created_unix_ms:
            msg.created_unix_ms = now_ms
        # no second full check: _resolve leaves every response with its text and model version (the
        # consumer checks resolved records again and dead-letters anything that slipped through)
        rec = fb.FeedbackRecord(event_id=msg.event_id, received_unix_ms=now_ms, feedback=f)
        return kind, msg.event_id, rec.SerializeToString()

    def _acked(self, f: fb.Feedback, kind: str, event_id: str, md, t0: float, count: bool = True) -> fb.SubmitResult:
        if count:
            metrics.PRODUCE_LATENCY.observe(time.perf_counter() - t0)
            metrics.EVENTS.labels(kind, _source_label(getattr(f, kind).source.kind)).inc()
        return fb.SubmitResult(event_id=event_id, code=0, partition=md.partition, offset=md.offset)

    def _unary(self, f: fb.Feedback, context):
        """The same path as the batch RPCs; a failed item becomes the call's status."""
        r = self._resolve_pending(self._send_one(f, self._budget(context)))
        if r.code:
            context.abort(_STATUS_BY_CODE[r.code], r.message)
        return r

    def SubmitComparison(self, request, context):
        return self._unary(fb.Feedback(comparison=request), context)

    def SubmitRanking(self, request, context):
        return self._unary(fb.Feedback(ranking=request), context)

    def SubmitRating(self, request, context):
        return self._unary(fb.Feedback(rating=request), context)

    @staticmethod
    def _failed(event_id: str, code: grpc.StatusCode, e: Exception) -> fb.SubmitResult:
        metrics.REJECTED.labels("invalid" if code == grpc.StatusCode.INVALID_ARGUMENT else "unavailable").inc()
        return fb.SubmitResult(event_id=event_id, code=code.value[0], message=str(e))

    def _send_one(self, f: fb.Feedback, budget: LookupBudget):
        """Validates and queues one item -> a finished SubmitResult (bad input, Kafka down) or a
        pending (f, kind, event_id, future, t0) to be resolved by _resolve_pending."""
        eid = validate.event_id(f)
        try:
            _check_role(f)
        except PermissionError as e:
            metrics.REJECTED.labels("permission").inc()
            return fb.SubmitResult(event_id=eid, code=grpc.StatusCode.PERMISSION_DENIED.value[0], message=str(e))
        try:
            kind, eid, value = self._prepare(f, budget)
            t0 = time.perf_counter()
            return (f, kind, eid, self.producer.send_async(topics.FEEDBACK, eid.encode(), value), t0)
        except validate.Invalid as e:
            return self._failed(eid, grpc.StatusCode.INVALID_ARGUMENT, e)
        except Unavailable as e:
            return self._failed(eid, grpc.StatusCode.UNAVAILABLE, e)

    def _resolve_pending(self, item, count: bool = True) -> fb.SubmitResult:
        """Waits for Kafka's acknowledgement of a pending item (finished results pass through)."""
        if isinstance(item, fb.SubmitResult):
            return item
        f, kind, eid, fut, t0 = item
        try:
            return self._acked(f, kind, eid, self.producer.wait(fut), t0, count)
        except Unavailable as e:
            return self._failed(eid, grpc.StatusCode.UNAVAILABLE, e)

    def SubmitBatch(self, request, context):
        if len(request.items) > self.cfg.max_batch_items:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"items: {len(request.items)} in one batch, at most {self.cfg.max_batch_items}")
        t0 = time.perf_counter()
        budget = self._budget(context)
        pending = [self._send_one(f, budget) for f in request.items]   # all queued before any wait: Kafka batches them
        results = [self._resolve_pending(p, count=False) for p in pending]
        # metrics once per batch: per-item label lookups cost as much as the validation
        counts: dict[tuple[str, str], int] = {}
        for p, r in zip(pending, results):
            if r.code == 0:
                key = (p[1], _source_label(getattr(p[0], p[1]).source.kind))
                counts[key] = counts.get(key, 0) + 1
        for (kind, src), n in counts.items():
            metrics.EVENTS.labels(kind, src).inc(n)
        if counts:
            metrics.PRODUCE_LATENCY.observe(time.perf_counter() - t0)
        return fb.SubmitResults(results=results)

    def SubmitMany(self, request_iterator, context):
        """Pipelined: a reader thread validates and sends each item as it arrives, while this
        generator yields results in order as Kafka acknowledges them (bounded window in flight)."""
        window: "queue.Queue" = queue.Queue(maxsize=2048)

        def read() -> None:
            try:
                for f in request_iterator:   # a budget per item: a long stream's late items get their wait too
                    window.put(self._send_one(f, self._budget(context)))
            except Exception as e:  # the client went away mid-stream
                log.info("SubmitMany reader ended: %s", e)
            finally:
                window.put(None)

        ctx = contextvars.copy_context()   # the caller's role (common.auth) travels with the reader
        threading.Thread(target=ctx.run, args=(read,), name="submit-many-reader", daemon=True).start()
        while (item := window.get()) is not None:
            yield self._resolve_pending(item)


_STATUS_BY_CODE = {c.value[0]: c for c in grpc.StatusCode}
_ROLE_SOURCES = {"client": fb.SOURCE_KIND_USER, "labeler": fb.SOURCE_KIND_LABELER}


def _check_role(f: fb.Feedback) -> None:
    """With auth on, a client token submits user feedback and a labeler token labeler feedback."""
    role = auth.current_role()
    if role is None or role == "admin":
        return
    kind = f.WhichOneof("kind")
    if kind is None:
        return
    src = getattr(f, kind).source.kind
    if src not in _SOURCE_LABELS:
        return   # not a defined kind at all: validation answers INVALID_ARGUMENT naming the field
    if src != _ROLE_SOURCES[role]:
        raise PermissionError(f"role {role} may not submit {_SOURCE_LABELS[src]} feedback")
    if (role, kind) == ("client", "ranking"):
        raise PermissionError(f"role {role} may not submit a {kind}")
_SOURCE_LABELS = {v: fb.SourceKind.Name(v).removeprefix("SOURCE_KIND_").lower() for v in fb.SourceKind.values()}


def _source_label(kind: int) -> str:
    return _SOURCE_LABELS.get(kind, "unknown")


def parse_interaction(value: bytes) -> fb.Interaction:
    return fb.Interaction.FromString(value)


def serve(cfg: FeedbackConfig):
    """Starts the service; returns (server, port, producer, index). The port is bound first: one that is
    taken fails the start at once, not after the Kafka clients' first attempts (~30 s with Kafka down)."""
    opts = [("grpc.max_receive_message_length", cfg.max_message_bytes), *auth.EXCLUSIVE_PORT]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.workers), options=opts,
                         interceptors=auth.interceptors(cfg.auth_tokens))
    port = auth.bind(server, f"{cfg.host}:{cfg.port}", cfg.tls_cert, cfg.tls_key)
    try:
        topics.ensure_topics(cfg.bootstrap)
    except Exception as e:  # the service still starts: submissions answer UNAVAILABLE until Kafka is back
        log.warning("could not create topics at %s: %s", cfg.bootstrap, e)
    hs = health.HealthServicer()

    def on_health(up: bool) -> None:   # NOT_SERVING while Kafka is down: balancers send calls elsewhere
        status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", "rlhf.v1.FeedbackService"):
            hs.set(service, status)
    producer = AckedProducer(cfg.bootstrap, cfg.kafka_timeout_s, client_id="feedback-service", on_health=on_health,
                             probe_topic=topics.FEEDBACK)
    index = ResponseIndex(cfg.bootstrap, topics.INTERACTIONS, parse_interaction).start()
    fb_grpc.add_FeedbackServiceServicer_to_server(FeedbackServicer(cfg, producer, index), server)
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    reflection.enable_server_reflection(("rlhf.v1.FeedbackService", health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    server.start()
    on_health(producer.healthy)
    return server, port, producer, index


SHUTDOWN_DEADLINE_S = 9.0
"""SIGTERM to exit at most: gRPC's grace 5 s + 3 s margin, then closing the producer and the index."""


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(FeedbackConfig, argv, prog="python -m feedback.service")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with startup_errors("python -m feedback.service"):   # a port in use, a token file that does not parse
        metrics.serve_metrics(cfg.metrics_port, cfg.host)
        server, port, producer, index = serve(cfg)
    print(f"feedback service listening on {cfg.host}:{port} kafka={cfg.bootstrap}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    # every submission answered OK is already in Kafka (acks=all): past the deadline nothing is lost by exiting
    deadline = ShutdownDeadline(SHUTDOWN_DEADLINE_S)
    t0 = time.monotonic()
    deadline.step("gRPC stop")
    stopped = stop_server(server, grace=5)
    t1 = time.monotonic()
    deadline.step("producer close")
    producer.close()
    t2 = time.monotonic()
    deadline.step("response index stop")
    index.stop(timeout=2.0)   # a reader of the interactions topic: nothing of it to keep
    log.info("stopped: gRPC %.1fs, producer %.1fs, response index %.1fs", t1 - t0, t2 - t1, time.monotonic() - t2)
    deadline.step("interpreter exit")
    if not stopped:
        exit_now(0)


if __name__ == "__main__":
    main()
