"""The access-control options every gRPC server's config shares (see common/auth.py)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class AuthOptions:
    auth_tokens: str = ""
    """File of `token role` lines (roles client, labeler, admin); "" disables auth. Tokens are never logged."""
    tls_cert: str = ""
    """PEM certificate for TLS ("" serves plaintext)."""
    tls_key: str = ""
    """PEM private key for TLS."""

    def __post_init__(self) -> None:   # subclasses call it first from theirs
        for flag, path in (("--auth-tokens", self.auth_tokens), ("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key)):
            if path and not Path(path).is_file():
                raise ValueError(f"{flag} {path}: no such file")
