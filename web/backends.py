"""The gateway's gRPC side: asyncio channels to the policy and feedback services, and what their
answers mean for a page (HTTP status, whether a retry can help)."""
from __future__ import annotations

from dataclasses import dataclass

import grpc

from common.auth import bearer
from common.replicas import replica_channel
from rlhf.v1 import feedback_pb2 as fb
from rlhf.v1 import feedback_pb2_grpc as fb_grpc
from rlhf.v1 import policy_pb2_grpc as pb_grpc

from .config import WebConfig

# a gRPC status -> (HTTP status, whether the same submission may succeed later)
_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, False),
    grpc.StatusCode.UNAUTHENTICATED: (401, False),   # the token the gateway let in is not valid there: sign in again
    grpc.StatusCode.PERMISSION_DENIED: (403, False),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (503, True),
    grpc.StatusCode.UNAVAILABLE: (503, True),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, True),
}
_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}


@dataclass(frozen=True)
class Failure:
    """A call that did not do what was asked, as the page is told."""
    http: int
    retry: bool
    code: str
    message: str
    partial: bool = False   # a batch some of whose items were saved: the page must not submit it anew

    @staticmethod
    def of(code: grpc.StatusCode, message: str, partial: bool = False) -> "Failure":
        http, retry = _HTTP.get(code, (502, True))
        return Failure(http, retry, code.name, message, partial)

    def json(self) -> dict:
        """The answer's body; `status` repeats the HTTP status for a stream's "error" event, which
        arrives inside a 200 response (the chat page signs in again on 401)."""
        return {"status": self.http, "retry": self.retry, "code": self.code, "error": self.message,
                "partial": self.partial}


class Backends:
    """Stubs over one channel per service; created inside the server's event loop (grpc.aio)."""

    def __init__(self, cfg: WebConfig):
        self.cfg = cfg
        # round robin over the replicas of each service (one address is one replica)
        self.channels = [replica_channel(t, cfg.backend_ca, aio=True) for t in (cfg.policy, cfg.feedback)]
        self.policy = pb_grpc.PolicyServiceStub(self.channels[0])
        self.feedback = fb_grpc.FeedbackServiceStub(self.channels[1])

    def stream(self, req, token: str):
        return self.policy.GenerateStream(req, timeout=self.cfg.generate_timeout_s, metadata=bearer(token))

    async def generate(self, req, token: str):
        return await self.policy.Generate(req, timeout=self.cfg.generate_timeout_s, metadata=bearer(token))

    async def submit(self, batch: fb.FeedbackBatch, token: str) -> Failure | None:
        """One batch, one round trip. None when Kafka acknowledged every item; else the first
        failure. A partly saved batch counts as not saved: the page resends all of it with the same
        event ids, and the store keeps one record per event id."""
        try:
            res = await self.feedback.SubmitBatch(batch, timeout=self.cfg.feedback_timeout_s, metadata=bearer(token))
        except grpc.aio.AioRpcError as e:
            return Failure.of(e.code(), e.details() or e.code().name)
        bad = [r for r in res.results if r.code != 0]
        return Failure.of(_BY_NUMBER.get(bad[0].code, grpc.StatusCode.UNKNOWN), bad[0].message,
                          partial=len(bad) < len(res.results)) if bad else None

    async def close(self) -> None:
        for ch in self.channels:
            await ch.close()
