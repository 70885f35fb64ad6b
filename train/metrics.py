"""Prometheus metrics of the trainer (the only train/ module that imports prometheus_client)."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from common.metrics_http import serve_metrics  # noqa: F401  (train.loop starts it from here)

RM_LOSS = Gauge("rlhf_trainer_rm_loss", "Reward-model loss at the end of the last RM update")
RM_ACCURACY = Gauge("rlhf_trainer_rm_heldout_accuracy_ratio", "Held-out pairwise accuracy of the last RM candidate")
PPO_REWARD = Gauge("rlhf_trainer_ppo_reward", "Mean RM reward of the last PPO iteration's rollouts")
PPO_KL = Gauge("rlhf_trainer_ppo_kl_nats", "Mean per-sequence KL to the reference policy, last iteration")
PPO_ENTROPY = Gauge("rlhf_trainer_ppo_entropy_nats", "Mean per-token policy entropy, last iteration")
PPO_CLIPFRAC = Gauge("rlhf_trainer_ppo_clipfrac_ratio", "Fraction of clipped policy ratios, last iteration")
PPO_VALUE_LOSS = Gauge("rlhf_trainer_ppo_value_loss", "Critic loss, last iteration")
PPO_KL_COEF = Gauge("rlhf_trainer_ppo_kl_coef", "Current beta of the KL penalty")
CYCLE_SECONDS = Histogram("rlhf_trainer_cycle_duration_seconds", "Wall time of a training cycle",
                          buckets=(5, 10, 30, 60, 120, 300, 600, 1200, 3600))
CYCLES = Counter("rlhf_trainer_cycles_total", "Training cycles by outcome", ["result"])
PUBLISHED_VERSION = Gauge("rlhf_trainer_published_version", "Number of the newest published version")
CONSUMER_LAG = Gauge("rlhf_trainer_consumer_lag_records", "Records behind the end of the input topics")
FEEDBACK_STORED = Gauge("rlhf_trainer_feedback_events", "Feedback events in the trainer's store")


def observe_cycle(rm: dict, ppo: dict) -> None:
    if "rm_loss" in rm:
        RM_LOSS.set(rm["rm_loss"])
    if "rm_accuracy" in rm:
        RM_ACCURACY.set(rm["rm_accuracy"])
    if ppo:
        PPO_REWARD.set(ppo["reward"])
        PPO_KL.set(ppo["kl"])
        PPO_ENTROPY.set(ppo["entropy"])
        PPO_CLIPFRAC.set(ppo.get("clipfrac", 0.0))
        PPO_VALUE_LOSS.set(ppo.get("vf_loss", 0.0))
        PPO_KL_COEF.set(ppo["kl_coef"])
