"""Logs every served generation to the interactions topic, off the request path.

The write is asynchronous (the response is not held for Kafka); failures are counted in
rlhf_policy_interactions_log_failures_total and logged. The feedback service reads this topic
to resolve response ids, and the trainer reads it for the live prompt distribution.
"""
from __future__ import annotations

import logging
import time

from prometheus_client import Counter

from feedback.kafka_io import AckedProducer
from feedback.topics import INTERACTIONS, ensure_topics

from rlhf.v1 import feedback_pb2 as fb

log = logging.getLogger(__name__)
LOGGED = Counter("rlhf_policy_interactions_logged_total", "Served completions acknowledged by Kafka")
FAILED = Counter("rlhf_policy_interactions_log_failures_total", "Served completions Kafka did not take")


class InteractionLog:
    def __init__(self, bootstrap: str):
        self.topic = INTERACTIONS
        try:
            ensure_topics(bootstrap)
        except Exception as e:
            log.warning("could not create topics at %s: %s", bootstrap, e)
        self.producer = AckedProducer(bootstrap, client_id="policy-server", probe_topic=INTERACTIONS)

    def record(self, prompt: str, prompt_ids: list[int], seq, text: str, version: str) -> None:
        rec = fb.Interaction(response_id=seq.response_id, prompt=prompt, response=text, model_version=version,
                             served_unix_ms=int(time.time() * 1000), prompt_token_ids=prompt_ids,
                             response_token_ids=seq.out, finish_reason=seq.finish or "")
        try:
            fut = self.producer.send_async(self.topic, seq.response_id.encode(), rec.SerializeToString())
        except Exception as e:
            FAILED.inc()
            log.warning("interaction not logged: %s", e)
            return
        fut.add_callback(lambda _md: LOGGED.inc())
        fut.add_errback(lambda e: self._failed(e, fut))

    def _failed(self, e: Exception, fut) -> None:
        FAILED.inc()
        log.warning("interaction not logged: %s", e)
        self.producer.note_failure(e, fut.producer)   # a lost producer id heals, as in the feedback service

    def close(self) -> None:
        self.producer.flush()
        self.producer.close()
