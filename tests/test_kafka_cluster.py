"""Feedback through a replicated Kafka cluster (3 KRaft nodes on this machine, topics at replication 3
with 2 in sync): a partition leader killed mid-stream, and a consumer group that rebalances."""
from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from feedback import topics
from feedback.broker import BrokerConfig, read_pid, start
from feedback.consumer import ConsumerConfig, FeedbackConsumer
from rlhf.v1 import feedback_pb2 as fb
from rlhf.v1 import feedback_pb2_grpc as fb_grpc
from tests.helpers import start_feedback_service


def test_replication_for_a_cluster_size():
    assert [topics.replication_for(n) for n in (1, 2, 3, 5)] == [(1, 1), (2, 1), (3, 2), (3, 2)]
    with pytest.raises(ValueError):
        topics.replication_for(0)


def test_topics_created_with_fewer_than_three_copies_say_so(kafka_broker, caplog):
    """One live broker: the topic gets one copy, and the log says it (a 3-node cluster with a node down at
    creation would otherwise keep fewer copies without a word); topics that exist are left alone, silently,
    and a caller that gives the cluster's size (the main job's bundled broker) is not warned."""
    import time

    from kafka import KafkaAdminClient
    name = f"test-few-copies-{time.time_ns()}"
    with caplog.at_level("WARNING", logger="feedback.topics"):
        topics.ensure_topics(kafka_broker, {name: 1})
    assert any(name in r.getMessage() and "1 copy" in r.getMessage() for r in caplog.records), caplog.text
    admin = KafkaAdminClient(bootstrap_servers=kafka_broker)
    try:
        [t] = admin.describe_topics([name])
        assert [len(p["replica_nodes"]) for p in t["partitions"]] == [1]
    finally:
        admin.close()
    caplog.clear()
    with caplog.at_level("WARNING", logger="feedback.topics"):
        topics.ensure_topics(kafka_broker, {name: 1})
        topics.ensure_topics(kafka_broker, {name + "-sized": 1}, brokers=1)   # the caller knows the size: info only
    assert not caplog.records


def test_each_node_gets_its_own_ports_folder_and_id_and_every_voter(tmp_path):
    from feedback.broker import _render_properties
    one = BrokerConfig(data_dir=tmp_path)
    assert [(n.node_id, n.port, n.controller_port, n.data_dir) for n in one.nodes()] == [(1, 19092, 19093, tmp_path)]
    single = _render_properties(one, one.node(1)).read_text()    # the layout and settings it always had
    assert f"log.dirs={(tmp_path / 'log').resolve()}\n" in single
    assert "controller.quorum.voters=1@127.0.0.1:19093\n" in single
    assert "default.replication.factor=1\n" in single and "transaction.state.log.min.isr=1\n" in single
    cfg = BrokerConfig(data_dir=tmp_path, port=29092, controller_port=29093, brokers=3)
    assert cfg.bootstrap == "127.0.0.1:29092,127.0.0.1:29094,127.0.0.1:29096"
    props = _render_properties(cfg, cfg.node(2)).read_text()
    assert "node.id=2\n" in props and "listeners=PLAINTEXT://127.0.0.1:29094,CONTROLLER://127.0.0.1:29095\n" in props
    assert "controller.quorum.voters=1@127.0.0.1:29093,2@127.0.0.1:29095,3@127.0.0.1:29097\n" in props
    assert f"log.dirs={(tmp_path / 'node-2' / 'log').resolve()}\n" in props
    assert "offsets.topic.replication.factor=3\n" in props and "min.insync.replicas=2\n" in props
    with pytest.raises(ValueError, match="differ"):
        BrokerConfig(port=29092, controller_port=29094, brokers=2)   # node 2's port is node 1's controller port


def test_a_commit_refused_mid_rebalance_does_not_end_the_consumer(caplog):
    """kafka-python refuses a commit with RebalanceInProgressError (not CommitFailedError) once it knows a
    member joined or left; the consumer logs it and goes on (the batch is stored; its records come again)."""
    from kafka import TopicPartition
    from kafka.errors import RebalanceInProgressError

    class RebalancingGroup:
        def commit(self, offsets):
            raise RebalanceInProgressError("a member joined")
    c = FeedbackConsumer.__new__(FeedbackConsumer)   # no broker: only the commit path
    c.consumer = RebalancingGroup()
    c._commit({TopicPartition(topics.FEEDBACK, 0): 5})
    assert "offset commit refused by the group (RebalanceInProgressError)" in caplog.text


