"""The Kafka edge: an acknowledged producer and the served-response index.

AckedProducer.send returns only after the broker acknowledged the write (acks=all,
idempotent producer); if Kafka cannot be reached in time it raises Unavailable, so the
gRPC caller gets UNAVAILABLE and never a false OK. A write whose acknowledgement was
lost may still have landed: callers retry with the same event id and the consumer dedupes.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError

log = logging.getLogger(__name__)


class Unavailable(RuntimeError):
    """Kafka did not acknowledge the write in time."""


def _close_quietly(producer, timeout_s: float) -> None:
    try:
        producer.close(timeout=timeout_s)
    except Exception as e:   # a producer whose broker is gone may not flush: nothing acked is in it
        log.info("closing a kafka producer: %s", e)


class SentWrite:
    """A queued write: kafka-python's future and the producer it went through (a failure is
    blamed on that producer only, not on a fresh one that replaced it meanwhile)."""
    __slots__ = ("future", "producer")

    def __init__(self, future, producer):
        self.future, self.producer = future, producer

    def get(self, timeout: float):
        return self.future.get(timeout=timeout)

    def add_callback(self, fn) -> None:
        self.future.add_callback(fn)

    def add_errback(self, fn) -> None:
        self.future.add_errback(fn)


class AckedProducer:
    """Writes that return only once Kafka acknowledged them, and a producer that heals itself.

    After a broker crash an in-flight batch expires and kafka-python (3.0.12) resets its
    idempotent producer id ("ProducerId set to -1") without ever getting a new one: every later
    write on that producer waits out its timeout and fails, for as long as the process lives. So a
    write that fails for an availability reason (a timeout, an expired batch, no broker) marks the
    producer down: it is closed in the background, writes fail at once with Unavailable instead of
    each holding a caller for the timeout, `on_health(False)` is called, and a probe builds a fresh
    producer every `probe_s` until one fetches the topic's metadata; then writes go through it and
    `on_health(True)` is called."""

    def __init__(self, bootstrap: str, timeout_s: float = 5.0, client_id: str = "rlhf", on_health=None,
                 probe_topic: str = "", probe_s: float = 1.0):
        self.bootstrap, self.timeout_s, self.client_id = bootstrap, timeout_s, client_id
        self.on_health, self.probe_topic, self.probe_s = on_health, probe_topic, probe_s
        self._producer = None
        self._lock = threading.Lock()
        self._health_lock = threading.Lock()   # health reports in the order of the state changes
        self._down_since: float | None = None
        self._closed = threading.Event()

    @property
    def healthy(self) -> bool:
        return self._down_since is None

    def _new(self):
        ms = int(self.timeout_s * 1000)
        try:
            return KafkaProducer(
                bootstrap_servers=self.bootstrap, client_id=self.client_id, acks="all",
                enable_idempotence=True, linger_ms=5, batch_size=256 * 1024, max_block_ms=ms, request_timeout_ms=ms,
                delivery_timeout_ms=ms + 2000, retry_backoff_ms=100, reconnect_backoff_max_ms=1000,
                bootstrap_timeout_ms=min(ms, 2000))
        except (KafkaError, OSError) as e:
            raise Unavailable(f"kafka at {self.bootstrap} unreachable: {e}") from e

    def _get(self):
        with self._lock:
            if self._down_since is not None:
                raise Unavailable(f"kafka at {self.bootstrap} is down ({time.monotonic() - self._down_since:.0f}s); "
                                  f"retry later")
            if self._producer is not None:
                return self._producer
        try:   # built outside the lock: it may block for up to 2 s when Kafka is away
            p = self._new()
        except Unavailable as e:
            self._mark_down(str(e))   # Kafka down at startup: NOT_SERVING and the probe, as after a crash
            raise
        with self._lock:
            if self._producer is None and self._down_since is None and not self._closed.is_set():
                self._producer, p = p, None
            current = self._producer
        if p is not None:   # another caller's producer won, or the state changed meanwhile
            threading.Thread(target=_close_quietly, args=(p, 1.0), daemon=True).start()
        if current is None:
            raise Unavailable(f"kafka at {self.bootstrap} is down; retry later")
        return current

    def note_failure(self, e: Exception, producer=None, what: str = "kafka write failed") -> Unavailable:
        """An Unavailable for e; marks the producer down when e says Kafka is unreachable. `producer`
        is the one the failed write went through: a late failure of an older producer (a batch
        expiring after the probe installed a fresh one) must not take the fresh one down."""
        if isinstance(e, Unavailable) or getattr(e, "retriable", False) or \
                isinstance(e, (KafkaTimeoutError, KafkaConnectionError)):
            self._mark_down(f"{what}: {e}", producer)
        return Unavailable(f"{what}: {e}")

    def _report_health(self) -> None:
        if self.on_health:
            with self._health_lock:   # reads the state under the lock: the last report is the current state
                self.on_health(self.healthy)

    def _mark_down(self, why: str, producer=None) -> None:
        with self._lock:
            if producer is not None and producer is not self._producer:
                return   # that producer was already replaced
            old, self._producer = self._producer, None
            first = self._down_since is None and not self._closed.is_set()
            if first:
                self._down_since = time.monotonic()
        if old is not None:   # long enough for its batches to expire, so its sender thread really stops
            threading.Thread(target=_close_quietly, args=(old, self.timeout_s + 3), name="kafka-producer-close",
                             daemon=True).start()
        if first:
            log.warning("kafka producer down (%s); probing every %.1fs", why, self.probe_s)
            threading.Thread(target=self._probe, name="kafka-producer-probe", daemon=True).start()
            self._report_health()

    def _probe(self) -> None:
        while not self._closed.wait(self.probe_s):
            p, ok = None, False
            try:
                p = self._new()
                # a metadata round trip (raises after max_block_ms)
                ok = bool(p.partitions_for(self.probe_topic) if self.probe_topic else p.bootstrap_connected())
            except Exception as e:   # anything: the probe must outlive every failure
                log.debug("kafka probe: %s", e)
            if not ok:
                if p is not None:
                    _close_quietly(p, 1.0)
                continue
            with self._lock:
                if self._closed.is_set():
                    installed = False
                else:
                    down, self._down_since, self._producer, installed = self._down_since, None, p, True
            if not installed:
                _close_quietly(p, 1.0)
                return
            log.warning("kafka producer back after %.1fs (a new producer)", time.monotonic() - (down or 0))
            self._report_health()
            return

    def send_async(self, topic: str, key: bytes | None, value: bytes, headers=None):
        """Queues a write; returns the kafka-python future (get() waits for the ack)."""
        producer = self._get()
        try:
            fut = producer.send(topic, key=key, value=value, headers=headers or [])
        except KafkaError as e:
            raise self.note_failure(e, producer, "kafka send failed") from e
        return SentWrite(fut, producer)

    def wait(self, future):
        try:
            return future.get(timeout=self.timeout_s + 3)
        except KafkaError as e:
            raise self.note_failure(e, future.producer, "kafka did not acknowledge the write") from e

    def send(self, topic: str, key: bytes | None, value: bytes, headers=None):
        """Writes one record and waits for the broker's acknowledgement -> RecordMetadata."""
        return self.wait(self.send_async(topic, key, value, headers))

    def flush(self) -> None:
        """Sends what is buffered, within the timeout; never raises (shutdown with Kafka away)."""
        p = self._producer
        if p is not None:
            try:
                p.flush(timeout=self.timeout_s)
            except Exception as e:
                log.info("kafka flush: %s", e)

    def close(self) -> None:
        """Flushes what it can within the timeout and closes; never raises (a broker that is gone
        must not turn a clean shutdown into a traceback)."""
        self._closed.set()
        with self._lock:
            p, self._producer = self._producer, None
        if p is not None:
            _close_quietly(p, self.timeout_s)


