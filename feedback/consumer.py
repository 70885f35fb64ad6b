"""The trainer-side consumer: Kafka -> validate -> durable store, then commit offsets.

At-least-once from Kafka, exactly once in the store: a batch is stored (deduped by event
id) before its offsets are committed, so a crash replays at most the last batch and the
replay is absorbed by the dedupe. Records that fail validation go to the dead-letter topic
with the reason (acknowledged before the offsets move), never dropped silently.

    python -m feedback.consumer --db .run/feedback.db --bootstrap 127.0.0.1:19092   (see --help)
"""
from __future__ import annotations

import hashlib
import logging
import signal
import sqlite3
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import (CommitFailedError, IllegalGenerationError, KafkaError, RebalanceInProgressError,
                          UnknownMemberIdError)
from kafka.structs import OffsetAndMetadata

from common.config_cli import parse_config
from common.lifecycle import startup_errors
from common.net import check_ports
from protos.build import ensure_generated

ensure_generated()
from google.protobuf.message import DecodeError  # noqa: E402

from rlhf.v1 import feedback_pb2 as fb  # noqa: E402

from . import metrics, topics, validate  # noqa: E402
from .kafka_io import AckedProducer  # noqa: E402
from .store import FeedbackStore  # noqa: E402

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConsumerConfig:
    """Consume feedback and interactions from Kafka into the trainer's store."""

    db: Path = Path(".run/feedback.db")
    """SQLite file of the store."""
    bootstrap: str = "127.0.0.1:19092"
    """Kafka bootstrap servers."""
    group: str = "rlhf-trainer"
    """Consumer group id (offsets are committed under it)."""
    max_batch: int = 500
    """Records stored per transaction at most."""
    idle_exit_s: float = 0.0
    """Exit once caught up (no lag) for this many seconds (0: run until stopped)."""
    instance_id: str = ""
    """Static group membership (KIP-345): a consumer restarted with the same id takes its partitions back
    at once instead of waiting for the old member's session to expire ("": derived from --group and --db,
    which stay the same across restarts of one consumer). Consumers of one group that share one --db
    need distinct ids: a second member with the same id fences the first."""
    session_timeout_s: float = 10.0
    """How long the group waits for a member that stopped heartbeating (a crashed one that does not come
    back) before giving its partitions to the others."""
    metrics_port: int = 0
    """Prometheus /metrics port (0 disables)."""

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        check_ports(metrics_port=self.metrics_port)
        if not 6 <= self.session_timeout_s <= 300:
            raise ValueError("session_timeout_s must be in [6, 300] (the broker's group.min/max.session.timeout.ms)")

    def member_id(self) -> str:
        return self.instance_id or f"{self.group}-{hashlib.sha256(str(Path(self.db).resolve()).encode()).hexdigest()[:12]}"


def check_record(topic: str, value: bytes) -> tuple[str, tuple]:
    """Parses and validates one record -> ("feedback"|"interaction", row fields); raises Invalid."""
    try:
        if topic == topics.FEEDBACK:
            rec = fb.FeedbackRecord.FromString(value)
        else:
            rec = fb.Interaction.FromString(value)
    except DecodeError as e:
        raise validate.Invalid(f"not a protobuf record: {e}") from e
    if topic == topics.FEEDBACK:
        if not rec.HasField("feedback"):
            raise validate.Invalid("feedback: missing")
        validate.check(rec.feedback, validate.Limits(), resolved=True)
        if rec.event_id != validate.event_id(rec.feedback):
            raise validate.Invalid("event_id: record and feedback disagree")
        return "feedback", (rec.event_id, rec.feedback.WhichOneof("kind"))
    if not rec.response_id or not rec.model_version:
        raise validate.Invalid("interaction: response_id and model_version are required")
    return "interaction", (rec.response_id, rec.model_version)


DEAD_LETTER_VALUE_MAX = 256 * 1024
"""Bytes of a bad record kept in its dead letter: a record near the broker's message limit (1 MB) would
make a dead letter over it, which Kafka refuses, and the partition would stop at that record."""


