"""Sustained feedback ingestion end to end: gRPC SubmitBatch (or SubmitMany) -> feedback service -> Kafka ->
consumer -> SQLite store, with p50/p99 latency (submit to stored) and losses, next to the raw
kafka-python producer (acks=all, idempotent) writing the same records to the same broker in
the same run. Starts its own broker (or --brokers N cluster) on free ports, with --partitions per
data topic. Last line: one JSON object.

    python bench/feedback_ingest.py [--quick] [--events N] [--streams S] [--partitions P] [--brokers N]
"""
from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protos.build import ensure_generated  # noqa: E402

ensure_generated()
import grpc  # noqa: E402
from kafka import KafkaConsumer, KafkaProducer, TopicPartition  # noqa: E402

from common.child_process import ChildProcess  # noqa: E402
from feedback import topics  # noqa: E402
from feedback.broker import BrokerConfig, start, stop  # noqa: E402
from rlhf.v1 import feedback_pb2 as fb  # noqa: E402
from rlhf.v1 import feedback_pb2_grpc as fb_grpc  # noqa: E402
from tests.helpers import start_feedback_service  # noqa: E402


def make_events(n: int, run: str) -> list[fb.Feedback]:
    src = fb.Source(kind=fb.SOURCE_KIND_LABELER, id="bench")
    return [fb.Feedback(comparison=fb.Comparison(
        event_id=f"{run}-{i}", source=src, prompt=f"Human: question {i}\n\nAssistant:",
        a=fb.Response(text=f"first answer to {i}", model_version="v0"),
        b=fb.Response(text=f"second answer to {i}", model_version="v0"),
        preferred=fb.Comparison.CHOICE_A)) for i in range(n)]


RAW_TOPIC = "bench.raw-producer"   # same partitions as the feedback topic; kept out of the consumer's way


def raw_producer(bootstrap: str, values: list[bytes], partitions: int) -> float:
    topics.ensure_topics(bootstrap, {RAW_TOPIC: partitions})
    p = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=2)
    t0 = time.perf_counter()
    futs = [p.send(RAW_TOPIC, key=str(i).encode(), value=v) for i, v in enumerate(values)]
    p.flush()
    for f in futs:
        f.get(timeout=60)
    dt = time.perf_counter() - t0
    p.close()
    return len(values) / dt


def dead_lettered(bootstrap: str) -> int:
    """Records in the dead-letter topic (the bench sends only valid events: should be 0)."""
    c = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        parts = [TopicPartition(topics.DEAD_LETTERS, p) for p in c.partitions_for_topic(topics.DEAD_LETTERS) or ()]
        return sum(c.end_offsets(parts).values()) if parts else 0
    finally:
        c.close()


def stored_times(db: Path, run: str) -> dict[str, int]:
    con = sqlite3.connect(db)
    try:
        return dict(con.execute("SELECT event_id, stored_unix_ms FROM feedback WHERE event_id LIKE ?", (f"{run}-%",)))
    except sqlite3.OperationalError:
        return {}
    finally:
        con.close()


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="5,000 events (under a minute)")
    ap.add_argument("--events", type=int, default=0, help="events end to end (default 40,000; quick 5,000)")
    ap.add_argument("--streams", type=int, default=4, help="concurrent clients")
    ap.add_argument("--batch", type=int, default=200, help="items per SubmitBatch call (0: one SubmitMany stream each)")
    ap.add_argument("--partitions", type=int, default=topics.ALL[topics.FEEDBACK],
                    help="partitions of the feedback and interactions topics")
    ap.add_argument("--brokers", type=int, default=1, help="Kafka nodes (replication min(3, N), 2 in sync from 3)")
    a = ap.parse_args()
    a.events = a.events or (5000 if a.quick else 40000)
    return a


def start_broker(data_dir: Path, brokers: int) -> BrokerConfig:
    heap = BrokerConfig.heap if brokers == 1 else "256m"   # a cluster shares this machine's memory
    cfg = BrokerConfig.on_free_ports(data_dir, brokers=brokers, heap=heap)
    start(cfg)
    return cfg


def measure_raw_producer(bootstrap: str, events: list[fb.Feedback], partitions: int) -> float:
    """The raw kafka-python producer's events/s on the same records, the baseline of the ratio."""
    values = [fb.FeedbackRecord(event_id=f"raw-{i}", feedback=e).SerializeToString() for i, e in enumerate(events)]
    eps = raw_producer(bootstrap, values, partitions)
    print(f"raw kafka-python producer (acks=all, idempotent): {eps:,.0f} events/s", flush=True)
    return eps


