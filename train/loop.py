"""The trainer: Kafka feedback in, versioned checkpoints out (iterated online RLHF, Bai et al. 2022).

    python -m train.loop --bootstrap 127.0.0.1:19092 --store models/store --init-policy models/policy-v0
    torchrun --nproc_per_node 2 -m train.loop ...      (the same, data-parallel)

A cycle starts every --cycle-comparisons new training groups (comparisons, rankings, and pairs
made from ratings of one prompt) or --cycle-seconds (rules.cycle_due). Each cycle is a sequence of
named steps, every decision a pure function of train/rules.py:
  1. ingest: the groups so far, split by prompt into training and held-out (rules.is_heldout);
  2. RM update on the training groups, starting from the current RM (rm_update.py);
  3. RM gate: the candidate against the current and the best-so-far RM on the same held-out pairs,
     paired, with a standard error clustered by prompt (rules.rm_gate);
  4. probe: fresh samples of the current policy on a fixed set of prompts, scored by the new RM;
     their gain and offset make PPO's rewards mean 0, std 1 on the policy's own samples
     (rules.normalisation);
  5. PPO against the new RM with a per-token KL penalty to the initial policy (ppo.py);
  6. gates on fresh samples of the candidate policy on the same prompts: its KL to the initial
     policy under --kl-budget (rules.kl_gate), and its reward against its parent's under the new RM
     (rules.policy_gate);
  7. publish the policy, the RM (normalised so that samples of the initial policy score mean 0,
     std 1, comparable across versions) and PPO's state into the model store (checksummed manifest,
     fsync, rename), announce it on the model-updates topic, and only then commit the Kafka offsets
     it was trained on.
A cycle that fails a gate publishes nothing, says why, and the next cycle starts again from the
last published version. After kill -9 the trainer restarts from the newest verified version and
the committed offsets (feedback replayed since is absorbed by the store's event-id dedupe); seeds
come from the version trained from (rules.cycle_seed), so a restart does not repeat them.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

from common.config_cli import check_command_line, parse_config

from .config import TrainerConfig

if __name__ == "__main__":   # --help and a bad flag answered before torch and transformers are imported
    check_command_line(TrainerConfig, "python -m train.loop", __doc__)

import grpc  # noqa: E402
import torch  # noqa: E402
from kafka.errors import KafkaError  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from common import auth, model_store  # noqa: E402
from common.lifecycle import exit_now, startup_errors  # noqa: E402
from common.malloc import keep_freed_memory  # noqa: E402
from feedback.consumer import ConsumerConfig, FeedbackConsumer  # noqa: E402
from feedback.kafka_io import AckedProducer  # noqa: E402
from feedback.topics import MODEL_UPDATES, ensure_topics  # noqa: E402
from protos.build import ensure_generated  # noqa: E402

ensure_generated()
from rlhf.v1 import feedback_pb2 as fb  # noqa: E402
from rlhf.v1 import models_pb2  # noqa: E402
from rlhf.v1 import models_pb2_grpc as mgrpc  # noqa: E402

from serve import reward_model  # noqa: E402
from serve.loader import end_of_turn_ids  # noqa: E402
from serve.reward_model import rm_text  # noqa: E402

from . import dist, rules  # noqa: E402
from . import metrics as M  # noqa: E402
from .feedback_groups import GroupCounter, groups_from_records  # noqa: E402
from .ppo import PPOTrainer, PtxBatches, build_critic, ended, generate, load_ppo_state, ptx_sequences  # noqa: E402
from .ppo import run as run_ppo  # noqa: E402
from .ppo import save_ppo_state  # noqa: E402
from .rm_eval import score_texts  # noqa: E402
from .rm_update import Group, heldout_correctness, train_rm  # noqa: E402
from .sft import corpus  # noqa: E402

log = logging.getLogger("train.loop")
V0 = model_store.version_name(0)


# ---- models in and out of the store ----

@dataclass
class Models:
    version: str
    policy: object            # transformers causal LM (trained)
    tok: object
    ref: object               # frozen initial policy
    rm: object
    rm_tok: object
    groups_seen: int = 0      # training groups when this version was trained (cadence bookkeeping)
    rm_best: str = ""         # the version whose RM was the best so far on held-out pairs
    end_ids: tuple[int, ...] = ()   # a response ends at any of these: eos and the chat template's end of turn


def load_policy_hf(path: Path):
    policy = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return policy.eval(), tok


def rollout_rm_texts(tok, prompts: list[list[int]], responses: list[list[int]], end_ids) -> list[str]:
    """The RM's texts of token-level samples, as the RM sees served feedback: the prompt decoded
    with its special tokens (a chat prompt is the template's rendering, e.g. "<|im_start|>user...",
    and the served prompt text the feedback quotes keeps them), the response without them; a
    response that did not reach one of end_ids is marked truncated."""
    done = ended(responses, end_ids)
    return [rm_text(tok.decode(p, skip_special_tokens=False), tok.decode(r, skip_special_tokens=True),
                    truncated=not d) for p, r, d in zip(prompts, responses, done.tolist())]


def weights_checksum(model) -> float:
    """The sum of every parameter in float64: a cheap fingerprint to compare ranks' copies."""
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def policy_end_ids(path: Path, tok) -> tuple[int, ...]:
    """Where the policy server stops a response for this folder (serve.loader.end_of_turn_ids):
    rollouts stop, and count as ended, at the same tokens."""
    return end_of_turn_ids(tok, path, tok.eos_token_id)