def dead_letter(r, reason: str) -> fb.DeadLetter:
    """The dead letter of a consumed record `r`: its reason, where it was, and its value (the start of it,
    with its length and sha256 in the reason, when it is longer than DEAD_LETTER_VALUE_MAX)."""
    value = r.value or b""
    if len(value) > DEAD_LETTER_VALUE_MAX:
        reason += f" (value of {len(value)} bytes, sha256 {hashlib.sha256(value).hexdigest()}, cut to {DEAD_LETTER_VALUE_MAX})"
        value = value[:DEAD_LETTER_VALUE_MAX]
    return fb.DeadLetter(reason=reason, source_topic=r.topic, source_partition=r.partition, source_offset=r.offset,
                         value=value, dead_unix_ms=int(time.time() * 1000))


class FeedbackConsumer:
    """commit_each_batch=False is the trainer's mode: offsets move only when it calls
    commit_offsets (after publishing a version trained on them). manual_assign takes every
    partition directly (one trainer, no group rebalance: a restart after kill -9 resumes at once
    from the committed offsets instead of waiting out the old member's session)."""

    def __init__(self, cfg: ConsumerConfig, commit_each_batch: bool = True, manual_assign: bool = False):
        self.cfg, self.commit_each_batch = cfg, commit_each_batch
        self.store = FeedbackStore(cfg.db)
        self.dlq = AckedProducer(cfg.bootstrap, client_id="feedback-consumer-dlq")
        kw = dict(bootstrap_servers=cfg.bootstrap, group_id=cfg.group, enable_auto_commit=False,
                  auto_offset_reset="earliest", max_poll_records=cfg.max_batch, fetch_min_bytes=64 * 1024,
                  fetch_max_wait_ms=50)
        if manual_assign:
            self.consumer = KafkaConsumer(**kw)
            self.consumer.assign(self._all_partitions())
        else:
            ms = int(cfg.session_timeout_s * 1000)
            self.consumer = KafkaConsumer(topics.FEEDBACK, topics.INTERACTIONS, group_instance_id=cfg.member_id(),
                                          session_timeout_ms=ms, heartbeat_interval_ms=max(1000, ms // 3), **kw)
            # the topics' partitions known before the first join: kafka-python 3.0.12 joins without waiting for
            # metadata, so the group leader assigned nothing and the group rebalanced again at once; in 3 of
            # about 17 runs of tests/test_kafka_cluster.py that second round left a member without partitions
            # for over 30 s
            self._all_partitions()
        self.stored = 0

    def _all_partitions(self, timeout_s: float = 30.0) -> list:
        deadline = time.monotonic() + timeout_s
        parts = []
        for t in (topics.FEEDBACK, topics.INTERACTIONS):
            while not (ps := self.consumer.partitions_for_topic(t)):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no partitions known for topic {t}")
                time.sleep(0.2)
            parts += [TopicPartition(t, p) for p in sorted(ps)]
        return parts

    def positions(self) -> dict[str, int]:
        """{"topic:partition": next offset to read} over the assigned partitions."""
        return {f"{tp.topic}:{tp.partition}": self.consumer.position(tp) for tp in self.consumer.assignment()}

    def committed(self) -> dict[str, int]:
        out = {}
        for tp in self.consumer.assignment():
            c = self.consumer.committed(tp)
            out[f"{tp.topic}:{tp.partition}"] = -1 if c is None else c
        return out

    def commit_offsets(self, offsets: dict[str, int]) -> None:
        self.consumer.commit({TopicPartition(k.rsplit(":", 1)[0], int(k.rsplit(":", 1)[1])):
                              OffsetAndMetadata(v, "", -1) for k, v in offsets.items()})

    def seek_to(self, offsets: dict[str, int]) -> None:
        for k, v in offsets.items():
            self.consumer.seek(TopicPartition(k.rsplit(":", 1)[0], int(k.rsplit(":", 1)[1])), v)

    def poll_once(self, timeout_ms: int = 500) -> int:
        """One batch: store it, dead-letter what is bad, then commit offsets. Returns records seen.
        If anything fails on the way (a dead letter Kafka refuses, the store), the read position goes
        back to the batch's start before the error is raised: a caller that goes on reads it again
        instead of moving past records that were never stored."""
        batch = self.consumer.poll(timeout_ms=timeout_ms, max_records=self.cfg.max_batch)
        if not batch:
            return 0
        try:
            return self._handle(batch)
        except BaseException:
            for tp, recs in batch.items():
                if recs:
                    self.consumer.seek(tp, recs[0].offset)
            raise

    def _handle(self, batch: dict) -> int:
        fb_rows, int_rows, dead = [], [], []
        for tp, recs in batch.items():
            for r in recs:
                try:
                    kind, fields = check_record(tp.topic, r.value or b"")
                except validate.Invalid as e:
                    dead.append((r, str(e)))
                    continue
                row = (*fields, r.value, tp.topic, tp.partition, r.offset)
                (fb_rows if kind == "feedback" else int_rows).append(row)
        futures = [self.dlq.send_async(topics.DEAD_LETTERS, r.key, dead_letter(r, reason).SerializeToString(),
                                       headers=[("reason", reason.encode()[:1000])]) for r, reason in dead]
        reasons: dict[str, int] = {}
        for f, (_, reason) in zip(futures, dead):
            self.dlq.wait(f)   # acknowledged before the offsets move past it
            metrics.DEAD_LETTERS.labels(reason.split(":")[0][:40]).inc()
            reasons[reason] = reasons.get(reason, 0) + 1
        if reasons:   # one line per batch: a flood of bad records must not turn into a flood of log lines
            top = sorted(reasons.items(), key=lambda kv: -kv[1])[:3]
            log.warning("dead-lettered %d records (%s)", len(dead), "; ".join(f"{n} x {r}" for r, n in top))
        new, dup = self.store.commit_batch(fb_rows, int_rows)
        if self.commit_each_batch:   # exactly what was stored: past each partition's last record in this batch
            self._commit({tp: recs[-1].offset + 1 for tp, recs in batch.items() if recs})
        self.stored += new
        metrics.CONSUMED.labels(topics.FEEDBACK).inc(new)
        metrics.CONSUMED.labels(topics.INTERACTIONS).inc(len(int_rows))
        metrics.DUPLICATES.inc(dup)
        return sum(len(v) for v in batch.values())

    def _commit(self, next_offsets: dict) -> None:
        """Commits {TopicPartition: next offset to read}, only after the store's transaction is durable.
        A commit the group refuses (it rebalanced and the partitions went to another member, or a
        restarted broker forgot this member: UnknownMemberId) is not fatal: the batch is stored, so the
        records after the last committed offset come again, to whichever member holds the partition
        now, and the store skips them by event id (DUPLICATES counts them). kafka-python raises
        RebalanceInProgressError, not CommitFailedError, when it already knows a rebalance has begun (a
        member joined or left): the same case, and it used to end the consumer."""
        try:
            self.consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in next_offsets.items()})
        except (CommitFailedError, RebalanceInProgressError, IllegalGenerationError, UnknownMemberIdError) as e:
            log.warning("offset commit refused by the group (%s); the batch is stored, it will be delivered "
                        "again and deduplicated", type(e).__name__)

    def lag(self) -> int | None:
        """Records behind the end over the assigned partitions (None before an assignment)."""
        parts = self.consumer.assignment()
        if not parts:
            return None
        ends = self.consumer.end_offsets(list(parts))
        total = 0
        for tp in parts:
            behind = max(0, ends[tp] - self.consumer.position(tp))
            metrics.CONSUMER_LAG.labels(tp.topic).set(behind)
            total += behind
        return total

    def close(self) -> None:
        self.consumer.close(autocommit=False)
        self.dlq.close()
        self.store.close()


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ConsumerConfig, argv, prog="python -m feedback.consumer")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # a metrics port in use, Kafka out of reach, a --db that is no SQLite file: one line, exit 1
    with startup_errors("python -m feedback.consumer", also=(KafkaError, sqlite3.DatabaseError)):
        metrics.serve_metrics(cfg.metrics_port)
        topics.ensure_topics(cfg.bootstrap)
        c = FeedbackConsumer(cfg)
    stop = {"flag": False}
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.update(flag=True))
    print(f"consumer group {cfg.group} -> {cfg.db} (already stored: {c.store.count()})", flush=True)
    caught_up_since, last_report, announced = None, time.monotonic(), False
    while not stop["flag"]:
        c.poll_once()
        if not announced and c.consumer.assignment():
            announced = True
            print(f"assigned {len(c.consumer.assignment())} partitions", flush=True)
        if time.monotonic() - last_report > 5:
            print(f"stored {c.store.count()} feedback events, {c.store.count('interactions')} interactions, "
                  f"lag {c.lag()}", flush=True)
            last_report = time.monotonic()
        if cfg.idle_exit_s:
            if c.lag() == 0:
                caught_up_since = caught_up_since or time.monotonic()
                if time.monotonic() - caught_up_since > cfg.idle_exit_s:
                    break
            else:
                caught_up_since = None
    print(f"stopping: {c.store.count()} feedback events stored", flush=True)
    c.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