class ResponseIndex:
    """response_id -> Interaction, from the interactions topic (read from the start, no group).

    Lets the feedback service accept feedback that references a served response by id and
    fill in its prompt, text and model version. Bounded: the oldest entries are forgotten."""

    def __init__(self, bootstrap: str, topic: str, parse, max_entries: int = 1_000_000):
        self.bootstrap, self.topic, self.parse, self.max_entries = bootstrap, topic, parse, max_entries
        self._index: OrderedDict[str, object] = OrderedDict()
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="response-index", daemon=True)

    def start(self) -> "ResponseIndex":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout=timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                c = KafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                  auto_offset_reset="earliest", consumer_timeout_ms=500)
                parts = c.partitions_for_topic(self.topic) or set()
                c.assign([TopicPartition(self.topic, p) for p in parts])
                while not self._stop.is_set():
                    for tp, recs in c.poll(timeout_ms=200).items():
                        for r in recs:
                            self._add(r.value)
                c.close()
            except Exception:  # broker away: try again, the index only grows
                log.warning("response index: kafka unavailable, retrying", exc_info=True)
                time.sleep(1.0)

    def _add(self, value: bytes) -> None:
        try:
            rec = self.parse(value)
        except Exception:
            log.warning("response index: unparseable interaction record skipped (the consumer dead-letters it)")
            return
        with self._cv:
            self._index[rec.response_id] = rec
            while len(self._index) > self.max_entries:
                self._index.popitem(last=False)
            self._cv.notify_all()

    def get(self, response_id: str, wait_s: float = 0.0):
        """The Interaction for response_id, waiting up to wait_s for the index to catch up."""
        deadline = time.monotonic() + wait_s
        with self._cv:
            while response_id not in self._index:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cv.wait(left)
            return self._index[response_id]