def write_version(policy, tok, rm, rm_tok, ppo: PPOTrainer | None = None):
    """The files of one version (policy/ and rm/ HF folders, and critic/ with PPO's state when
    given), as a ModelStore.publish writer. The servers read policy/ and rm/ only."""
    def write(tmp: Path) -> None:
        policy.save_pretrained(tmp / "policy", safe_serialization=True)
        tok.save_pretrained(tmp / "policy")
        reward_model.save(rm, rm_tok, tmp / "rm")
        if ppo is not None:
            save_ppo_state(ppo, tmp)
    return write


def bootstrap_store(cfg: TrainerConfig, store: model_store.ModelStore) -> None:
    """v0000 = the initial policy plus an untrained RM head on the backbone."""
    if store.versions():
        return
    if not (Path(cfg.init_policy) / "config.json").is_file():
        raise FileNotFoundError(f"--init-policy {cfg.init_policy}: not a Hugging Face checkpoint folder (no config.json)")
    policy, tok = load_policy_hf(cfg.init_policy)
    torch.manual_seed(cfg.seed)
    rm, rm_tok = reward_model.build(cfg.rm_backbone or reward_model.default_backbone(), cfg.rm.max_length)
    store.publish(V0, write_version(policy, tok, rm, rm_tok), parent=None,
                  metrics={"feedback_events": 0, "groups_total": 0}, offsets={}, extra={"rm_best": V0})
    print(f"model store {store.root}: published the initial version {V0} from {cfg.init_policy}", flush=True)


def load_models(store: model_store.ModelStore, version: str, manifest: dict) -> Models:
    policy, tok = load_policy_hf(store.path(version) / "policy")
    ref, _ = load_policy_hf(store.path(V0) / "policy")
    rm, rm_tok = reward_model.load(store.path(version) / "rm")
    seen = manifest.get("metrics", {})
    return Models(version, policy, tok, ref, rm, rm_tok, int(seen.get("groups_total", seen.get("feedback_events", 0))),
                  manifest.get("rm_best", version), policy_end_ids(store.path(version) / "policy", tok))


# ---- data from the store ----

def recent_prompts(store, limit: int) -> list[str]:
    """The live prompt distribution: prompts of the most recent served interactions (unique);
    before anything was served, the prompts of the feedback itself."""
    seen, out = set(), []
    for blob in store.latest("interactions", limit * 4):
        p = fb.Interaction.FromString(blob).prompt
        if p and p not in seen:
            seen.add(p)
            out.append(p)
        if len(out) >= limit:
            return out
    if not out:
        for blob in store.latest("feedback", limit):
            f = fb.FeedbackRecord.FromString(blob).feedback
            p = getattr(f, f.WhichOneof("kind")).prompt
            if p not in seen:
                seen.add(p)
                out.append(p)
    return out


