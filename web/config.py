"""Configuration of the web gateway (the CLI is generated from it)."""
from __future__ import annotations

from dataclasses import dataclass

from common.auth_options import AuthOptions
from common.net import check_ports


@dataclass(frozen=True)
class WebConfig(AuthOptions):
    """Serve the chat and labeling pages, and relay them to the policy and feedback services over gRPC.

    The gateway keeps no state: a conversation lives in the page, a person is known by the token
    in an HttpOnly cookie (checked against --auth-tokens, the file the gRPC servers use, and
    forwarded to them as the bearer token), and every submission carries an event id the page
    made, so a retry or a double click is stored once."""

    policy: str = "127.0.0.1:50051"
    """host:port of the policy server (rlhf.v1.PolicyService), or "h:p,h:p" for replicas (round robin)."""
    feedback: str = "127.0.0.1:50061"
    """host:port of the feedback service (rlhf.v1.FeedbackService), or "h:p,h:p" for replicas."""
    host: str = "127.0.0.1"
    """Address to listen on (HTTP, or HTTPS with --tls-cert and --tls-key)."""
    port: int = 8080
    """HTTP port (0 picks a free one; the chosen port is printed)."""
    backend_ca: str = ""
    """PEM CA certificate to verify the policy and feedback servers' TLS with ("": plaintext gRPC)."""
    prompts: str = ""
    """Labeling prompts: a text file with one user message per line ("": the first human turns of the
    shipped hh dialogues, data/hh-harmless-1800.jsonl)."""
    label_k: int = 4
    """Responses per labeling prompt (K, 2..9), which the labeler ranks best first."""
    max_new_tokens: int = 64
    """New tokens per response at most (chat and labeling)."""
    temperature: float = 1.0
    """Sampling temperature of the responses (two per chat turn must differ: keep it above 0)."""
    max_messages: int = 40
    """Messages one chat conversation may hold (the policy server's context limit applies too)."""
    max_message_chars: int = 4000
    """Longest chat message a person may send."""
    generate_timeout_s: float = 120.0
    """Deadline of a generation call to the policy server."""
    feedback_timeout_s: float = 15.0
    """Deadline of a submission to the feedback service (it answers UNAVAILABLE sooner when Kafka is down)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 2 <= self.label_k <= 9:
            raise ValueError("label_k must be in [2, 9] (a ranking of K responses)")
        check_ports(port=self.port)
        if not 0 < self.temperature <= 100:
            raise ValueError("temperature must be in (0, 100]: greedy would give two identical answers")
        if min(self.max_new_tokens, self.max_messages, self.max_message_chars) < 1:
            raise ValueError("max_new_tokens, max_messages and max_message_chars must be >= 1")
        if self.generate_timeout_s <= 0 or self.feedback_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("HTTPS needs both --tls-cert and --tls-key")
