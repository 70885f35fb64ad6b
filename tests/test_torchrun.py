"""The whole trainer under torchrun (2 ranks, gloo on the CPU), end to end: real broker, tiny
models, two cycles, two published versions that load, and both ranks in every cycle."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import time

import pytest

from common import model_store as ms
from online.trainer_status import TrainerStatus
from tests.helpers import REPO
from tests.test_trainer import _produce, _trainer_args


def _wait_records(status: TrainerStatus, event: str, n: int, proc: subprocess.Popen, log, timeout: float) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status.poll()
        if len(status.of(event)) >= n:
            return status.of(event)
        if proc.poll() is not None and not status.poll():
            break
        time.sleep(0.5)
    log.flush()
    raise AssertionError(f"{n} {event} record(s) expected, got {len(status.of(event))}:\n"
                         f"{open(log.name).read()[-4000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_trainer_under_torchrun_two_ranks_publishes_two_versions(kafka_broker, tiny_hh_policy, tiny_bert, tmp_path,
                                                                  parallel):
    """The publish-protocol regime of tests/test_trainer.py (gates opened: this is about the ranks
    staying in step through whole cycles, not about what the gates decide), with 1 thread a rank;
    the RM and PPO steps data-parallel (DDP) or sharded (FSDP2: what a rank publishes is gathered
    from the shards)."""
    from transformers import AutoModelForCausalLM

    from serve import reward_model
    from train.loop import weights_checksum
    status = TrainerStatus(tmp_path / "status.jsonl")
    seed = 41 if parallel == "ddp" else 43   # fresh event ids: the broker is shared, and the trainer reads the
    _produce(kafka_broker, 60, seed=seed)    # topic from its start and drops ids already seen (dedupe)
    args = [*_trainer_args(tmp_path, kafka_broker, tiny_hh_policy, tiny_bert, f"torchrun-{time.time_ns()}", cycles=2),
            "--threads", "1", "--status-file", str(status.path), "--rm-gate-min-pairs", "1000000", "--kl-budget", "1e9",
            "--rm.parallel", parallel, "--ppo.parallel", parallel]
    log = open(tmp_path / "trainer.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "train.loop", *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        ready = _wait_records(status, "ready", 1, proc, log, 300)[0]
        assert ready["world_size"] == 2 and ready["version"] == "v0000"
        _wait_records(status, "cycle", 1, proc, log, 300)
        _produce(kafka_broker, 60, seed=seed + 1)   # the second cycle's feedback
        cycles = _wait_records(status, "cycle", 2, proc, log, 300)
        assert proc.wait(timeout=120) == 0   # --max-cycles 2: every rank leaves the loop and exits
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()

    assert [(c["published"], c["version"]) for c in cycles] == [(True, "v0001"), (True, "v0002")], cycles
    for c in cycles:   # both ranks reached the end of every cycle, holding the same policy weights
        assert c["world_size"] == 2 and [r["rank"] for r in c["ranks"]] == [0, 1]
        assert len({r["pid"] for r in c["ranks"]}) == 2
        assert c["ranks"][0]["policy_checksum"] == c["ranks"][1]["policy_checksum"]
    store = ms.ModelStore(tmp_path / "store")
    assert store.versions() == ["v0000", "v0001", "v0002"] and ms.verify(store.path("v0002"))["parent"] == "v0001"
    # the published weights load, and they are the weights the ranks trained
    for c in cycles:
        policy = AutoModelForCausalLM.from_pretrained(store.path(c["version"]) / "policy", local_files_only=True)
        assert math.isclose(weights_checksum(policy), c["ranks"][0]["policy_checksum"], rel_tol=1e-12)
        rm, rm_tok = reward_model.load(store.path(c["version"]) / "rm")
        assert rm(**reward_model.encode(rm_tok, ["\n\nHuman: hi\n\nAssistant: hello"], rm.rcfg)).isfinite().all()
    assert cycles[0]["ranks"][0]["policy_checksum"] != cycles[1]["ranks"][0]["policy_checksum"]   # PPO moved it