def _comparison(i: int) -> fb.Comparison:
    return fb.Comparison(event_id=f"cl-{uuid.uuid4().hex}", source=fb.Source(kind=fb.SOURCE_KIND_USER, id="u1"),
                         prompt=f"prompt {i}", a=fb.Response(text=f"a {i}", model_version="v0"),
                         b=fb.Response(text=f"b {i}", model_version="v0"), preferred=fb.Comparison.CHOICE_A)


@dataclass(frozen=True)
class Answer:
    t: float          # time.monotonic() when it came
    event_id: str
    replica: int      # which service replica answered
    code: str         # the gRPC status name
    partition: int    # where Kafka stored it (-1 unless OK)


class SteadyLoad:
    """One client thread calling SubmitComparison every `interval_s`, round robin over the service
    replicas, keeping every Answer."""

    def __init__(self, ports: list[int], interval_s: float = 0.05):
        self.channels = [grpc.insecure_channel(f"127.0.0.1:{p}") for p in ports]
        self.stubs = [fb_grpc.FeedbackServiceStub(ch) for ch in self.channels]
        self.interval_s, self.answers = interval_s, []   # list[Answer]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="steady-load", daemon=True)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            c, k = _comparison(i), i % len(self.stubs)
            try:
                code, partition = "OK", self.stubs[k].SubmitComparison(c, timeout=15).partition
            except grpc.RpcError as e:
                code, partition = e.code().name, -1
            self.answers.append(Answer(time.monotonic(), c.event_id, k, code, partition))
            i += 1
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "SteadyLoad":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        for ch in self.channels:
            ch.close()

    def ok(self, after: float = 0.0) -> list[Answer]:
        return [a for a in list(self.answers) if a.code == "OK" and a.t > after]

    def acked(self, after: float = 0.0) -> set[str]:
        return {a.event_id for a in self.ok(after)}

    def wait_acked(self, n: int, after: float = 0.0, timeout_s: float = 60.0, partitions: int = 1) -> None:
        """Until n OK answers came after `after`, spread over at least `partitions` partitions."""
        deadline = time.monotonic() + timeout_s
        while len(ok := self.ok(after)) < n or len({a.partition for a in ok}) < partitions:
            assert time.monotonic() < deadline, f"fewer than {n} OK answers in {timeout_s}s: {self.codes()}"
            time.sleep(0.1)

    def codes(self) -> dict[str, int]:
        return dict(Counter(a.code for a in list(self.answers)))


class PollingThread:
    """A FeedbackConsumer polling in a thread until stopped; an exception it raises ends the thread and is kept."""

    def __init__(self, consumer: FeedbackConsumer):
        self.consumer, self.error = consumer, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="consumer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.consumer.poll_once(timeout_ms=200)
        except BaseException as e:   # handed to the test, which fails on it
            self.error = e

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def alive(self) -> bool:
        return self._thread.is_alive()


def _group_consumer(db, bootstrap: str, group: str, instance: str) -> FeedbackConsumer:
    return FeedbackConsumer(ConsumerConfig(db=db, bootstrap=bootstrap, group=group, instance_id=instance,
                                           max_batch=20, session_timeout_s=6))


def _drain(consumer: FeedbackConsumer, want: set[str], timeout_s: float = 60.0) -> set[str]:
    deadline = time.monotonic() + timeout_s
    while not want <= (ids := set(consumer.store.event_ids())) and time.monotonic() < deadline:
        consumer.poll_once(timeout_ms=200)
    return ids


def _duplicates_counted() -> float:
    from prometheus_client import REGISTRY
    v = REGISTRY.get_sample_value("rlhf_feedback_duplicates_total")
    if v is None:
        raise KeyError("rlhf_feedback_duplicates_total is not registered")
    return v


def _describe(bootstrap: str) -> tuple[dict[int, tuple[int, list[int]]], str | None]:
    """The feedback topic's {partition: (leader node, in-sync nodes)} and its own min.insync.replicas
    (None until the answering broker has applied the topic's config: brokers apply metadata asynchronously)."""
    from kafka import KafkaAdminClient
    from kafka.admin import ConfigResource, ConfigResourceType
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        (t,) = admin.describe_topics([topics.FEEDBACK])
        parts = {p["partition_index"]: (p["leader_id"], sorted(p["isr_nodes"])) for p in t["partitions"]}
        conf = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topics.FEEDBACK)])   # set, not default
        return parts, conf["topic"][topics.FEEDBACK].get("min.insync.replicas", {}).get("value")
    finally:
        admin.close()


