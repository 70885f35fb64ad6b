"""Served reward and served KL: what users actually receive, scored off the request path.

A configurable fraction of finished sequences is queued (bounded: when full, the sample is dropped
and counted, never the request delayed). A worker thread scores each with
  - the RM server (rlhf.v1.RewardService.Score): the reward of the response as served;
  - the reference (initial) policy and the version that served it: KL(pi || pi_ref) summed over the
    response's tokens, exact per token over the vocabulary (serve.kernels.entropy_kl),
and records both per model version (rlhf_policy_served_reward, rlhf_policy_served_kl_nats).
"""
from __future__ import annotations

import logging
import queue
import random
import threading
from dataclasses import dataclass

import torch

from common.auth import bearer
from common.omp import release_thread_pool
from common.replicas import replica_channel
from rlhf.v1 import models_pb2, models_pb2_grpc

from . import kernels, metrics
from .model import sequence_logits

log = logging.getLogger(__name__)


@dataclass
class Sample:
    version: str
    policy: object          # LoadedPolicy that served it
    prompt_ids: list[int]
    response_ids: list[int]
    prompt: str
    response: str
    truncated: bool = False   # cut at the token limit (the RM sees it, serve/reward_model.rm_text)


class ServedScorer:
    def __init__(self, fraction: float, reference, rm_target: str, max_queue: int = 256, seed: int = 0,
                 rm_token: str = "", rm_tls_ca: str = ""):
        self.fraction, self.reference, self.rm_target = fraction, reference, rm_target
        self._metadata = bearer(rm_token)   # an RM server with --auth-tokens refuses calls without one
        self.q: queue.Queue[Sample | None] = queue.Queue(maxsize=max_queue)
        self.rng = random.Random(seed)
        self._rm = None
        if rm_target:   # one RM server, or its replicas "h:p,h:p" (round robin)
            self._channel = replica_channel(rm_target, rm_tls_ca)   # TLS verified against rm_tls_ca when given
            self._rm = models_pb2_grpc.RewardServiceStub(self._channel)
        self._thread = threading.Thread(target=self._run, name="served-scoring", daemon=True)
        self._thread.start()

    def offer(self, s: Sample) -> None:
        if not s.response_ids or self.rng.random() >= self.fraction:
            return
        try:
            self.q.put_nowait(s)
        except queue.Full:
            metrics.SERVED_SCORING_DROPPED.inc()

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while (s := self.q.get()) is not None:
            try:
                self._score(s)
            except Exception as e:   # scoring must never take serving down
                metrics.SERVED_SCORING_ERRORS.inc()
                log.warning("served scoring failed: %s", e)
            finally:   # this thread waits now: a live OpenMP pool here would slow the engine's (common/omp.py)
                release_thread_pool()

    def _score(self, s: Sample) -> None:
        if self.reference is not None:
            ids = s.prompt_ids + s.response_ids
            lp = sequence_logits(s.policy.model, ids, len(s.prompt_ids))
            lq = sequence_logits(self.reference.model, ids, len(s.prompt_ids))
            _, kl, _, _ = kernels.entropy_kl(lp, lq, torch.tensor(s.response_ids))
            metrics.SERVED_KL.labels(s.version).observe(float(kl.sum()))
        if self._rm is not None:
            r = self._rm.Score(models_pb2.ScoreRequest(items=[models_pb2.ScoreItem(prompt=s.prompt, response=s.response,
                                                                                 truncated=s.truncated)]),
                               timeout=30, metadata=self._metadata)
            metrics.SERVED_REWARD.labels(s.version).observe(r.scores[0])
        metrics.SERVED_SCORED.labels(s.version).inc()

    def close(self) -> None:
        try:
            self.q.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout=5)
