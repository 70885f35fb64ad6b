"""Topic names and their creation. Every topic is created explicitly (auto-create is off).

Keys: a feedback record is keyed by its event id (the dedupe key), so a client's retry of one
event lands on the same partition as the first try, behind it, and reaches the same member of the
consumer group. Keying by prompt would buy per-prompt order, which nothing downstream reads (the
store and the trainer batch by event), and would pile popular prompts onto one partition.
"""
from __future__ import annotations

import logging

from kafka import KafkaAdminClient
from kafka.errors import TopicAlreadyExistsError

FEEDBACK = "rlhf.feedback.v1"          # FeedbackRecord, key = event_id
INTERACTIONS = "rlhf.interactions.v1"  # Interaction, key = response_id
DEAD_LETTERS = "rlhf.feedback.dlq.v1"  # DeadLetter, key = original key
MODEL_UPDATES = "rlhf.model-updates.v1"

# Partitions per topic: 3 for the two data topics, one leader per node of a 3-node cluster and up to
# 3 consumers of one group sharing the work; 1 where order matters (model updates) or volume is low
# (dead letters). Partitions can be added later (kafka-topics --alter), never removed.
ALL = {FEEDBACK: 3, INTERACTIONS: 3, DEAD_LETTERS: 1, MODEL_UPDATES: 1}

log = logging.getLogger(__name__)


def replication_for(brokers: int) -> tuple[int, int]:
    """(replication factor, min.insync.replicas) for a cluster of `brokers` nodes. Three copies
    with two in sync: an acks=all write is on two nodes before it is acknowledged, so losing any
    one node loses no acknowledged write, and writes go on while one node is down."""
    if brokers < 1:
        raise ValueError(f"brokers must be >= 1, got {brokers}")
    rf = min(3, brokers)
    return rf, (2 if rf >= 3 else 1)


def ensure_topics(bootstrap: str, partitions: dict[str, int] | None = None, timeout_s: float = 30.0,
                  brokers: int | None = None) -> None:
    """Creates the project's topics if they do not exist (idempotent; existing topics are left as
    they are), replicated per replication_for(brokers); brokers=None: the live brokers the cluster
    reports now, with a warning when that makes fewer than 3 copies (pass the cluster's size when
    the caller knows it, as the main job does for its bundled broker)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000))
    try:
        existing = set(admin.list_topics())
        missing = {name: n for name, n in (partitions or ALL).items() if name not in existing}
        if not missing:
            return
        counted = brokers is None
        if counted:
            brokers = sum(1 for b in admin.describe_cluster()["brokers"] if not b.get("is_fenced"))
        rf, min_isr = replication_for(brokers)
        if rf < 3:   # counted: a node down at creation would leave a bigger cluster's topics with fewer copies for good
            log.log(logging.WARNING if counted else logging.INFO,
                    "creating topics %s with %d cop%s (%d %sbroker%s): a node lost loses acknowledged writes; "
                    "a cluster of 3 or more nodes gets 3 copies when all are up at creation",
                    ", ".join(sorted(missing)), rf, "y" if rf == 1 else "ies", brokers, "live " if counted else "",
                    "" if brokers == 1 else "s")
        try:
            admin.create_topics({name: {"num_partitions": n, "replication_factor": rf,
                                        "configs": {"min.insync.replicas": str(min_isr)}}
                                 for name, n in missing.items()},
                                timeout_ms=int(timeout_s * 1000), wait_for_metadata=True)
        except TopicAlreadyExistsError:   # another process created it meanwhile
            pass
    finally:
        admin.close()