def split_heldout(groups: list[Group], frac: float) -> tuple[list[Group], list[Group]]:
    """(training, held-out) groups, split by prompt: no prompt is on both sides."""
    test = [g for g in groups if rules.is_heldout(g.prompt, frac)]
    return [g for g in groups if not rules.is_heldout(g.prompt, frac)], test


def load_ptx(cfg: TrainerConfig, tok) -> PtxBatches | None:
    if cfg.ppo.ptx_coef <= 0:
        return None
    return PtxBatches(ptx_sequences(corpus(cfg.ptx_data), tok, cfg.ppo.ptx_length), cfg.ppo.ptx_batch, cfg.seed)


def version_infos(store: model_store.ModelStore, serving: str, cache: dict) -> list[models_pb2.VersionInfo]:
    """Every version in the store, verified against its manifest (ListVersions). A version's files
    are immutable, so a result is kept in `cache` until their sizes or mtimes change."""
    out = []
    for v in store.versions():
        path = store.path(v)
        sig = tuple(sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file()))
        if cache.get(v, (None,))[0] != sig:
            try:
                model_store.verify(path)
                cache[v] = (sig, "")
            except model_store.CorruptCheckpoint as e:
                cache[v] = (sig, str(e))
        err = cache[v][1]
        out.append(models_pb2.VersionInfo(version=v, serving=v == serving, verified=not err, refused_reason=err))
    return out


# ---- the cycle ----