@pytest.mark.kafka
@pytest.mark.slow
def test_a_partition_leader_killed_mid_stream_loses_no_acknowledged_event(kafka_cluster: BrokerConfig, tmp_path):
    cfg, n_parts = kafka_cluster, topics.ALL[topics.FEEDBACK]
    _wait(lambda: _describe(cfg.bootstrap)[1] is not None, "the topic's own min.insync.replicas known", timeout_s=15)
    parts, min_isr = _describe(cfg.bootstrap)
    assert len(parts) == n_parts and min_isr == "2"
    assert all(isr == [1, 2, 3] for _, isr in parts.values()), parts     # replication 3, all in sync
    proc, port = start_feedback_service(cfg.bootstrap, kafka_timeout_s=3.0)
    consumer = PollingThread(_group_consumer(tmp_path / "store.db", cfg.bootstrap, f"g-{uuid.uuid4().hex}", "c1"))
    try:
        with SteadyLoad([port]) as load:
            load.wait_acked(20, partitions=n_parts)
            victim = parts[0][0]   # the leader of partition 0
            os.kill(read_pid(cfg, victim), signal.SIGKILL)
            killed_at = time.monotonic()
            # two nodes left: every partition takes writes again (its leader moved), with no service restart
            load.wait_acked(10, after=killed_at, partitions=n_parts)
            assert read_pid(cfg, victim) is None       # still down while those were acknowledged
            leaders = {k: leader for k, (leader, _) in _describe(cfg.bootstrap)[0].items()}
            start(cfg)                                 # the same data dir: the node rejoins and catches up
            load.wait_acked(10, after=time.monotonic(), partitions=n_parts)
        recovered_s = max(min(x.t for x in load.ok(killed_at) if x.partition == k) for k in range(n_parts)) - killed_at
        print(f"killed node {victim}, the leader of partition 0; every partition acknowledged again after "
              f"{recovered_s:.1f}s (leaders then {leaders}); answers {load.codes()}")
        assert victim not in leaders.values(), leaders
        assert set(load.codes()) <= {"OK", "UNAVAILABLE"}, load.codes()   # nothing else, ever
        consumer.stop()
        assert consumer.error is None, repr(consumer.error)
        acked = load.acked()
        stored = _drain(consumer.consumer, acked)
        assert acked <= stored, f"{len(acked - stored)} acknowledged events missing from the store"
    finally:
        consumer.stop()
        consumer.consumer.close()
        proc.stop()


class Crash(Exception):
    """A consumer dying after its store commit and before its offset commit."""


@pytest.mark.kafka
@pytest.mark.slow
def test_two_service_replicas_and_a_consumer_group_that_rebalances(kafka_cluster: BrokerConfig, tmp_path):
    """Consumer a stores a batch and dies before committing its offsets; after its session expires
    the group gives its partitions to b, which reads that batch again: every acknowledged event is
    in the shared store, the repeats are counted as duplicates and skipped."""
    bootstrap, group, db = kafka_cluster.bootstrap, f"g-{uuid.uuid4().hex}", tmp_path / "store.db"
    n_parts = topics.ALL[topics.FEEDBACK] + topics.ALL[topics.INTERACTIONS]
    svc = [start_feedback_service(bootstrap, kafka_timeout_s=3.0) for _ in range(2)]
    a = _group_consumer(db, bootstrap, group, "a")
    b = _group_consumer(db, bootstrap, group, "b")
    uncommitted: list[int] = []

    def die_instead_of_committing(next_offsets) -> None:
        uncommitted.extend(o - (a.consumer.committed(tp) or 0) for tp, o in next_offsets.items())
        raise Crash()
    a_thread = PollingThread(a)
    b_thread = None
    try:
        with SteadyLoad([port for _, port in svc], interval_s=0.02) as load:
            load.wait_acked(20)
            # a consuming alone first: b joins a settled group, a rebalance of its own
            _wait(lambda: len(a.consumer.assignment()) == n_parts, "a holding every partition")
            b_thread = PollingThread(b)                  # joins: the group splits the partitions
            _wait(lambda: _split(a, b, n_parts), "a and b splitting the partitions",
                  detail=lambda: (a.consumer.assignment(), b.consumer.assignment(), a_thread.error, b_thread.error))
            split = (len(a.consumer.assignment()), len(b.consumer.assignment()))
            load.wait_acked(20, after=time.monotonic())
            dups_before = _duplicates_counted()
            a._commit = die_instead_of_committing
            _wait(lambda: not a_thread.alive(), "a dead")
            a.close()       # static member: no LeaveGroup, its session runs out
            _wait(lambda: len(b.consumer.assignment()) == n_parts, "b holding every partition", timeout_s=60)
            load.wait_acked(20, after=time.monotonic())
        b_thread.stop()
        assert isinstance(a_thread.error, Crash) and b_thread.error is None, (a_thread.error, b_thread.error)
        acked = load.acked()
        stored = _drain(b, acked)
        print(f"split {split}; a died with {sum(uncommitted)} records stored, not committed; answers {load.codes()}; "
              f"duplicates skipped {_duplicates_counted() - dups_before:.0f}")
        assert set(load.codes()) <= {"OK", "UNAVAILABLE"}, load.codes()
        assert {ans.replica for ans in load.ok()} == {0, 1}     # both replicas acknowledged
        assert acked <= stored, f"{len(acked - stored)} acknowledged events missing from the store"
        assert sum(uncommitted) > 0 and _duplicates_counted() - dups_before >= sum(uncommitted)
    finally:
        for t in (a_thread, b_thread):
            if t is not None:
                t.stop()
        a.close()
        b.close()
        for proc, _ in svc:
            proc.stop()


