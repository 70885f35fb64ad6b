"""PPO for the online loop: rollouts with the serving engine, scores from the RM, a KL penalty
to the frozen initial policy, GAE and clipped updates (the math is in ppo_math.py).

One iteration, numbered as in lm-human-preference-details:
  1. rollout: the policy's current weights go into serve.engine (the server's own continuous-
     batching generation code and sampling kernels) and sample one response per prompt;
  2. score: the RM scores the decoded (prompt, response) texts (the trainer normalises them so the
     policy's own samples have mean 0, std 1); a response that hit max_new_tokens without its EOS
     loses `missing_eos_penalty` (lm-human-preferences' penalty_reward_value, TRL's
     missing_eos_penalty);
  3. forward the policy, reference and critic over prompt+response; per-token logprobs and the
     reference's entropy/KL come from the serve/kernels API (Triton on GPU, torch on CPU);
  4. rewards = score on the last token - beta * (logp - logp_ref) per token (Ziegler 2019 eq. 2);
  5. GAE (gamma 1, lambda 0.95), advantages whitened (lm-human-preferences); in a cycle's first
     iteration the critic is first fitted alone to the rollouts' Monte-Carlo returns
     (`value_warmup_epochs`), since the RM, and with it every return, changed since it last trained;
  6. ppo_epochs passes of shuffled minibatches: clipped policy loss - ent_coef * entropy
     (+ PPO-ptx on a fresh pretraining batch per step, InstructGPT eq. 2) with the policy's Adam,
     and the clipped value loss with the critic's own Adam (its own lr and clipping);
  7. the adaptive KL controller moves beta toward the target KL (Ziegler 2019 sec. 2.2), with a
     horizon that fits the online rate (a few hundred sequences, not Ziegler's 10,000).

Critic: InstructGPT initialises the value function from the RM. That is only possible when the RM
is a causal LM of the policy's own family and tokenizer; with the default encoder RM (MiniLM) the
critic starts from the policy's transformer body plus a zero-initialised scalar head (as TRL does
when no value model is given). `build_critic` makes the choice.

Data parallel: under torchrun each rank rolls out its shard of the prompts; the rollouts are
gathered so every rank computes the same advantages, and each minibatch is split across ranks
with token-sum losses over the global token count (dist.py), so DDP, or FSDP2 with
`parallel="fsdp"`, equals one process.
"""
from __future__ import annotations

import copy
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn as nn
from safetensors.torch import load_model, save_model
from tqdm import tqdm

from common.omp import release_thread_pool
from serve import kernels
from serve.engine import DoneEvent, Engine, EngineConfig, Request, SamplingSpec, end_id_set
from serve.model import from_hf

from . import dist
from . import ppo_math as P
from .config import PPOConfig
from .optim import clip_and_step


class ValueModel(nn.Module):
    """A transformer body plus a scalar head: (B, L) ids -> (B, L) values."""

    def __init__(self, body: nn.Module, head: nn.Linear):
        super().__init__()
        self.body, self.head = body, head

    def forward(self, input_ids, attention_mask):
        h = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(h).squeeze(-1)