class Trainer:
    def __init__(self, cfg: TrainerConfig):
        self.cfg = cfg
        self.store = model_store.ModelStore(cfg.store)
        self.consumer = self.producer = None
        self.counter, self.counted_rowid = GroupCounter(), 0
        if dist.is_main():
            self.store.sweep()
            ensure_topics(cfg.bootstrap)   # first: Kafka out of reach fails the start before v0000 is written
            bootstrap_store(cfg, self.store)
            self.consumer = FeedbackConsumer(ConsumerConfig(db=cfg.db, bootstrap=cfg.bootstrap, group=cfg.group),
                                             commit_each_batch=False, manual_assign=True)
            self.producer = AckedProducer(cfg.bootstrap, client_id="trainer")
        dist.barrier()
        version, manifest = self.store.newest_verified()
        self.m = load_models(self.store, version, manifest)
        self.ptx = load_ptx(cfg, self.m.tok)
        self.ppo = self._new_ppo()
        # v0000's samples on the first cycle's probe prompts, that each published RM is normalised on: kept in
        # every version's manifest after that, so a restarted trainer normalises on the same ones
        ref = manifest.get("reference_samples")
        self.reference_samples: tuple[list, list] | None = (ref["prompts"], ref["responses"]) if ref else None
        self.cycles = 0
        self.last_cycle_at = time.monotonic()
        self.paused = threading.Event()
        self.in_cycle = threading.Event()   # set from a cycle's start until its CYCLE line is printed
        self.admin_lock = threading.Lock()
        self.verified: dict[str, tuple] = {}   # version -> (stat signature, error or ""), for ListVersions
        if cfg.start_paused:
            self.paused.set()
        if dist.is_main():
            self._recover(manifest)
            M.PUBLISHED_VERSION.set(model_store.version_number(version))

    def _new_ppo(self) -> PPOTrainer:
        """PPO for the current version: its critic and KL beta come from the version's critic/
        when it has one (after a restart or a refused cycle), else the critic is built new."""
        tr = PPOTrainer(self.m.policy, self.m.ref, build_critic(self.m.policy, self.m.rm), self.cfg.ppo,
                        self.m.tok.pad_token_id, self.m.end_ids, ptx=self.ptx)
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
        v = manifest["version"]
        msg = models_pb2.ModelUpdate(version=v, path=str(self.store.path(v).resolve()), parent=manifest.get("parent") or "",
                                     created_unix_ms=manifest.get("created_unix_ms", 0),
                                     metrics={k: float(x) for k, x in manifest.get("metrics", {}).items()
                                              if isinstance(x, (int, float))})
        self.producer.wait(self.producer.send_async(MODEL_UPDATES, v.encode(), msg.SerializeToString()))

    # -- ingest and cadence (rank 0) --
    def ingest(self) -> int:
        """Stores what has arrived: polls until a poll brings nothing (20 polls at most), so the cycle
        rule decides on what every partition held, not on the partitions one fetch happened to return
        (with one partition a poll returned all of it; with three, a cycle could start on a third and
        a --max-cycles trainer stop before storing the rest). Returns records seen."""
        n = 0
        for _ in range(20):
            got = self.consumer.poll_once(timeout_ms=200)
            n += got
            if not got:
                break
        lag = self.consumer.lag()
        if lag is not None:
            M.CONSUMER_LAG.set(lag)
        st = self.consumer.store
        for rowid, blob in st.records("feedback", since_rowid=self.counted_rowid):
            self.counter.add(blob)
            self.counted_rowid = rowid
        M.FEEDBACK_STORED.set(st.count())
        return n

    def versions_left(self, published: int | None = None) -> int | None:
        """Versions the trainer may still publish (None: no limit); `published`: the store's count, if known."""
        if not self.cfg.max_versions:
            return None
        published = len(self.store.versions()) if published is None else published
        return max(0, self.cfg.max_versions - (published - 1))

    def due(self) -> bool:
        published = len(self.store.versions())   # one listing of the store per poll
        return rules.cycle_due(self.counter.total - self.m.groups_seen, time.monotonic() - self.last_cycle_at,
                               paused=self.paused.is_set(), versions_left=self.versions_left(published),
                               cycle_groups=rules.groups_for_cycle(published, self.cfg.cycle_comparisons,
                                                                   self.cfg.first_cycle_comparisons),
                               min_groups=self.cfg.min_comparisons,
                               cycle_seconds=self.cfg.cycle_seconds)

    def cycle(self) -> dict:
        """One cycle on every rank; rank 0 brings the data and publishes."""
        t0 = time.time()
        self.cycles += 1
        payload = None
        if dist.is_main():
            st = self.consumer.store
            payload = {"offsets": self.consumer.positions(), "feedback_events": st.count(),
                       "groups_total": self.counter.total,
                       "groups": groups_from_records([blob for _, blob in st.records("feedback")]),
                       "prompts": recent_prompts(st, self.cfg.prompt_pool)}
        payload = dist.broadcast_object(payload)
        res = self._train(payload)
        res["seconds"] = round(time.time() - t0, 1)
        # every rank's view at the end of the cycle: the ranks that took part, and whether their
        # policies are still the same weights (DDP/FSDP keep them in step; a mismatch shows here)
        res["world_size"] = dist.world_size()
        res["ranks"] = dist.all_gather_list([{"rank": dist.rank(), "pid": os.getpid(), "seconds": res["seconds"],
                                              "policy_checksum": weights_checksum(self.m.policy)}])
        M.CYCLE_SECONDS.observe(res["seconds"])
        M.CYCLES.labels("published" if res.get("published") else "refused").inc()
        self.last_cycle_at = time.monotonic()
        return res

    def _train(self, payload: dict) -> dict:
        """Steps 1-7 of the module docstring."""
        cfg, m = self.cfg, self.m
        seed = rules.cycle_seed(cfg.seed, model_store.version_number(m.version), payload["groups_total"])
        train, test = split_heldout(payload["groups"], cfg.heldout)                       # 1
        res = {"cycle": self.cycles, "parent": m.version, "seed": seed, "feedback_events": payload["feedback_events"],
               "groups": len(payload["groups"]), "groups_total": payload["groups_total"], "heldout_groups": len(test)}
        rm, gate = self._rm_update_and_gate(train, test, seed, res)                      # 2-3
        if not gate.passed:
            return self._refuse(res, gate.why)
        prompts = [m.tok.encode(p, add_special_tokens=False)[-cfg.max_prompt_tokens:] for p in payload["prompts"]]
        prompts = [p for p in prompts if p]
        if len(prompts) < 2:
            return self._refuse(res, "fewer than 2 prompts to roll out (no interactions and no feedback prompts)")
        probe = self._probe_prompts(prompts, seed)
        if self.reference_samples is None:
            self.reference_samples = self._sample_reference(probe)
        parent = self.ppo.sample(probe, self._raw_scorer(rm), seed)                       # 4
        gain, offset = rules.normalisation(parent["scores"])
        res.update(norm_gain=gain, norm_offset=offset)
        stats = run_ppo(self.ppo, prompts, self._scorer(rm, gain, offset), seed)          # 5
        self._record_ppo(stats, res)
        if any(dist.all_gather_list([any(x.get("nan") for x in stats)])):   # some statistics are per rank
            return self._refuse(res, "PPO gate: a statistic is NaN or infinite")
        cand = self.ppo.sample(probe, self._raw_scorer(rm), seed)                         # 6
        for gate in (rules.kl_gate(cand["kl"], cfg.kl_budget),
                     rules.policy_gate(self._objective(cand, gain, offset), self._objective(parent, gain, offset),
                                       list(range(len(probe))), cfg.policy_gate_z)):
            gate = dist.broadcast_object(gate)
            res.update(gate.stats)
            if not gate.passed:
                return self._refuse(res, gate.why)
        res.update(eos_rate_fresh=float(cand["ended"].mean()), reward_fresh=float(self._objective(cand, gain, offset).mean()))
        return self._publish(rm, res, payload)                                             # 7

    def _rm_update_and_gate(self, train: list[Group], test: list[Group], seed: int, res: dict):
        """Steps 2-3: a candidate RM trained from the current one, and the paired gate against the
        current and the best-so-far RM on the same held-out pairs."""
        m = self.m
        current, clusters = heldout_correctness(m.rm, m.rm_tok, test)
        incumbents = {"current": current}
        if m.rm_best and m.rm_best != m.version and self.store.path(m.rm_best).exists():
            best_rm, best_tok = reward_model.load(self.store.path(m.rm_best) / "rm")
            incumbents["best"] = heldout_correctness(best_rm, best_tok, test)[0]
        rm = copy.deepcopy(m.rm)
        fit = train_rm(rm, m.rm_tok, train, self.cfg.rm, seed=seed)
        res.update(rm_loss=fit["rm_loss"], rm_steps=fit["rm_steps"])
        candidate, _ = heldout_correctness(rm, m.rm_tok, test)
        gate = rules.rm_gate(candidate, incumbents, clusters, self.cfg.rm_gate_z, self.cfg.rm_gate_min_pairs,
                             self.cfg.rm_gate_min_prompts)
        gate = dist.broadcast_object(gate)   # rank 0's verdict for all: ranks that disagreed would fall out of step
        res.update(gate.stats, rm_gate=gate.why)
        # the best so far on this held-out set, should the candidate be published
        accs = {"": float(candidate.mean()) if len(candidate) else 0.0, m.version: float(current.mean()) if len(current) else 0.0}
        if "best" in incumbents:
            accs[m.rm_best] = float(incumbents["best"].mean())
        top = max(accs.values())
        res["rm_best"] = "" if accs[""] >= top else max((v for v in accs if v), key=lambda v: accs[v])
        M.observe_cycle(res, {})
        return rm, gate

    def _probe_prompts(self, prompts: list[list[int]], seed: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(seed + 17)
        n = min(self.cfg.probe_prompts, len(prompts))
        return [prompts[i] for i in torch.randperm(len(prompts), generator=g)[:n].tolist()]

    def _objective(self, s: dict, gain: float, offset: float) -> torch.Tensor:
        """What PPO maximises for samples s (PPOTrainer.sample): the normalised reward, less the
        missing-EOS penalty."""
        return gain * (s["scores"] - offset) - self.cfg.ppo.missing_eos_penalty * (1 - s["ended"])

    def _record_ppo(self, stats: list[dict], res: dict) -> None:
        last = stats[-1]
        res.update({f"ppo_{k}": v for k, v in last.items()})
        res["ppo_reward_first"] = stats[0]["reward"]
        res["ppo_explained_variance_mean"] = sum(x["explained_variance"] for x in stats) / len(stats)
        res["kl_coef_end"] = self.ppo.kl_ctl.value
        res["ppo_trace"] = [[round(x["reward"], 5), round(x["kl"], 5)] for x in stats]   # (reward, KL) per iteration
        M.observe_cycle({}, last)

    def _publish(self, rm, res: dict, payload: dict) -> dict:
        """Step 7. The published RM is normalised on the initial policy's probe samples."""
        m = self.m
        rm.rcfg.gain, rm.rcfg.offset = self._reference_normalisation(rm)
        version = dist.broadcast_object(self.store.next_version() if dist.is_main() else None)
        best = res.pop("rm_best") or version
        if dist.is_main():
            metrics = {k: v for k, v in res.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            probe, resp = self.reference_samples
            path = self.store.publish(version, write_version(m.policy, m.tok, rm, m.rm_tok, self.ppo),
                                      parent=m.version, metrics=metrics, offsets=payload["offsets"],
                                      extra={"rm_best": best, "reference_samples": {"prompts": probe, "responses": resp}})
            self.announce(model_store.read_manifest(path))
            self.consumer.commit_offsets(payload["offsets"])
            M.PUBLISHED_VERSION.set(model_store.version_number(version))
        dist.barrier()
        m.rm, m.version, m.groups_seen, m.rm_best = rm, version, payload["groups_total"], best
        res.update(version=version, published=True, rm_best=best)
        return res

    def _sample_reference(self, probe: list[list[int]]) -> tuple[list, list]:
        """The initial policy's samples on the first cycle's probe prompts: drawn once in a run (then in
        each published manifest), each rank its share, then gathered (the same on every rank), rescored by
        each new RM to normalise it."""
        resp = generate(self.m.ref, dist.shard(probe), self.cfg.ppo, self.m.end_ids,
                        self.cfg.seed + 1_000_003 * dist.rank(), max(map(len, probe)) + self.cfg.ppo.max_new_tokens + 1)
        return probe, dist.all_gather_list(resp)

    def _reference_normalisation(self, rm) -> tuple[float, float]:
        """(gain, offset) putting the initial policy's probe samples at mean 0, std 1 under rm."""
        probe, resp = self.reference_samples
        return rules.normalisation(self._raw_scorer(rm)(probe, resp))

    def _texts(self, prompts: list[list[int]], responses: list[list[int]]) -> list[str]:
        return rollout_rm_texts(self.m.tok, prompts, responses, self.m.end_ids)

    def _raw_scorer(self, rm):
        return lambda prompts, responses: score_texts(rm, self.m.rm_tok, self._texts(prompts, responses))

    def _scorer(self, rm, gain: float, offset: float):
        raw = self._raw_scorer(rm)
        return lambda prompts, responses: gain * (raw(prompts, responses) - offset)

    def _refuse(self, res: dict, why: str) -> dict:
        """A failed gate: nothing is published; the policy goes back to the published version."""
        res.update(published=False, refused=why, version=self.m.version)
        res.pop("rm_best", None)
        log.warning("cycle %d publishes nothing: %s", self.cycles, why)
        version, manifest = self.m.version, model_store.read_manifest(self.store.path(self.m.version))
        seen, best = self.m.groups_seen, self.m.rm_best
        self.m = load_models(self.store, version, manifest)
        self.m.groups_seen = res["groups_total"] if dist.is_main() else seen   # wait for new data
        self.m.rm_best = best
        self.ppo = self._new_ppo()
        return res

    def list_versions(self) -> list[models_pb2.VersionInfo]:
        return version_infos(self.store, self.m.version, self.verified)

    def close(self) -> None:
        if self.consumer is not None:
            self.consumer.close()
            self.producer.close()


def serve_admin(tr: Trainer, port: int, tokens: str):
    """The trainer's AdminService: PauseTraining and ListVersions (admin role when auth is on)."""
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
            return models_pb2.VersionList(serving=tr.m.version, versions=tr.list_versions())

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=auth.EXCLUSIVE_PORT,
                         interceptors=auth.interceptors(tokens))
    mgrpc.add_AdminServiceServicer_to_server(Admin(), server)
    bound = auth.bind(server, f"127.0.0.1:{port}")
    server.start()
    print(f"trainer admin listening on 127.0.0.1:{bound}", flush=True)
    return server, f"127.0.0.1:{bound}"


def append_status(path: str, event: str, fields: dict) -> None:
    """One JSON line {"event", "unix_time", **fields} appended to the status file (--status-file)
    in a single write, then fsynced. A reader takes complete lines only: a line without its
    newline is a write still in progress."""
    if not path:
        return
    line = json.dumps({"event": event, "unix_time": round(time.time(), 3), **fields}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        data = line.encode()
        while data:   # os.write may write less than asked (a full disk): never leave half a line
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)


def progress_line(r: dict) -> str:
    f = lambda k, fmt="{:.3f}": fmt.format(r[k]) if isinstance(r.get(k), (int, float)) else "-"  # noqa: E731
    head = f"cycle {r['cycle']}: " + (f"published {r['version']}" if r.get("published")
                                      else f"refused ({r.get('refused')})")
    return (f"{head} | groups {r['groups_total']} | rm acc {f('rm_accuracy')} (current {f('rm_accuracy_current')}) "
            f"| ppo reward {f('ppo_reward_first')} -> {f('ppo_reward')} | fresh kl {f('kl', '{:.2f}')} "
            f"reward gain {f('reward_gain')} | beta {f('kl_coef_end', '{:.4f}')} "
            f"| value EV {f('ppo_explained_variance')} | {r['seconds']}s")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(TrainerConfig, argv, prog="python -m train.loop", description=__doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    keep_freed_memory()   # the same large buffers every step: no page faults on each (common/malloc.py)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist.init(torch.device("cpu"))   # the trainer keeps its tensors on the CPU: gloo, whatever the machine has
    stop = {"flag": False}
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.update(flag=True))
    # Kafka out of reach, a port in use, a missing or malformed file: one line, exit 1
    with startup_errors("python -m train.loop", also=(KafkaError,)):
        if dist.is_main():
            M.serve_metrics(cfg.metrics_port)
        tr = Trainer(cfg)
        admin, admin_at = (serve_admin(tr, cfg.admin_port, cfg.auth_tokens) if cfg.admin_port and dist.is_main()
                           else (None, ""))
    if dist.is_main():
        append_status(cfg.status_file, "ready", {"version": tr.m.version, "admin": admin_at,
                                                 "world_size": dist.world_size(), "pid": os.getpid()})
    said_limit = False
    try:
        while True:
            go = False
            stopping = stop["flag"] or (cfg.max_cycles > 0 and tr.cycles >= cfg.max_cycles)
            if dist.is_main() and not stopping:
                tr.ingest()
                with tr.admin_lock:   # a PauseTraining call sees either no cycle or this one as running
                    go = tr.due()
                    if go:
                        tr.in_cycle.set()
                if tr.versions_left() == 0 and not said_limit:
                    said_limit = True
                    print(f"reached --max-versions {cfg.max_versions}: no more cycles start", flush=True)
            if dist.is_main():   # a signal that came during ingest: stop now, not after a whole cycle
                stopping = stopping or stop["flag"]
                go = go and not stopping
            # rank 0 decides for every rank (its Kafka view, its admin thread's pause, its signal): a
            # rank deciding on its own would leave the others waiting in a collective
            go, stopping = dist.broadcast_object((go, stopping))
            if stopping:
                break
            if go:
                res = tr.cycle()
                if dist.is_main():
                    print(progress_line(res), flush=True)
                    append_status(cfg.status_file, "cycle", res)
                tr.in_cycle.clear()
    finally:
        if admin is not None:
            admin.stop(grace=1)
        tr.close()
        dist.destroy()
    return 0


if __name__ == "__main__":
    exit_now(main())   # everything closed in order above: skip the interpreter's teardown (see exit_now)
