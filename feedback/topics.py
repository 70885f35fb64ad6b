"""Topic names and their creation. Every topic is created explicitly (auto-create is off)."""
from __future__ import annotations

FEEDBACK = "rlhf.feedback.v1"          # FeedbackRecord, key = event_id
INTERACTIONS = "rlhf.interactions.v1"  # Interaction, key = response_id
DEAD_LETTERS = "rlhf.feedback.dlq.v1"  # DeadLetter, key = original key
MODEL_UPDATES = "rlhf.model-updates.v1"

ALL = {FEEDBACK: 3, INTERACTIONS: 3, DEAD_LETTERS: 1, MODEL_UPDATES: 1}


def ensure_topics(bootstrap: str, partitions: dict[str, int] | None = None, timeout_s: float = 30.0) -> None:
    """Creates the project's topics if they do not exist (idempotent)."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000))
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(name, num_partitions=n, replication_factor=1,
                        topic_configs={"min.insync.replicas": "1"})
               for name, n in (partitions or ALL).items() if name not in existing]
        if new:
            try:
                admin.create_topics(new, timeout_ms=int(timeout_s * 1000))
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()
