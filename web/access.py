"""Who is asking, and which page they may use.

A person signs in once with a token from the file the gRPC servers read (`--auth-tokens`, lines
`<token> <role>`, common/auth.py). The token then travels only in an HttpOnly, SameSite=Strict
cookie: never in a URL (URLs end up in logs and browser history) and never readable by the page's
scripts. On every request the cookie's token is checked against the tokens read from the file at
start (a token taken out of the file stops working when the gateway restarts), so the gateway keeps no
session state, and it is forwarded to the gRPC servers as the bearer token, so they apply their own
role rules too. Without a token file every page is open, as the gRPC servers are then.

Requests from other sites' pages are refused (`cross_site_refusal`): with the cookie SameSite=Strict a
browser does not send it along, but an open gateway (no tokens, e.g. `python -m online --web-port`) or
a sibling subdomain would otherwise take a form or `no-cors` post from any page the person visits.
"""
from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass
from typing import Mapping
from urllib.parse import urlsplit

from common.auth import load_tokens, role_of_token

TOKEN_COOKIE = "rlhf_token"
PERSON_COOKIE = "rlhf_person"   # an anonymous id, only when auth is off
PAGE_ROLES = {"chat": "client", "label": "labeler"}
"""The role each page needs; admin may use every page, as on the gRPC servers."""


@dataclass(frozen=True)
class Person:
    role: str | None
    """The token's role (None when auth is off)."""
    token: str
    """Forwarded to the gRPC servers ("" when auth is off)."""
    id: str
    """The feedback's source id: a pseudonym of the token (or the anonymous cookie), never the token."""


def pseudonym(token: str) -> str:
    """A stable id for a token's holder that does not give the token away (64 bits of a hash)."""
    return "p-" + hashlib.sha256(b"rlhf-web-person\0" + token.encode()).hexdigest()[:16]


def new_anonymous_id() -> str:
    return "anon-" + uuid.uuid4().hex[:16]


class Access:
    def __init__(self, tokens_file: str):
        self.tokens = load_tokens(tokens_file) if tokens_file else None

    @property
    def enabled(self) -> bool:
        return self.tokens is not None

    def role_of(self, token: str) -> str | None:
        """The role of a known token, else None (common.auth's constant-time lookup)."""
        return role_of_token(self.tokens, token) if self.tokens else None

    def person(self, cookies: dict) -> Person | None:
        """The person behind a request's cookies: None when auth is on and the token is missing or unknown."""
        if not self.enabled:
            anon = cookies.get(PERSON_COOKIE, "")
            return Person(None, "", anon if re.fullmatch(r"anon-[0-9a-f]{16}", anon) else "anonymous")
        token = cookies.get(TOKEN_COOKIE, "")
        role = self.role_of(token)
        return None if role is None else Person(role, token, pseudonym(token))

    def may_use(self, person: Person, page: str) -> bool:
        return not self.enabled or person.role in (PAGE_ROLES[page], "admin")


def cross_site_refusal(method: str, path: str, headers: Mapping[str, str]) -> tuple[int, str] | None:
    """(HTTP status, reason) to refuse a request with, or None. Posts must come from the gateway's own
    pages: the browser's Sec-Fetch-Site says so ("same-origin", or "none" for one the person started),
    or, from a browser without it, an Origin naming this host; a request with neither (curl, scripts)
    is not a browser's cross-site one. The API takes JSON only, which a page elsewhere cannot post
    without a CORS preflight this gateway never answers. `headers` keys are lower case."""
    if method != "POST":
        return None
    site = headers.get("sec-fetch-site")
    origin = headers.get("origin")
    if site is not None:
        if site not in ("same-origin", "none"):
            return 403, f"refused: a request from another site (Sec-Fetch-Site: {site})"
    elif origin is not None and (origin == "null" or urlsplit(origin).netloc.lower() != headers.get("host", "").lower()):
        return 403, f"refused: a request from another origin ({origin})"
    if path.startswith("/api/"):
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            return 415, "send JSON (Content-Type: application/json)"
    return None
