"""Feedback through the real Kafka broker: gRPC service -> topic -> consumer -> store."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import grpc
import pytest

from rlhf.v1 import feedback_pb2 as fb
from rlhf.v1 import feedback_pb2_grpc as fb_grpc
from feedback import topics
from feedback.consumer import DEAD_LETTER_VALUE_MAX, ConsumerConfig, FeedbackConsumer
from feedback.store import FeedbackStore
from tests.helpers import REPO, start_feedback_service, start_policy_server

pytestmark = pytest.mark.kafka

USER = fb.Source(kind=fb.SOURCE_KIND_USER, id="user-1")
LABELER = fb.Source(kind=fb.SOURCE_KIND_LABELER, id="labeler-7")


def _resp(text, version="v0"):
    return fb.Response(text=text, model_version=version)


def comparison(i, **kw):
    return fb.Comparison(**{"event_id": f"cmp-{uuid.uuid4().hex}", "source": USER, "prompt": f"prompt {i}",
                            "a": _resp(f"answer a {i}"), "b": _resp(f"answer b {i}"),
                            "preferred": fb.Comparison.CHOICE_A, **kw})


def ranking(i, k=4, **kw):
    return fb.Ranking(**{"event_id": f"rank-{uuid.uuid4().hex}", "source": LABELER, "prompt": f"prompt {i}",
                         "responses": [_resp(f"r{j} {i}") for j in range(k)], **kw})


def rating(i, **kw):
    return fb.Rating(**{"event_id": f"rate-{uuid.uuid4().hex}", "source": USER, "prompt": f"prompt {i}",
                        "response": _resp(f"resp {i}"), "likert": 1 + i % 7, **kw})


@pytest.fixture(scope="module")
def feedback_service(kafka_broker):
    proc, port = start_feedback_service(kafka_broker, response_lookup_wait_s=0.5)
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield fb_grpc.FeedbackServiceStub(ch)
    ch.close()
    proc.stop()


def _submit_mix(stub, n, acked):
    for i in range(n):
        kind = i % 3
        if kind == 0:
            r = stub.SubmitComparison(comparison(i), timeout=30)
        elif kind == 1:
            r = stub.SubmitRanking(ranking(i, k=2 + i % 8), timeout=30)
        else:
            r = stub.SubmitRating(rating(i), timeout=30)
        assert r.code == 0 and r.event_id
        acked.add(r.event_id)


def _consume_all(bootstrap, db, group, expect, timeout=60.0, to_the_end=False):
    """A consumer in a new group until `expect` is stored (and, with to_the_end, nothing is left
    unread in the topics)."""
    c = FeedbackConsumer(ConsumerConfig(db=db, bootstrap=bootstrap, group=group, max_batch=50))
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not (expect <= set(c.store.event_ids())
                                                   and (not to_the_end or c.lag() == 0)):
            c.poll_once()
        return set(c.store.event_ids()), c.store.count()
    finally:
        c.close()


def _keys_in_topic(bootstrap, topic) -> list[bytes]:
    """Every record key in the topic, read from the start by a consumer outside any group."""
    from kafka import KafkaConsumer, TopicPartition
    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, consumer_timeout_ms=3000)
    try:
        parts = [TopicPartition(topic, p) for p in c.partitions_for_topic(topic)]
        c.assign(parts)
        c.seek_to_beginning(*parts)
        ends = c.end_offsets(parts)
        keys = []
        while any(c.position(tp) < ends[tp] for tp in parts):
            for recs in c.poll(timeout_ms=1000).values():
                keys += [r.key for r in recs]
        return keys
    finally:
        c.close()


def _duplicates_counted() -> float:
    from prometheus_client import REGISTRY
    v = REGISTRY.get_sample_value("rlhf_feedback_duplicates_total")
    if v is None:
        raise KeyError("rlhf_feedback_duplicates_total is not registered")
    return v


def test_events_arrive_exactly_once(feedback_service, kafka_broker, acked_event_ids, tmp_path):
    mine: set[str] = set()
    _submit_mix(feedback_service, 60, mine)
    # a client retrying with the same idempotency key must not be counted twice
    dup = comparison(999)
    r1 = feedback_service.SubmitComparison(dup, timeout=30)
    r2 = feedback_service.SubmitComparison(dup, timeout=30)
    assert r1.event_id == r2.event_id == dup.event_id
    mine.add(dup.event_id)
    # streaming submissions for labeler tools
    items = [fb.Feedback(ranking=ranking(i)) for i in range(20)]
    results = list(feedback_service.SubmitMany(iter(items), timeout=60))
    assert [r.event_id for r in results] == [f.ranking.event_id for f in items]
    assert all(r.code == 0 for r in results)
    mine |= {r.event_id for r in results}
    acked_event_ids |= mine
    keys = _keys_in_topic(kafka_broker, topics.FEEDBACK)
    assert keys.count(dup.event_id.encode()) == 2           # at least once: the retry reached the topic
    dups_before = _duplicates_counted()
    ids, count = _consume_all(kafka_broker, tmp_path / "store.db", f"g-{uuid.uuid4().hex}", acked_event_ids,
                              to_the_end=True)
    assert acked_event_ids <= ids
    assert count == len(ids)   # one row per event id
    assert len(mine) == 81
    # exactly once in the store: the consumer saw every repeated key of the topic and skipped it
    # (over the stored ids: a record that was dead-lettered is no duplicate)
    stored_keys = [k for k in keys if k is not None and k.decode() in ids]
    repeats = len(stored_keys) - len(set(stored_keys))
    assert repeats >= 1 and _duplicates_counted() - dups_before == repeats
    # the stored records are complete FeedbackRecords
    store = FeedbackStore(tmp_path / "store.db")
    recs = [fb.FeedbackRecord.FromString(b) for _, b in store.records()]
    assert {r.event_id for r in recs} == ids and all(r.received_unix_ms > 0 for r in recs)
    assert all(getattr(r.feedback, r.feedback.WhichOneof("kind")).created_unix_ms > 0 for r in recs)


@pytest.mark.slow
def test_kill_9_consumer_then_restart_loses_nothing(feedback_service, kafka_broker, acked_event_ids, tmp_path):
    mine: set[str] = set()
    _submit_mix(feedback_service, 150, mine)
    acked_event_ids |= mine
    db, group = tmp_path / "store.db", f"g-{uuid.uuid4().hex}"
    args = [sys.executable, "-m", "feedback.consumer", "--db", str(db), "--bootstrap", kafka_broker,
            "--group", group, "--max-batch", "3"]  # small batches: the kill lands part-way
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    stored = 0
    while time.monotonic() < deadline and stored < 30:
        time.sleep(0.05)
        if db.exists():
            try:
                stored = FeedbackStore(db).count()
            except Exception:
                pass
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 30 <= stored < len(acked_event_ids), "the kill must land part-way"
    t0 = time.monotonic()
    out = subprocess.run(args + ["--idle-exit-s", "4"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # static membership: the restarted consumer takes its partitions back at once (before: ~41 s waiting
    # for the killed member's session to expire, then 4 s idle)
    took = time.monotonic() - t0
    print(f"restarted consumer: caught up and idle 4 s after {took:.1f} s")
    assert "assigned" in out.stdout and took < 25, (took, out.stdout[-500:])
    ids = set(FeedbackStore(db).event_ids())
    assert acked_event_ids <= ids
    assert FeedbackStore(db).count() == len(ids)


BAD = [
    ("SubmitComparison", lambda: comparison(1, preferred=fb.Comparison.CHOICE_UNSPECIFIED), "preferred"),
    ("SubmitComparison", lambda: comparison(1, prompt=""), "prompt"),
    ("SubmitComparison", lambda: comparison(1, b=_resp("answer a 1")), "same response"),
    ("SubmitComparison", lambda: comparison(1, a=fb.Response(response_id="no-such-id")), "unknown response id"),
    ("SubmitComparison", lambda: comparison(1, source=fb.Source(kind=fb.SOURCE_KIND_USER)), "source.id"),
    ("SubmitComparison", lambda: comparison(1, a=_resp("x" * 40_000)), "limit"),
    ("SubmitComparison", lambda: comparison(1, a=fb.Response(text="no version")), "model_version"),
    ("SubmitRanking", lambda: ranking(1, k=1), "K=1"),
    ("SubmitRanking", lambda: ranking(1, k=10), "K=10"),
    ("SubmitRanking", lambda: ranking(1, responses=[_resp("same"), _resp("same"), _resp("other")]), "duplicates"),
    ("SubmitRating", lambda: rating(1, likert=9), "likert"),
    # proto3 enums are open: out-of-range values must not pass (99 would have trained as "B preferred")
    ("SubmitComparison", lambda: comparison(1, preferred=99), "comparison.preferred: 99"),
    ("SubmitComparison", lambda: comparison(1, preferred=-1), "comparison.preferred: -1"),
    ("SubmitComparison", lambda: comparison(1, source=fb.Source(kind=99, id="u1")), "source.kind: 99"),
    ("SubmitRating", lambda: fb.Rating(event_id="e", source=USER, prompt="p", response=_resp("r")), "score"),
]


@pytest.mark.parametrize("rpc,make,needle", BAD, ids=[b[2] for b in BAD])
def test_bad_input_is_invalid_argument(feedback_service, rpc, make, needle):
    with pytest.raises(grpc.RpcError) as e:
        getattr(feedback_service, rpc)(make(), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in e.value.details()


def test_stream_reports_each_bad_item_and_goes_on(feedback_service, acked_event_ids):
    items = [fb.Feedback(rating=rating(1)), fb.Feedback(rating=rating(2, likert=0)), fb.Feedback(),
             fb.Feedback(comparison=comparison(3))]
    res = list(feedback_service.SubmitMany(iter(items), timeout=60))
    assert [r.code for r in res] == [0, grpc.StatusCode.INVALID_ARGUMENT.value[0],
                                     grpc.StatusCode.INVALID_ARGUMENT.value[0], 0]
    assert "likert" in res[1].message and "empty" in res[2].message
    acked_event_ids |= {res[0].event_id, res[3].event_id}


def test_batch_reports_each_item_in_order(feedback_service, acked_event_ids):
    items = [fb.Feedback(comparison=comparison(i)) for i in range(30)]
    items[7] = fb.Feedback(ranking=ranking(7, k=12))
    res = feedback_service.SubmitBatch(fb.FeedbackBatch(items=items), timeout=60).results
    assert len(res) == 30
    assert res[7].code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "K=12" in res[7].message
    ok = [r for i, r in enumerate(res) if i != 7]
    assert all(r.code == 0 for r in ok)
    assert [r.event_id for r in ok] == [f.comparison.event_id for i, f in enumerate(items) if i != 7]
    acked_event_ids |= {r.event_id for r in ok}


def test_served_responses_are_logged_and_referenced_by_id(feedback_service, kafka_broker, tiny_gpt2,
                                                          acked_event_ids, tmp_path):
    from serve.client import PolicyClient
    proc, port, _ = start_policy_server(tiny_gpt2, kafka_bootstrap=kafka_broker, threads=1)
    try:
        with PolicyClient(f"127.0.0.1:{port}") as c:
            r = c.generate("Human: hello", n=2, max_new_tokens=8, temperature=1.0, seed=5)
            other = c.generate("Human: something else", n=1, max_new_tokens=8, temperature=1.0, seed=6)
    finally:
        proc.stop()
    a, b = r.completions
    # the prompt stored is the one the responses were served for, whatever the client wrote
    res = feedback_service.SubmitComparison(fb.Comparison(
        source=USER, prompt="a prompt the policy never saw", a=fb.Response(response_id=a.response_id),
        b=fb.Response(response_id=b.response_id), preferred=fb.Comparison.CHOICE_B), timeout=30)
    acked_event_ids.add(res.event_id)
    # responses served for two different prompts are not a comparison
    with pytest.raises(grpc.RpcError) as e:
        feedback_service.SubmitComparison(fb.Comparison(
            source=USER, prompt=r.prompt_text, a=fb.Response(response_id=a.response_id),
            b=fb.Response(response_id=other.completions[0].response_id), preferred=fb.Comparison.CHOICE_A), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "served for different prompts" in e.value.details()
    c = FeedbackConsumer(ConsumerConfig(db=tmp_path / "s.db", bootstrap=kafka_broker, group=f"g-{uuid.uuid4().hex}"))
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and res.event_id not in c.store.event_ids():
            c.poll_once()
        recs = {fb.FeedbackRecord.FromString(v).event_id: fb.FeedbackRecord.FromString(v)
                for _, v in c.store.records()}
        got = recs[res.event_id].feedback.comparison
        assert (got.a.text, got.b.text) == (a.text, b.text) and got.prompt == r.prompt_text
        assert got.a.model_version == got.b.model_version == r.model_version
        served = {fb.Interaction.FromString(v).response_id for _, v in c.store.records("interactions")}
        assert {a.response_id, b.response_id} <= served
    finally:
        c.close()


@pytest.mark.slow
def test_bad_records_go_to_the_dead_letter_topic_with_reason(kafka_broker, tmp_path):
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition
    marker = uuid.uuid4().hex
    bad_rec = fb.FeedbackRecord(event_id=f"bad-{marker}", received_unix_ms=1,
                                feedback=fb.Feedback(rating=rating(0, event_id=f"bad-{marker}", likert=42)))
    good_rec = fb.FeedbackRecord(event_id=f"good-{marker}", received_unix_ms=1,
                                 feedback=fb.Feedback(rating=rating(1, event_id=f"good-{marker}")))
    huge = b"\xff" * 1_040_000   # near the broker's 1 MB limit: its dead letter would be over it, whole
    p = KafkaProducer(bootstrap_servers=kafka_broker, acks="all", max_request_size=2 << 20)
    p.send(topics.FEEDBACK, key=f"garbage-{marker}".encode(), value=b"\xff\x00 not protobuf").get(timeout=30)
    p.send(topics.FEEDBACK, key=f"bad-{marker}".encode(), value=bad_rec.SerializeToString()).get(timeout=30)
    p.send(topics.FEEDBACK, key=f"huge-{marker}".encode(), value=huge, partition=0).get(timeout=30)
    p.send(topics.FEEDBACK, key=f"good-{marker}".encode(), value=good_rec.SerializeToString(), partition=0).get(timeout=30)
    p.close()
    c = FeedbackConsumer(ConsumerConfig(db=tmp_path / "s.db", bootstrap=kafka_broker, group=f"g-{uuid.uuid4().hex}"))
    try:
        for _ in range(40):
            c.poll_once(timeout_ms=250)
        assert f"bad-{marker}" not in c.store.event_ids()
        assert f"good-{marker}" in c.store.event_ids()   # the record after the huge one got through
    finally:
        c.close()
    dlq = KafkaConsumer(bootstrap_servers=kafka_broker, auto_offset_reset="earliest", enable_auto_commit=False,
                        consumer_timeout_ms=3000)
    dlq.assign([TopicPartition(topics.DEAD_LETTERS, 0)])
    dead = {r.key.decode(): (fb.DeadLetter.FromString(r.value), dict(r.headers)) for r in dlq if r.key}
    dlq.close()
    g, bad = dead[f"garbage-{marker}"], dead[f"bad-{marker}"]
    assert "not a protobuf record" in g[0].reason and g[0].value == b"\xff\x00 not protobuf"
    assert "likert" in bad[0].reason and bad[1]["reason"].decode() == bad[0].reason
    assert bad[0].source_topic == topics.FEEDBACK and bad[0].source_offset >= 0
    h = dead[f"huge-{marker}"][0]
    assert h.value == huge[:DEAD_LETTER_VALUE_MAX] and f"value of {len(huge)} bytes" in h.reason


def test_a_batch_that_fails_is_read_again_not_skipped(kafka_broker, tmp_path, monkeypatch):
    """The store failing mid-batch: poll_once raises, and the next poll reads the same records again."""
    from kafka import KafkaProducer
    marker = uuid.uuid4().hex
    rec = fb.FeedbackRecord(event_id=f"again-{marker}", received_unix_ms=1,
                            feedback=fb.Feedback(rating=rating(2, event_id=f"again-{marker}")))
    p = KafkaProducer(bootstrap_servers=kafka_broker, acks="all")
    p.send(topics.FEEDBACK, key=rec.event_id.encode(), value=rec.SerializeToString()).get(timeout=30)
    p.close()
    c = FeedbackConsumer(ConsumerConfig(db=tmp_path / "s.db", bootstrap=kafka_broker, group=f"g-{uuid.uuid4().hex}"))
    try:
        real, failed = c.store.commit_batch, []

        def failing(fb_rows, int_rows):
            if any(row[0] == rec.event_id for row in fb_rows) and not failed:   # rows start with the event id
                failed.append(1)
                raise OSError("disk full")
            return real(fb_rows, int_rows)
        monkeypatch.setattr(c.store, "commit_batch", failing)
        deadline = time.monotonic() + 60
        while rec.event_id not in c.store.event_ids() and time.monotonic() < deadline:
            try:
                c.poll_once(timeout_ms=250)
            except OSError:
                pass
        assert failed and rec.event_id in c.store.event_ids()
    finally:
        c.close()


@pytest.mark.slow
def test_broker_down_gives_unavailable_and_nothing_acked_is_lost(tmp_path):
    from feedback.broker import BrokerConfig, start, stop
    from feedback.topics import ensure_topics
    from tests.helpers import free_port
    cfg = BrokerConfig(data_dir=tmp_path / "kafka", port=free_port(), controller_port=free_port())
    start(cfg)
    ensure_topics(cfg.bootstrap)
    proc, port = start_feedback_service(cfg.bootstrap, kafka_timeout_s=2.0)
    stub = fb_grpc.FeedbackServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    acked: set[str] = set()
    try:
        _submit_mix(stub, 10, acked)
        stop(cfg)
        with pytest.raises(grpc.RpcError) as e:
            stub.SubmitRating(rating(1), timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        start(cfg)
        deadline = time.monotonic() + 60
        while True:  # the producer reconnects on its own
            try:
                _submit_mix(stub, 10, acked)
                break
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline
                time.sleep(1)
        ids, _ = _consume_all(cfg.bootstrap, tmp_path / "s.db", "g", acked)
        assert acked <= ids and len(acked) >= 20
    finally:
        proc.stop()
        stop(cfg)


def test_the_consumer_refuses_out_of_range_enums_too():
    """The consumer re-validates every record (resolved=True) and dead-letters what fails."""
    from feedback import validate
    rec = fb.Feedback(comparison=comparison(1, preferred=7, event_id="e7"))
    rec.comparison.a.model_version = rec.comparison.b.model_version = "v0001"
    with pytest.raises(validate.Invalid, match="comparison.preferred: 7"):
        validate.check(rec, validate.Limits(), resolved=True)


def test_a_served_empty_response_referenced_by_id_is_valid_feedback():
    """A model may stop at once: its (empty) response, resolved by id, must not be dead-lettered."""
    from feedback import validate
    src = fb.Source(kind=fb.SOURCE_KIND_LABELER, id="l1")
    ok = fb.Feedback(comparison=fb.Comparison(event_id="e1", source=src, prompt="p", preferred=fb.Comparison.CHOICE_A,
                                              a=fb.Response(response_id="r1", text="", model_version="v1"),
                                              b=fb.Response(response_id="r2", text="hi", model_version="v1")))
    validate.check(ok, validate.Limits(), resolved=True)
    bad = fb.Feedback()
    bad.CopyFrom(ok)
    bad.comparison.a.response_id = ""
    with pytest.raises(validate.Invalid, match="comparison.a"):
        validate.check(bad, validate.Limits(), resolved=True)


def test_cluster_id_never_starts_with_a_dash(monkeypatch):
    """A KRaft cluster id starting with "-" made `kafka-storage format -t <id>` fail (1 run in 64)."""
    import base64

    from feedback import broker
    bad = uuid.UUID(bytes=bytes([0xF8]) + bytes(15))          # encodes to "-AAAA..."
    good = uuid.UUID(bytes=bytes([0x10]) + bytes(15))
    assert base64.urlsafe_b64encode(bad.bytes).decode().startswith("-")
    draws = iter([bad, bad, good])
    monkeypatch.setattr(broker.uuid, "uuid4", lambda: next(draws))
    cid = broker.new_cluster_id()
    assert cid == base64.urlsafe_b64encode(good.bytes).decode().rstrip("=") and len(cid) == 22


def test_unknown_response_ids_cannot_starve_the_service(kafka_broker, acked_event_ids):
    """One wait budget per call (bounded by its deadline) and a few lookup slots: batches full of
    unknown ids neither take n x the wait nor hold every worker (before: 10 ids x 2 s = 20 s a
    batch, and 32 such batches made valid calls and the health check time out for 40 s)."""
    from concurrent.futures import ThreadPoolExecutor
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    proc, port = start_feedback_service(kafka_broker, response_lookup_wait_s=2.0, workers=8)
    bad = lambda i: fb.Feedback(comparison=comparison(i, a=fb.Response(response_id=f"nope-{uuid.uuid4().hex}")))  # noqa: E731
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = fb_grpc.FeedbackServiceStub(ch)
            t0 = time.monotonic()
            res = stub.SubmitBatch(fb.FeedbackBatch(items=[bad(i) for i in range(10)]), timeout=30)
            one_batch = time.monotonic() - t0
            assert all(r.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] for r in res.results)
            assert one_batch < 3.0, one_batch                       # one 2 s budget for the call, not 10
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:                 # the caller's deadline bounds the wait
                stub.SubmitComparison(bad(0).comparison, timeout=0.8)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and time.monotonic() - t0 < 0.8

            def flood(i):
                try:
                    stub.SubmitBatch(fb.FeedbackBatch(items=[bad(i * 10 + j) for j in range(10)]), timeout=3)
                except grpc.RpcError:
                    pass
            with ThreadPoolExecutor(32) as ex:
                futs = [ex.submit(flood, i) for i in range(32)]
                time.sleep(0.5)                                     # the flood holds what it can
                t0 = time.monotonic()
                ok = stub.SubmitComparison(comparison(1), timeout=5)
                health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
                took = time.monotonic() - t0
                for f in futs:
                    f.result()
            assert ok.code == 0 and health.status == health_pb2.HealthCheckResponse.SERVING
            assert took < 2.0, took
            acked_event_ids.add(ok.event_id)
    finally:
        proc.stop()


def test_a_late_failure_of_a_replaced_producer_does_not_take_the_new_one_down():
    """AckedProducer without a broker: a write failing on the current producer marks it down
    (NOT_SERVING, fail fast); a failure reported for a producer that was already replaced (a batch
    of the old one expiring after the probe installed a fresh one) changes nothing."""
    from kafka.errors import KafkaTimeoutError

    from feedback.kafka_io import AckedProducer, Unavailable

    class Dummy:
        closed = False

        def close(self, timeout=None):
            self.closed = True

    health: list[bool] = []
    p = AckedProducer("127.0.0.1:1", timeout_s=0.5, on_health=health.append, probe_s=3600)
    try:
        old, new = Dummy(), Dummy()
        p._producer = new
        assert isinstance(p.note_failure(KafkaTimeoutError("expired"), old), Unavailable)
        assert p.healthy and p._producer is new and health == []
        p.note_failure(KafkaTimeoutError("expired"), new)
        assert not p.healthy and health == [False] and p._producer is None
        with pytest.raises(Unavailable, match="is down"):
            p.send_async("t", b"k", b"v")   # at once, not after a timeout
        p.note_failure(ValueError("not an availability error"), None)
        assert health == [False]
    finally:
        p.close()


def test_a_refused_offset_commit_does_not_stop_the_consumer(feedback_service, kafka_broker, acked_event_ids,
                                                              tmp_path, caplog):
    """A group consumer whose commit the group refuses (it rebalanced, or a restarted broker forgot the
    member: CommitFailedError) keeps the stored batch and goes on; the records come again and are deduped."""
    from kafka.errors import CommitFailedError
    mine: set[str] = set()
    _submit_mix(feedback_service, 6, mine)
    acked_event_ids |= mine
    c = FeedbackConsumer(ConsumerConfig(db=tmp_path / "store.db", bootstrap=kafka_broker, group=f"g-{uuid.uuid4().hex}",
                                        max_batch=500))
    real_commit, refused = c.consumer.commit, []

    def refuse_once(*a, **kw):
        if not refused:
            refused.append(1)
            raise CommitFailedError("the group rebalanced")
        return real_commit(*a, **kw)
    c.consumer.commit = refuse_once
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not mine <= set(c.store.event_ids()):
            c.poll_once()
        assert refused and mine <= set(c.store.event_ids())
        assert "offset commit refused" in caplog.text
        # still consuming, and the next commit goes through: new events stored, the group's offsets move on
        before = c.committed()
        more: set[str] = set()
        _submit_mix(feedback_service, 2, more)
        acked_event_ids |= more
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not more <= set(c.store.event_ids()):
            c.poll_once()
        assert more <= set(c.store.event_ids())
        after = c.committed()
        assert any(after[k] > before.get(k, -1) for k in after), (before, after)
    finally:
        c.close()