def start_consumer(db: Path, bootstrap: str, run: str, log: Path) -> ChildProcess:
    """python -m feedback.consumer, waited for until it has its partitions (the clock starts then)."""
    consumer = ChildProcess("feedback.consumer", ["--db", str(db), "--bootstrap", bootstrap, "--group", f"bench-{run}",
                                                  "--max-batch", "2000"], log)
    consumer.wait_for(r"(?m)^assigned", 300)
    return consumer


@dataclass
class Submitted:
    """When each event was sent (unix seconds, by event id) and the calls' error messages."""
    started: float
    sent_at: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def submit_stream(port: int, part: list[fb.Feedback], batch: int, out: Submitted) -> None:
    """One client: SubmitBatch calls of `batch` events, or with batch 0 one SubmitMany stream."""
    stub = fb_grpc.FeedbackServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    if batch:
        for i in range(0, len(part), batch):
            chunk = part[i:i + batch]
            now = time.time()
            for e in chunk:
                out.sent_at[e.comparison.event_id] = now
            res = stub.SubmitBatch(fb.FeedbackBatch(items=chunk), timeout=600).results
            out.errors.extend(r.message for r in res if r.code != 0)
        return

    def gen():
        for e in part:
            out.sent_at[e.comparison.event_id] = time.time()
            yield e
    for r in stub.SubmitMany(gen(), timeout=600):
        if r.code != 0:
            out.errors.append(r.message)


def submit_all(port: int, events: list[fb.Feedback], streams: int, batch: int) -> Submitted:
    """Every event through the feedback service, over `streams` concurrent clients."""
    out = Submitted(started=time.time())
    threads = [threading.Thread(target=submit_stream, args=(port, events[i::streams], batch, out))
               for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    n, acked_s = len(events) - len(out.errors), time.time() - out.started
    print(f"gRPC acknowledged {n:,} events in {acked_s:.1f}s ({n / acked_s:,.0f}/s)", flush=True)
    return out


def wait_until_stored(db: Path, run: str, n: int, timeout_s: float) -> dict[str, int]:
    deadline = time.time() + timeout_s
    while time.time() < deadline and len(stored_times(db, run)) < n:
        time.sleep(0.2)
    return stored_times(db, run)


def result(a: argparse.Namespace, sub: Submitted, stored: dict[str, int], dead: int, raw_eps: float) -> dict:
    """The bench's numbers: throughput from the first submission to the last event stored, latency
    from each event's submission to its storing."""
    done_s = max(stored.values()) / 1000 - sub.started if stored else float("nan")
    lat = sorted(stored[k] / 1000 - sub.sent_at[k] for k in stored if k in sub.sent_at)
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else float("nan")  # noqa: E731
    eps = len(stored) / done_s
    return {"events": a.events, "stored": len(stored), "lost": a.events - len(stored), "rejected": len(sub.errors),
            "dead_lettered": dead, "events_per_s": round(eps, 1), "p50_ms": round(pct(0.5), 1),
            "p99_ms": round(pct(0.99), 1), "raw_producer_events_per_s": round(raw_eps, 1),
            "ratio_vs_raw_producer": round(eps / raw_eps, 3), "clients": a.streams, "batch": a.batch,
            "partitions": a.partitions, "brokers": a.brokers, "quick": a.quick}


def main() -> None:
    a = parse_args()
    run = uuid.uuid4().hex[:8]
    events = make_events(a.events, run)
    with tempfile.TemporaryDirectory() as tmp:
        broker = start_broker(Path(tmp) / "kafka", a.brokers)
        svc = consumer = None
        try:   # created before the service and consumer start, so their ensure_topics finds them
            topics.ensure_topics(broker.bootstrap, {**topics.ALL, topics.FEEDBACK: a.partitions,
                                                    topics.INTERACTIONS: a.partitions})
            raw_eps = measure_raw_producer(broker.bootstrap, events, a.partitions)
            svc, port = start_feedback_service(broker.bootstrap)
            db = Path(tmp) / "store.db"
            consumer = start_consumer(db, broker.bootstrap, run, Path(tmp) / "consumer.log")
            sub = submit_all(port, events, a.streams, a.batch)
            stored = wait_until_stored(db, run, a.events, 120)
            dead = dead_lettered(broker.bootstrap)
        finally:
            for proc in (consumer, svc):
                if proc is not None:
                    proc.stop()
            stop(broker)
    res = result(a, sub, stored, dead, raw_eps)
    print(f"end to end: {res['events_per_s']:,.0f} events/s, p50 {res['p50_ms']} ms, p99 {res['p99_ms']} ms, "
          f"lost {res['lost']}, {res['ratio_vs_raw_producer']:.2f}x the raw producer")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
