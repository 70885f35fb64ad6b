"""A broker crash under steady feedback: the scenario behind tests/test_faults.py and bench/faults.py.

Steady SubmitComparison calls (each with its own event id) go to a running feedback service; the
broker is killed with SIGKILL, restarted on the same data dir after `down_s`, and the calls go on
until the service has answered OK again for `after_s`. Then every record in the feedback topic is
read back. Reported: acked (calls answered OK), stored (of those, found in the topic), false_ok
(acked but not stored), duplicates (acked ids found more than once), codes (answers by status),
seconds_to_recover (from the broker answering again to the service's first OK after it),
not_serving_seen (the service's health went NOT_SERVING while the broker was down).
"""
from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections import Counter

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kafka import KafkaConsumer, TopicPartition

from rlhf.v1 import feedback_pb2 as fb
from rlhf.v1 import feedback_pb2_grpc as fb_grpc

from feedback.broker import read_pid
from feedback.broker import start as start_broker
from feedback.topics import FEEDBACK


def _comparison(i: int) -> fb.Comparison:
    return fb.Comparison(event_id=f"fault-{uuid.uuid4().hex}", source=fb.Source(kind=fb.SOURCE_KIND_LABELER, id="l1"),
                         prompt=f"prompt {i}", a=fb.Response(text=f"a {i}", model_version="v0000"),
                         b=fb.Response(text=f"b {i}", model_version="v0000"), preferred=fb.Comparison.CHOICE_A)


def topic_event_ids(bootstrap: str, topic: str) -> Counter:
    """How many times each event id is in the topic (read from the start)."""
    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, consumer_timeout_ms=5000)
    parts = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or [])]
    c.assign(parts)
    c.seek_to_beginning(*parts)
    out: Counter = Counter()
    for r in c:
        out[fb.FeedbackRecord.FromString(r.value).event_id] += 1
    c.close()
    return out


def run(broker_cfg, service_target: str, steady_s: float = 3.0, down_s: float = 5.0, after_s: float = 3.0,
        interval_s: float = 0.05, timeout_s: float = 120.0) -> dict:
    ch = grpc.insecure_channel(service_target)
    stub, health = fb_grpc.FeedbackServiceStub(ch), health_pb2_grpc.HealthStub(ch)
    answers: list[tuple[float, str, str]] = []   # (time, event id, status)
    stop = threading.Event()

    def load() -> None:
        i = 0
        while not stop.is_set():
            c = _comparison(i)
            try:
                stub.SubmitComparison(c, timeout=10)
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
            answers.append((time.monotonic(), c.event_id, code))
            i += 1
            stop.wait(interval_s)

    not_serving = threading.Event()

    def watch_health() -> None:
        while not stop.is_set():
            try:
                st = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                if st == health_pb2.HealthCheckResponse.NOT_SERVING:
                    not_serving.set()
            except grpc.RpcError:
                pass
            stop.wait(0.2)

    threads = [threading.Thread(target=load, daemon=True), threading.Thread(target=watch_health, daemon=True)]
    for t in threads:
        t.start()
    try:
        time.sleep(steady_s)
        os.kill(read_pid(broker_cfg), signal.SIGKILL)
        killed_at = time.monotonic()
        time.sleep(down_s)
        start_broker(broker_cfg)   # the same data dir: a restart, not a new cluster
        back_at = time.monotonic()
        deadline = back_at + timeout_s
        while time.monotonic() < deadline and not any(t > back_at and c == "OK" for t, _, c in answers):
            time.sleep(0.1)
        time.sleep(after_s)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)
        ch.close()
    first_ok = next((t for t, _, c in answers if t > back_at and c == "OK"), None)
    acked = {e for _, e, c in answers if c == "OK"}
    in_topic = topic_event_ids(broker_cfg.bootstrap, FEEDBACK)
    return {"calls": len(answers), "codes": dict(Counter(c for _, _, c in answers)), "acked": len(acked),
            "stored": sum(1 for e in acked if in_topic[e] >= 1), "false_ok": sum(1 for e in acked if in_topic[e] == 0),
            "duplicates": sum(1 for e in acked if in_topic[e] > 1),
            "seconds_to_recover": None if first_ok is None else round(first_ok - back_at, 2),
            "seconds_broker_down": round(back_at - killed_at, 2), "not_serving_seen": not_serving.is_set()}
