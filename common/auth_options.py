"""The access-control options every gRPC server's config shares (see common/auth.py)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AuthOptions:
    auth_tokens: str = ""
    """File of `token role` lines (roles client, labeler, admin); "" disables auth. Tokens are never logged."""
    tls_cert: str = ""
    """PEM certificate for TLS ("" serves plaintext)."""
    tls_key: str = ""
    """PEM private key for TLS."""