def build_critic(policy, rm=None) -> ValueModel:
    """From the RM when it is a causal LM of the policy's family (InstructGPT), else from the policy."""
    if rm is not None and rm.rcfg.pooling == "last" and rm.backbone.config.model_type == policy.config.model_type \
            and rm.backbone.config.vocab_size == policy.config.vocab_size:
        return ValueModel(copy.deepcopy(rm.backbone), copy.deepcopy(rm.head))
    body = copy.deepcopy(policy.base_model)
    head = nn.Linear(policy.config.hidden_size, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return ValueModel(body, head)


CRITIC_DIR = "critic"


def save_ppo_state(tr: "PPOTrainer", folder) -> None:
    """The state PPO carries from one cycle to the next, into a version folder: the critic's
    weights (critic/model.safetensors) and the KL controller's beta (critic/state.json).
    The policy is the version's policy/ itself; Adam's moments are not kept (a resumed run
    starts them at zero, as each new PPOTrainer does)."""
    d = Path(folder) / CRITIC_DIR
    d.mkdir(parents=True, exist_ok=True)
    save_model(tr.critic, str(d / "model.safetensors"))
    (d / "state.json").write_text(json.dumps({"kl_coef": tr.kl_ctl.value}))


def load_ppo_state(tr: "PPOTrainer", folder) -> bool:
    """Restores what save_ppo_state wrote (False when the folder has none, e.g. v0000)."""
    d = Path(folder) / CRITIC_DIR
    if not (d / "model.safetensors").exists():
        return False
    load_model(tr.critic, str(d / "model.safetensors"), strict=True)   # raises on any mismatch
    tr.kl_ctl.value = float(json.loads((d / "state.json").read_text())["kl_coef"])
    return True


@dataclass
class Rollouts:
    """One iteration's samples, on every rank. Shapes: B sequences, L = longest prompt+response,
    T = longest response; `pos` (B, T) indexes the logits row that predicts each response token."""
    prompts: list[list[int]]
    responses: list[list[int]]
    input_ids: torch.Tensor      # (B, L) right-padded
    attention: torch.Tensor      # (B, L)
    pos: torch.Tensor            # (B, T)
    targets: torch.Tensor        # (B, T) response token ids (0 on padding)
    mask: torch.Tensor           # (B, T)
    scores: torch.Tensor = field(default=None)   # (B,)


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> Rollouts:
    B = len(prompts)
    L = max(len(p) + len(r) for p, r in zip(prompts, responses))
    T = max(1, max(len(r) for r in responses))
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    att = torch.zeros(B, L, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    tgt = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r)
        att[i, :n] = 1
        k = len(r)
        pos[i, :k] = torch.arange(len(p) - 1, len(p) - 1 + k)
        tgt[i, :k] = torch.tensor(r, dtype=torch.long)
        mask[i, :k] = 1
    return Rollouts(prompts, responses, ids, att, pos, tgt, mask)


def _rows(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x (B, L, ...) -> (B, T, ...) at the positions pos (B, T)."""
    idx = pos.view(*pos.shape, *([1] * (x.dim() - 2))).expand(*pos.shape, *x.shape[2:])
    return x.gather(1, idx)


def response_logits(model, ro: Rollouts, temperature: float) -> torch.Tensor:
    """(B, T, V) tempered logits that predict each response token."""
    out = model(input_ids=ro.input_ids, attention_mask=ro.attention).logits
    return _rows(out, ro.pos) / temperature


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, T, V), (B, T) -> (B, T) through the kernels API (differentiable)."""
    B, T, V = logits.shape
    return kernels.token_logprobs(logits.reshape(B * T, V), targets.reshape(-1)).view(B, T)


@torch.no_grad()
def generate(policy, prompts: list[list[int]], cfg: PPOConfig, end_ids: Iterable[int] | int | None, seed: int,
             max_context: int) -> list[list[int]]:
    """Samples one response per prompt with serve.engine (the serving code path); a response stops
    at any of end_ids (eos and the chat template's end-of-turn tokens, as the policy server's)."""
    if not prompts:
        return []
    model = from_hf(dist.unwrap(policy))   # a copy of the weights: casting it leaves the policy fp32
    if cfg.rollout_dtype != "float32":
        model = model.to(getattr(torch, cfg.rollout_dtype))
    ecfg = EngineConfig(max_batch_size=min(64, len(prompts)), max_queue=len(prompts) + 1,
                        max_context=max_context)
    engine = Engine(model, ecfg, end_ids, decode=lambda ids: "", model_version="rollout").start()
    # this thread waits while the engine's runs the model: one live OpenMP pool (common/omp.py); after
    # Engine(), whose KV cache fill is itself a parallel op on this thread
    release_thread_pool()
    try:
        reqs = [engine.submit(Request(prompt=p, stream=False, spec=SamplingSpec(
            temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=seed * 100_003 + i)))
            for i, p in enumerate(prompts)]
        for r in reqs:
            ev = r.events.get(timeout=600)
            if not isinstance(ev, DoneEvent):
                raise RuntimeError(f"rollout generation failed: {ev}")
    finally:
        engine.stop()
    # the EOS token stays in the response: the policy is credited for choosing to stop
    return [r.seqs[0].out for r in reqs]


@torch.no_grad()
def token_stats(policy, ref, ro: Rollouts, temperature: float = 1.0) -> dict:
    """Per response token (B, T), masked: the policy's entropy, the exact KL(policy || ref) over
    the vocabulary, and the logprobs of the sampled tokens under both (serve/kernels.entropy_kl),
    all of the tempered distributions. kl_exact.sum(1) is a response's KL in nats."""
    logits = response_logits(policy, ro, temperature)
    ref_logits = response_logits(ref, ro, temperature)
    B, T, V = logits.shape
    ent, kl_exact, logp, ref_logp = (x.view(B, T) * ro.mask for x in kernels.entropy_kl(
        logits.reshape(B * T, V), ref_logits.reshape(B * T, V), ro.targets.reshape(-1)))
    return {"entropy": ent, "kl_exact": kl_exact, "logp": logp, "ref_logp": ref_logp}


class PtxBatches:
    """PPO-ptx's pretraining data: a fresh batch for every optimiser step (InstructGPT eq. 2 takes
    the expectation over the pretraining distribution, not over a few texts fixed for a cycle).
    Under DDP each rank draws its own share of the global batch from its own stream."""

    def __init__(self, seqs: list[list[int]], batch: int, seed: int):
        self.seqs = [s for s in seqs if len(s) >= 2]
        if not self.seqs:
            raise ValueError("PPO-ptx needs pretraining sequences of at least 2 tokens")
        self.per_rank = max(1, len(dist.shard(list(range(batch)))))
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Each rank's stream from `seed`: `run` passes the cycle's (rules.cycle_seed), so a restarted
        trainer does not replay the batches of its first cycles."""
        self.rng = random.Random(seed * 7919 + dist.rank())

    def draw(self) -> list[list[int]]:
        return self.rng.sample(self.seqs, min(self.per_rank, len(self.seqs)))


def ptx_sequences(texts: list[str], tok, length: int) -> list[list[int]]:
    """Pretraining texts -> token sequences of at most `length` tokens (their start)."""
    return [ids[:length] for ids in tok(texts, add_special_tokens=False)["input_ids"]]


def ended(responses: list[list[int]], end_ids: Iterable[int] | int | None) -> torch.Tensor:
    """(B,) 1.0 where a response ended with one of end_ids (the engine stops there), else 0."""
    ends = end_id_set(end_ids)
    return torch.tensor([float(len(r) > 0 and r[-1] in ends) for r in responses])


class PPOTrainer:
    """Holds policy, reference, critic, their optimisers and the KL controller across iterations."""

    def __init__(self, policy, ref, critic: ValueModel, cfg: PPOConfig, pad_id: int,
                 end_ids: Iterable[int] | int | None, ptx: PtxBatches | None = None):
        self.cfg, self.pad_id, self.end_ids, self.ptx = cfg, pad_id, end_ids, ptx
        self.policy, self.ref, self.critic = policy, ref.eval(), critic
        for p in self.ref.parameters():
            p.requires_grad_(False)
        # the modules the update steps run on (policy and critic themselves, DDP around them, or
        # FSDP2 copies trained inside dist.synced); rollouts and scoring read policy and critic
        self.policy_d, self.critic_d = dist.wrap(policy, cfg.parallel), dist.wrap(critic, cfg.parallel)
        # two optimisers: the critic has its own learning rate and clipping (a shared Adam at the
        # policy's lr left a zero-initialised value head near 0 for whole cycles)
        self.opt = torch.optim.Adam(self.policy_d.parameters(), lr=cfg.lr, eps=1e-5, fused=True)
        self.critic_opt = torch.optim.Adam(self.critic_d.parameters(), lr=cfg.critic_lr, eps=1e-5, fused=True)
        self.kl_ctl = (P.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target > 0
                       else P.FixedKLController(cfg.kl_coef))

    def rollout(self, prompts: list[list[int]], score_fn: Callable, seed: int) -> Rollouts:
        """Steps 1-2: this rank's share generated and scored, then gathered (rank order). The
        missing-EOS penalty is taken off the scores here."""
        mine = dist.shard(prompts)
        max_ctx = max(len(p) for p in prompts) + self.cfg.max_new_tokens + 1
        resp = generate(self.policy, mine, self.cfg, self.end_ids, seed * 1000 + dist.rank(), max_ctx)
        scores = score_fn(mine, resp).float().tolist() if mine else []
        rows = dist.all_gather_list(list(zip(mine, resp, scores)))
        ro = pack([r[0] for r in rows], [r[1] for r in rows], self.pad_id)
        done = ended(ro.responses, self.end_ids)
        ro.scores = torch.tensor([r[2] for r in rows]) - self.cfg.missing_eos_penalty * (1 - done)
        return ro

    def logprobs_and_kl(self, ro: Rollouts) -> dict:
        """Step 3 for the policy and the reference (token_stats)."""
        self.policy.eval()
        return token_stats(self.policy, self.ref, ro, self.cfg.temperature)

    @torch.no_grad()
    def values(self, ro: Rollouts) -> torch.Tensor:
        """(B, T) the critic's values at the positions that predict each response token."""
        return _rows(self.critic(ro.input_ids, ro.attention).unsqueeze(-1), ro.pos)[..., 0] * ro.mask

    @torch.no_grad()
    def advantages(self, ro: Rollouts, lp: dict | None = None) -> dict:
        """Steps 3-5 on the whole batch (identical on every rank)."""
        lp = self.logprobs_and_kl(ro) if lp is None else lp
        values = self.values(ro)
        rewards, kl = P.kl_penalized_rewards(ro.scores, lp["logp"], lp["ref_logp"], ro.mask, self.kl_ctl.value)
        adv, returns = P.gae(rewards, values, ro.mask, self.cfg.gamma, self.cfg.lam)
        mc_returns, _ = P.gae(rewards, torch.zeros_like(values), ro.mask, self.cfg.gamma, 1.0)  # reward-to-go
        return {"logp": lp["logp"], "values": values, "adv": P.whiten(adv, ro.mask), "returns": returns,
                "mc_returns": mc_returns, "kl_seq": kl.sum(1), "kl_exact_seq": lp["kl_exact"].sum(1),
                "entropy": P.masked_mean(lp["entropy"], ro.mask),
                # how much of the returns' variance the critic predicted before it saw this batch
                "explained_variance": float(P.explained_variance(values, mc_returns, ro.mask))}

    def fit_values(self, ro: Rollouts, returns: torch.Tensor, epochs: int, seed: int) -> float:
        """Critic-only regression on (B, T) returns (value warm-up): `epochs` passes of shuffled
        minibatches, unclipped squared error, the critic's optimiser. Returns the last pass's loss."""
        B = ro.input_ids.shape[0]
        g = torch.Generator().manual_seed(seed)
        losses: list[float] = []
        with dist.synced(self.critic_d, self.critic):
            for _ in range(epochs):
                losses = []
                for mb in torch.randperm(B, generator=g).split(self.cfg.minibatch):
                    n_tok = float(ro.mask[mb].sum())
                    idx = torch.tensor(dist.shard(mb.tolist()), dtype=torch.long)
                    sub = _trimmed(ro, idx)
                    v = _rows(self.critic_d(sub.input_ids, sub.attention).unsqueeze(-1), sub.pos)[..., 0]
                    T = sub.mask.shape[1]
                    loss = P.masked_total(0.5 * (v - returns[idx, :T]) ** 2, sub.mask, n_tok / dist.world_size())
                    self.critic_opt.zero_grad(set_to_none=True)
                    loss.backward()
                    clip_and_step(self.critic_opt, self.critic_d.parameters(), self.cfg.critic_max_grad_norm)
                    losses.append(dist.global_sum(loss.item()) / dist.world_size())
        return sum(losses) / max(1, len(losses))

    def update(self, ro: Rollouts, a: dict, seed: int) -> dict:
        """Step 6: ppo_epochs x shuffled global minibatches, split across ranks."""
        cfg = self.cfg
        # eval mode throughout: dropout off, as in TRL / lm-human-preferences (it would make
        # the ratio pi/pi_old noisy at the first step); gradients still flow
        B = ro.input_ids.shape[0]
        g = torch.Generator().manual_seed(seed)
        stats: dict[str, list[float]] = {k: [] for k in ("pg_loss", "vf_loss", "clipfrac", "approx_kl")}
        with dist.synced(self.policy_d, self.policy), dist.synced(self.critic_d, self.critic):
            for _ in range(cfg.ppo_epochs):
                perm = torch.randperm(B, generator=g)
                for s in range(0, B, cfg.minibatch):
                    mb = perm[s:s + cfg.minibatch]
                    n_tok = float(ro.mask[mb].sum())
                    idx = torch.tensor(dist.shard(mb.tolist()), dtype=torch.long)
                    st = self._step(ro, a, idx, n_tok)
                    for k, v in st.items():
                        stats.setdefault(k, []).append(v)
        return {k: sum(v) / len(v) for k, v in stats.items() if v}

    def _step(self, ro: Rollouts, a: dict, idx: torch.Tensor, n_tok: float) -> dict:
        cfg = self.cfg
        sub = _trimmed(ro, idx)
        T, m = sub.mask.shape[1], sub.mask
        w = dist.world_size()
        logits = response_logits(self.policy_d, sub, cfg.temperature)
        logp = token_logprobs(logits, sub.targets)
        pg, pst = P.policy_loss(logp, a["logp"][idx, :T], a["adv"][idx, :T], m, cfg.clip, denom=n_tok / w)
        loss = pg
        if cfg.ent_coef > 0:
            ent = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
            loss = loss - cfg.ent_coef * (ent * m).sum() / (n_tok / w)
        if cfg.ptx_coef > 0 and self.ptx is not None:
            loss = loss + self._ptx_loss(self.ptx.draw())
        values = _rows(self.critic_d(sub.input_ids, sub.attention).unsqueeze(-1), sub.pos)[..., 0]
        vf, _ = P.value_loss(values, a["values"][idx, :T], a["returns"][idx, :T], m, cfg.clip_value, denom=n_tok / w)
        self.opt.zero_grad(set_to_none=True)
        self.critic_opt.zero_grad(set_to_none=True)
        (loss + cfg.vf_coef * vf).backward()
        clip_and_step(self.opt, self.policy_d.parameters(), cfg.max_grad_norm)
        clip_and_step(self.critic_opt, self.critic_d.parameters(), cfg.critic_max_grad_norm)
        return {"pg_loss": dist.global_sum(pg.item()) / w, "vf_loss": dist.global_sum(vf.item()) / w,
                "clipfrac": float(pst["clipfrac"]), "approx_kl": float(pst["approx_kl"])}

    def _ptx_loss(self, seqs: list[list[int]]) -> torch.Tensor:
        """PPO-ptx on this rank's pretraining batch (next-token log-likelihood, token mean)."""
        ro = pack([s[:1] for s in seqs], [s[1:] for s in seqs], self.pad_id)
        logp = token_logprobs(response_logits(self.policy_d, ro, 1.0), ro.targets)
        return P.ptx_loss(logp, ro.mask, self.cfg.ptx_coef)

    def iteration(self, prompts: list[list[int]], score_fn: Callable, seed: int, warmup: bool = False) -> dict:
        """Steps 1-7 (with the value warm-up first when `warmup`). Returns this iteration's stats,
        with where its time went: generation, scoring, the teacher-forced passes and advantages
        (logprobs of policy, reference and critic), and the PPO updates."""
        scoring = [0.0]

        def timed_score(*args):
            t = time.perf_counter()
            out = score_fn(*args)
            scoring[0] += time.perf_counter() - t
            return out
        t0 = time.perf_counter()
        ro = self.rollout(prompts, timed_score, seed)
        t1 = time.perf_counter()
        lp = self.logprobs_and_kl(ro)
        a = self.advantages(ro, lp)
        t2 = time.perf_counter()
        ev = a["explained_variance"]      # the critic's, on rollouts it has not been fitted to
        extra = {}
        if warmup and self.cfg.value_warmup_epochs > 0:
            extra["value_warmup_loss"] = self.fit_values(ro, a["mc_returns"], self.cfg.value_warmup_epochs, seed)
            a = self.advantages(ro, lp)
            extra["value_warmup_ev"] = a["explained_variance"]
        t3 = time.perf_counter()
        up = self.update(ro, a, seed)
        seconds = {"seconds_generate": t1 - t0 - scoring[0], "seconds_score": scoring[0],
                   "seconds_logprobs": t2 - t1, "seconds_value_warmup": t3 - t2,
                   "seconds_update": time.perf_counter() - t3}
        kl = float(a["kl_seq"].mean())
        beta = self.kl_ctl.value
        self.kl_ctl.update(kl, len(prompts))
        out = {"reward": float(ro.scores.mean()), "kl": kl, "kl_exact": float(a["kl_exact_seq"].mean()),
               "entropy": float(a["entropy"]), "kl_coef": beta, "explained_variance": ev,
               "eos_rate": float(ended(ro.responses, self.end_ids).mean()),
               "response_tokens": float(ro.mask.sum(1).mean()), **extra, **up, **seconds}
        if not all(math.isfinite(v) for v in out.values()):
            out["nan"] = 1.0
        return out

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], score_fn: Callable, seed: int) -> dict:
        """Fresh samples of the policy as it is now, one per prompt (in order): (N,) scores from
        score_fn (no penalty), exact KL to the reference summed over each response, and whether
        each ended with EOS. For the trainer's normalisation and its gates."""
        ro = self.rollout(prompts, score_fn, seed)
        lp = self.logprobs_and_kl(ro)
        done = ended(ro.responses, self.end_ids)
        return {"scores": ro.scores + self.cfg.missing_eos_penalty * (1 - done), "kl": lp["kl_exact"].sum(1),
                "ended": done, "responses": ro.responses}


