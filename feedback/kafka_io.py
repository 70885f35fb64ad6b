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

log = logging.getLogger(__name__)


class Unavailable(RuntimeError):
    """Kafka did not acknowledge the write in time."""


class AckedProducer:
    def __init__(self, bootstrap: str, timeout_s: float = 5.0, client_id: str = "rlhf"):
        self.bootstrap, self.timeout_s, self.client_id = bootstrap, timeout_s, client_id
        self._producer = None
        self._lock = threading.Lock()

    def _get(self):
        from kafka import KafkaProducer
        from kafka.errors import KafkaError

        with self._lock:
            if self._producer is None:
                ms = int(self.timeout_s * 1000)
                try:
                    self._producer = KafkaProducer(
                        bootstrap_servers=self.bootstrap, client_id=self.client_id, acks="all",
                        enable_idempotence=True, linger_ms=5, batch_size=256 * 1024, max_block_ms=ms, request_timeout_ms=ms,
                        delivery_timeout_ms=ms + 2000, retry_backoff_ms=100, reconnect_backoff_max_ms=1000)
                except (KafkaError, OSError) as e:
                    raise Unavailable(f"kafka at {self.bootstrap} unreachable: {e}") from e
            return self._producer

    def send_async(self, topic: str, key: bytes | None, value: bytes, headers=None):
        """Queues a write; returns the kafka-python future (get() waits for the ack)."""
        from kafka.errors import KafkaError
        try:
            return self._get().send(topic, key=key, value=value, headers=headers or [])
        except KafkaError as e:
            raise Unavailable(f"kafka send failed: {e}") from e

    def wait(self, future):
        from kafka.errors import KafkaError
        try:
            return future.get(timeout=self.timeout_s + 3)
        except KafkaError as e:
            raise Unavailable(f"kafka did not acknowledge the write: {e}") from e

    def send(self, topic: str, key: bytes | None, value: bytes, headers=None):
        """Writes one record and waits for the broker's acknowledgement -> RecordMetadata."""
        return self.wait(self.send_async(topic, key, value, headers))

    def flush(self) -> None:
        if self._producer is not None:
            self._producer.flush(timeout=self.timeout_s)

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=self.timeout_s)
            self._producer = None


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

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        from kafka import KafkaConsumer, TopicPartition
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
