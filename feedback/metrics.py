"""Prometheus metrics of the feedback service and the trainer-side consumer."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from common.metrics_http import serve_metrics  # noqa: F401  (the service and the consumer start it from here)

EVENTS = Counter("rlhf_feedback_events_total", "Feedback accepted and acknowledged by Kafka", ["kind", "source"])
REJECTED = Counter("rlhf_feedback_rejected_total", "Feedback refused", ["reason"])
PRODUCE_LATENCY = Histogram("rlhf_feedback_kafka_produce_latency_seconds", "Send to broker acknowledgement",
                            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
CONSUMED = Counter("rlhf_feedback_consumed_total", "Records stored by the consumer", ["topic"])
DUPLICATES = Counter("rlhf_feedback_duplicates_total", "Records skipped as already stored (same event id)")
DEAD_LETTERS = Counter("rlhf_feedback_dead_letters_total", "Records sent to the dead-letter topic", ["reason"])
CONSUMER_LAG = Gauge("rlhf_feedback_consumer_lag_records", "Records behind the end of the topic", ["topic"])