def _trimmed(ro: Rollouts, idx: torch.Tensor) -> Rollouts:
    """The rows idx of ro, response columns cut to the longest of them."""
    T = int(ro.mask[idx].sum(1).max().item()) if len(idx) else 1
    return Rollouts(None, None, ro.input_ids[idx], ro.attention[idx], ro.pos[idx, :T], ro.targets[idx, :T],
                    ro.mask[idx, :T])


def run(trainer: PPOTrainer, prompts: list[list[int]], score_fn: Callable, seed: int, progress: bool = True) -> list[dict]:
    """cfg.iterations iterations over random draws of the prompt pool (the first with the value
    warm-up); one stats dict each. `seed` (the cycle's, rules.cycle_seed) fixes the draws."""
    cfg = trainer.cfg
    g = torch.Generator().manual_seed(seed)
    if trainer.ptx is not None:
        trainer.ptx.reseed(seed)
    out = []
    bar = tqdm(range(cfg.iterations), desc="ppo", disable=not (progress and dist.is_main()), file=sys.stderr,
               leave=False)
    for it in bar:
        pick = torch.randint(len(prompts), (cfg.rollouts,), generator=g).tolist()
        st = trainer.iteration([prompts[i] for i in pick], score_fn, seed=seed + it, warmup=it == 0)
        out.append(st)
        bar.set_postfix(reward=f"{st['reward']:.3f}", kl=f"{st['kl']:.2f}")
    return out
