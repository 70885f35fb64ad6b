"""Prometheus metrics of the policy server (the RM server and the interaction logger keep theirs in
their own modules)."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

_LAT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

REQUESTS = Counter("rlhf_policy_requests_total", "Generate calls by RPC and gRPC status", ["rpc", "status"])
LATENCY = Histogram("rlhf_policy_request_latency_seconds", "End-to-end latency of a generate call", ["rpc"],
                    buckets=_LAT)
TTFT = Histogram("rlhf_policy_time_to_first_token_seconds", "Submission to first token", buckets=_LAT)
ITL = Histogram("rlhf_policy_inter_token_latency_seconds", "Time between consecutive tokens of a sequence",
                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))
PROMPT_TOKENS = Counter("rlhf_policy_prompt_tokens_total", "Prompt tokens admitted")
PREFILL_TOKENS = Counter("rlhf_policy_prefill_tokens_total",
                         "Prompt tokens run through the model (once per request, whatever its n)")
GENERATED_TOKENS = Counter("rlhf_policy_generated_tokens_total", "Tokens generated")
BATCH_SIZE = Gauge("rlhf_policy_batch_size", "Sequences in the running batch after the last step")
QUEUE_DEPTH = Gauge("rlhf_policy_queue_depth", "Requests waiting for a slot")
KV_SLOTS = Gauge("rlhf_policy_kv_slots_in_use", "KV-cache slots held by live sequences")
KV_SLOTS_TOTAL = Gauge("rlhf_policy_kv_slots", "KV-cache slots in all")
MODEL_VERSION = Info("rlhf_policy_model", "The model version being served")
VERSION_EVENTS = Counter("rlhf_policy_version_events_total", "Hot-swap outcomes: swapped or refused", ["result"])
SERVED_REWARD = Histogram("rlhf_policy_served_reward", "RM reward of sampled served responses", ["version"],
                          buckets=(-4, -2, -1, -0.5, -0.25, 0, 0.25, 0.5, 1, 2, 4))
SERVED_KL = Histogram("rlhf_policy_served_kl_nats", "KL to the initial policy of sampled served responses, summed "
                      "over tokens", ["version"], buckets=(0.1, 0.5, 1, 2, 4, 8, 16, 32, 64, 128))
SERVED_SCORED = Counter("rlhf_policy_served_scored_total", "Served responses scored for reward/KL", ["version"])
SERVED_SCORING_DROPPED = Counter("rlhf_policy_served_scoring_dropped_total", "Samples dropped: scoring queue full")
SERVED_SCORING_ERRORS = Counter("rlhf_policy_served_scoring_errors_total", "Samples whose scoring failed")
ENGINE_STEPS = Counter("rlhf_policy_engine_steps_total", "Engine iterations (prefill and/or decode)")


def on_step(stats: dict) -> None:
    BATCH_SIZE.set(stats["batch"])
    KV_SLOTS.set(stats["batch"])
    QUEUE_DEPTH.set(stats["waiting"])
    ENGINE_STEPS.inc()
    PREFILL_TOKENS.inc(stats["prefill_tokens"])
