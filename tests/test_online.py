"""End to end, tiny models, real Kafka: the online loop improves what users get; the trainer survives
kill -9 without losing feedback; a corrupt checkpoint announced on the topic is refused."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from common import model_store as ms
from tests.helpers import REPO, ServerProc, free_port, metric, start_feedback_service


@pytest.mark.slow
def test_main_job_tiny_random_policy_fast_ppo_publishes_three_measured_versions(tiny_hh_policy, tmp_path):
    """`python -m online` with a tiny random-init policy (so it runs in CI time): its own broker,
    trainer, servers, feedback service and simulator, the default pretrained MiniLM-L6 RM and the
    main job's trainer flags except PPO's (lr 1e-3, 12 iterations: a random 2-layer policy moves
    little at the default 3e-5). 3 versions asked, 3 published; the servers follow each; every
    version is measured through the pinned server on the same held-out prompts, and the last one's
    answers score higher than v0000's under the last RM (PPO did its job against the RM).

    Whether users get better answers is measured by bench/online_learning.py with the real default
    policy (every version's true score with intervals, 3 seeds): a random 2-layer policy's answers
    are noise, its RM stays near chance (0.50-0.67 held-out), and its true score moved by -0.01 to
    +0.12 from run to run, too little to assert on."""
    r = subprocess.run([sys.executable, "-m", "online", "--init-policy", str(tiny_hh_policy), "--rm-backbone", "",
                        "--cycles", "3", "--cycle-comparisons", "48", "--first-cycle-comparisons", "64",
                        "--measure-prompts", "64",
                        "--workdir", str(tmp_path / "run"), "--report", str(tmp_path / "report"), "--trainer-args",
                        "--rm.lr 5e-5 --rm.max-steps 16 --rm.batch-groups 8 --rm.max-length 64 "
                        "--ppo.lr 1e-3 --ppo.iterations 12 --ppo.rollouts 32 --ppo.missing-eos-penalty 0.5"],
                       cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["requests_failed"] == 0
    assert out["versions"] == ["v0000", "v0001", "v0002", "v0003"], out      # asked for 3, published 3
    score = out["true_score"]                                                   # version -> [mean, lo, hi]
    assert all(lo <= m <= hi for m, lo, hi in score.values())
    assert out["kl"]["v0000"] == 0 and out["kl"]["v0003"] > 0
    # the policy server swapped to every published version in order, then was pinned to each to measure it
    log = (tmp_path / "run" / "logs" / "policy-server.log").read_text()
    swaps = [line.rsplit("swapped to ", 1)[1].split()[0] for line in log.splitlines() if "swapped to" in line]
    assert swaps == ["v0001", "v0002", "v0003", "v0000", "v0001", "v0002", "v0003"], swaps
    assert re.search(r"\[cycle \d+\] -> v0003", r.stdout) and "[measure] v0003: true score" in r.stdout
    for png in ("served_true_score.png", "kl_per_version.png", "reward_vs_sqrt_kl.png", "ppo_per_cycle.png"):
        assert (tmp_path / "report" / png).stat().st_size > 5000
    rep = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert rep["reward_vs_sqrt_kl"]["points"] == 4 and sum(c["published"] for c in rep["cycles"]) == 3
    assert all(rep["versions"][v]["responses"] == 128 for v in out["versions"])
    reward = {v: rep["versions"][v]["rm_reward"] for v in out["versions"]}      # all under v0003's RM
    assert reward["v0003"] > reward["v0000"] + 0.2, reward


def test_status_file_reader_takes_complete_records_only(tmp_path):
    """The main job follows the trainer through its status file: a line still being written (no
    newline yet) is not read until it is complete, and nothing is read twice."""
    from online.trainer_status import TrainerStatus
    from train.loop import append_status
    path = tmp_path / "status.jsonl"
    st = TrainerStatus(path)
    assert st.poll() == []   # no file yet
    append_status(str(path), "ready", {"admin": "127.0.0.1:1", "world_size": 2})
    with open(path, "a") as f:
        f.write('{"event": "cycle", "cycle": 1')   # a write in progress
    assert [r["event"] for r in st.poll()] == ["ready"]
    assert st.ready()["admin"] == "127.0.0.1:1"
    with open(path, "a") as f:
        f.write(', "published": true}\n')
    append_status(str(path), "cycle", {"cycle": 2, "published": False})
    assert [(r["cycle"], r["published"]) for r in st.poll()] == [(1, True), (2, False)]
    assert st.poll() == [] and [r["cycle"] for r in st.of("cycle")] == [1, 2]
    assert TrainerStatus(tmp_path / "never.jsonl").ready() is None


def test_trainer_procs_runs_the_trainer_under_torchrun_with_the_same_interpreter(tmp_path):
    """--trainer-procs 2: torchrun's module under the main job's interpreter (ChildProcess runs
    sys.executable -m), a standalone rendezvous, the trainer's threads split between its ranks, the
    status file passed."""
    from online.__main__ import OnlineConfig, trainer_command
    module, one = trainer_command(OnlineConfig(), tmp_path, "127.0.0.1:9", tmp_path / "s.jsonl")
    assert module == "train.loop" and one[one.index("--threads") + 1] == "2"
    module, two = trainer_command(OnlineConfig(trainer_procs=2), tmp_path, "127.0.0.1:9", tmp_path / "s.jsonl")
    assert module == "torch.distributed.run"
    assert two[:5] == ["--standalone", "--nproc_per_node", "2", "-m", "train.loop"]
    assert two[two.index("--threads") + 1] == "1" and two[two.index("--status-file") + 1] == str(tmp_path / "s.jsonl")
    with pytest.raises(ValueError):
        OnlineConfig(trainer_procs=0)


def _announce(bootstrap: str, store: Path, version: str) -> None:
    from feedback.kafka_io import AckedProducer
    from feedback.topics import MODEL_UPDATES
    from rlhf.v1 import models_pb2
    p = AckedProducer(bootstrap, client_id="test-announcer")
    p.wait(p.send_async(MODEL_UPDATES, version.encode(), models_pb2.ModelUpdate(
        version=version, path=str((store / version).resolve())).SerializeToString()))
    p.close()


def _wait(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.5)
    raise TimeoutError(what)


@pytest.mark.slow
def test_trainer_kill_9_loses_no_feedback_and_corrupt_checkpoint_is_refused(kafka_broker, tiny_hh_policy, tiny_bert,
                                                                            tmp_path):
    from serve.client import PolicyClient
    from sim.traffic import SimConfig, Simulator
    store = tmp_path / "store"
    group = f"online-test-{time.time_ns()}"
    tr_args = ["--bootstrap", kafka_broker, "--group", group, "--store", str(store), "--db", str(tmp_path / "t.db"),
               "--init-policy", str(tiny_hh_policy), "--rm-backbone", str(tiny_bert), "--cycle-comparisons", "40",
               "--rm.lr", "1e-3", "--ppo.lr", "1e-3", "--ppo.iterations", "6", "--ppo.rollouts", "16", "--threads", "1",
               "--policy-gate-z", "1e9"]   # a crash-and-recovery test: every cycle publishes (tests/test_trainer.py)
    trainer = ServerProc("train.loop", tr_args, r"trainer resumed at", timeout=300)
    pport, mport = free_port(), free_port()
    policy = ServerProc("serve", ["--store", str(store), "--kafka-bootstrap", kafka_broker, "--port", str(pport),
                                  "--metrics-port", str(mport), "--threads", "1"], r"policy server listening", timeout=300)
    fbs, fport = start_feedback_service(kafka_broker)
    sim = Simulator(f"127.0.0.1:{pport}", f"127.0.0.1:{fport}",
                    [f"\n\nHuman: tell me about thing {i}\n\nAssistant:" for i in range(30)],
                    SimConfig(users=3, max_new_tokens=16, think_s=0.05)).start()
    try:
        _wait(lambda: "published v0001" in trainer.output(), 300, "first cycle")
        # kill -9 in the middle of the next cycle, then restart: the loop goes on
        _wait(lambda: "ppo:" in trainer.output().split("published v0001", 1)[-1], 300, "second cycle's PPO")
        os.kill(trainer.proc.pid, signal.SIGKILL)
        trainer.proc.wait()
        trainer = ServerProc("train.loop", tr_args, r"trainer resumed at (v\d+)", timeout=300)
        resumed = trainer.match.group(1)
        nxt = ms.version_name(ms.version_number(resumed) + 1)
        _wait(lambda: f"published {nxt}" in trainer.output(), 300, f"{nxt} after the restart")
        with PolicyClient(f"127.0.0.1:{pport}") as c:
            _wait(lambda: c.info().model_version == nxt, 60, f"the policy server serving {nxt}")

        # a corrupt checkpoint is refused and serving goes on
        bad = ms.version_name(ms.version_number(nxt) + 50)
        shutil.copytree(store / nxt, store / bad)
        m = json.loads((store / bad / "manifest.json").read_text())
        m["version"] = bad
        (store / bad / "manifest.json").write_text(json.dumps(m))
        w = next((store / bad / "policy").glob("*.safetensors"))
        w.write_bytes(w.read_bytes()[:-100] + b"\0" * 100)
        _announce(kafka_broker, store, bad)
        # the refused series exists only after the first refusal
        _wait(lambda: metric(mport, "rlhf_policy_version_events_total", 'result="refused"', default=0.0) >= 1, 60,
              "the refusal metric")
        with PolicyClient(f"127.0.0.1:{pport}") as c:   # still nxt (or a newer real one the trainer published)
            assert c.info().model_version != bad and ms.version_number(c.info().model_version) >= ms.version_number(nxt)
            assert c.generate("hello", max_new_tokens=4).model_version != bad
        assert "refusing version " + bad in policy.output()

        # admin: roll back (pinned to the previous version), then unpin (newest servable again)
        from rlhf.v1 import models_pb2 as mpb
        from rlhf.v1 import models_pb2_grpc as mgrpc
        with grpc.insecure_channel(f"127.0.0.1:{pport}") as ch, PolicyClient(f"127.0.0.1:{pport}") as c:
            admin = mgrpc.AdminServiceStub(ch)
            listed = admin.ListVersions(mpb.ListVersionsRequest(), timeout=30)
            assert listed.serving == c.info().model_version and not listed.pinned
            assert {v.version: v.verified for v in listed.versions}[bad] is False
            back = admin.Rollback(mpb.RollbackRequest(), timeout=120).serving
            assert back != listed.serving and c.generate("hello", max_new_tokens=2).model_version == back
            assert admin.ListVersions(mpb.ListVersionsRequest(), timeout=30).pinned
            # the trainer keeps publishing meanwhile: unpinned, the server is on nxt or newer
            n = ms.version_number(nxt)
            assert ms.version_number(admin.Unpin(mpb.UnpinRequest(), timeout=120).serving) >= n
            assert ms.version_number(c.generate("hello", max_new_tokens=2).model_version) >= n
    finally:
        sim.stop()
        s = sim.summary()
        for p in (trainer, policy, fbs):
            p.stop()
    assert s["requests_failed"] == 0, s["errors"]
    assert s["comparisons"] > 80
    # every acknowledged comparison reached the trainer's store across the kill -9 (give it the
    # records acknowledged after its last poll: it consumed them before stopping or they are in Kafka)
    stored = {r[0] for r in sqlite3.connect(tmp_path / "t.db").execute("SELECT event_id FROM feedback")}
    missing = sim.acked - stored
    if missing:  # acknowledged in the last moments: still in Kafka; a fresh trainer run picks them up
        from feedback.consumer import ConsumerConfig, FeedbackConsumer
        c = FeedbackConsumer(ConsumerConfig(db=tmp_path / "t.db", bootstrap=kafka_broker, group=group),
                             commit_each_batch=False, manual_assign=True)
        deadline, idle = time.monotonic() + 60, 0
        while time.monotonic() < deadline and idle < 3:
            n = c.poll_once()
            idle = idle + 1 if n == 0 and c.lag() == 0 else 0
        c.close()
        stored = {r[0] for r in sqlite3.connect(tmp_path / "t.db").execute("SELECT event_id FROM feedback")}
    if not sim.acked <= stored:
        _debug_where(kafka_broker, group, sim.acked - stored)
    assert sim.acked <= stored, len(sim.acked - stored)


def _debug_where(bootstrap, group, ids):
    from kafka import KafkaConsumer, TopicPartition
    from feedback import topics
    from rlhf.v1 import feedback_pb2 as fb
    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, consumer_timeout_ms=3000, group_id=group)
    tps = [TopicPartition(topics.FEEDBACK, p) for p in range(3)] + [TopicPartition(topics.DEAD_LETTERS, 0)]
    print("committed", {tp: c.committed(tp) for tp in tps})
    c.assign(tps)
    c.seek_to_beginning(*tps)
    for r in c:
        if r.topic == topics.FEEDBACK:
            eid = fb.FeedbackRecord.FromString(r.value).event_id
        else:
            d = fb.DeadLetter.FromString(r.value)
            try:
                eid = fb.FeedbackRecord.FromString(d.value).event_id
            except Exception:
                eid = ""
            if eid in ids:
                print("DLQ", eid, d.reason)
            continue
        if eid in ids:
            print("found", r.topic, r.partition, r.offset, eid)
    c.close()