def _split(a: FeedbackConsumer, b: FeedbackConsumer, n_parts: int) -> bool:
    """Both hold partitions, none twice, all of them between the two (a rebalance has settled)."""
    pa, pb = a.consumer.assignment(), b.consumer.assignment()
    return bool(pa and pb and not pa & pb and len(pa | pb) == n_parts)


def _wait(cond, what: str, timeout_s: float = 30.0, detail=lambda: "") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"not {what} within {timeout_s}s {detail()}"
        time.sleep(0.1)


def test_a_node_that_cannot_launch_leaves_no_other_node_running(tmp_path, monkeypatch):
    """start() launches every node before waiting; when a later one cannot even launch (here its port
    is taken), the nodes this call already started are stopped, not left running without a quorum."""
    import socket

    from feedback import broker
    procs = []
    real = broker._launch
    monkeypatch.setattr(broker, "_launch", lambda cfg, node: procs.append(real(cfg, node)) or procs[-1])
    cfg = BrokerConfig.on_free_ports(tmp_path / "kafka", brokers=2)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", cfg.node(2).port))
        squatter.listen()
        with pytest.raises(RuntimeError, match="is taken"):
            start(cfg)
    assert len(procs) == 1                       # node 1 had started
    assert procs[0].wait(timeout=30) is not None  # and was stopped
    assert read_pid(cfg, 1) is None and not (cfg.node(1).data_dir / "broker.pid").exists()


def test_a_pid_file_naming_another_process_is_not_taken_for_the_broker(tmp_path):
    """A pid file outlives its broker (a reboot, kill -9 of the main job); its pid may since be another
    process's. That process is not the broker: read_pid says not running and stop leaves it alone.
    A process whose command line is this node's Kafka, with its properties file relative to its own
    working directory, is."""
    import subprocess
    import sys

    from feedback.broker import stop
    cfg = BrokerConfig.on_free_ports(tmp_path / "kafka", brokers=1)
    node = cfg.node(1)
    node.data_dir.mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    lookalike = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "kafka.Kafka",
                                  "server.properties"], cwd=node.data_dir)
    # Popen returns as the child's exec closes its error pipe, before the kernel has set up the new
    # program's arguments: /proc/<pid>/cmdline reads empty for a moment (it did in 39 of 40 tries here,
    # and the fresh clone's suite once failed on it). A broker's pid is only read long after its start.
    cmdline = Path("/proc") / str(lookalike.pid) / "cmdline"
    deadline = time.monotonic() + 10
    while b"kafka.Kafka" not in cmdline.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        (node.data_dir / "broker.pid").write_text(str(other.pid))
        assert read_pid(cfg, 1) is None
        stop(cfg, timeout_s=1.0)
        assert other.poll() is None                                  # not signalled
        assert not (node.data_dir / "broker.pid").exists()
        (node.data_dir / "broker.pid").write_text(str(lookalike.pid))
        assert read_pid(cfg, 1) == lookalike.pid
        stop(cfg, timeout_s=5.0)
        assert lookalike.wait(timeout=10) is not None                 # signalled (stop reaped it: no status here)
    finally:
        for p in (other, lookalike):
            p.kill()
            p.wait()
