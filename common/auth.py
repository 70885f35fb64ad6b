"""Token auth with roles, and optional TLS, for every gRPC server.

Tokens live in a file (never on the command line, never logged): one `token role` per line,
roles client | labeler | admin; `#` starts a comment. Clients send `authorization: Bearer <token>`.
  client   generate, model info, score, submit user feedback (ratings and comparisons from users)
  labeler  generate and model info (the K answers a labeler compares), submit labeler feedback
           (rankings, comparisons and Likert ratings: InstructGPT's labelers rank and rate)
  admin    everything, including pin / roll back / pause training
Missing or unknown token -> UNAUTHENTICATED; known token, wrong role -> PERMISSION_DENIED.
Health checks stay open (load balancers and probes have no token). Reflection needs a token of
any role when auth is on: it gives out no data, but it is a bidirectional stream that anyone
could hold open. The caller's role is available to
handlers through `current_role()` (the feedback service checks that a user's token does not
submit labeler feedback and vice versa).
"""
from __future__ import annotations

import contextvars
import hmac
from pathlib import Path

import grpc

from .decode_guard import DecodeGuard

ROLES = ("client", "labeler", "admin")
_role: contextvars.ContextVar[str | None] = contextvars.ContextVar("rlhf_role", default=None)

# full method name prefix or name -> roles allowed (admin is always allowed)
RULES = {
    "/rlhf.v1.PolicyService/": {"client", "labeler"},
    "/rlhf.v1.RewardService/": {"client"},
    "/rlhf.v1.FeedbackService/SubmitRating": {"client", "labeler"},
    "/rlhf.v1.FeedbackService/SubmitRanking": {"labeler"},
    "/rlhf.v1.FeedbackService/SubmitComparison": {"client", "labeler"},
    "/rlhf.v1.FeedbackService/SubmitBatch": {"client", "labeler"},
    "/rlhf.v1.FeedbackService/SubmitMany": {"client", "labeler"},
    "/rlhf.v1.AdminService/": set(),
    "/grpc.reflection.": {"client", "labeler"},
}
OPEN = ("/grpc.health.v1.Health/",)


def current_role() -> str | None:
    """The authenticated caller's role inside a handler (None when auth is off)."""
    return _role.get()


def load_tokens(path: str | Path) -> dict[str, str]:
    tokens: dict[str, str] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or parts[1] not in ROLES:
            raise ValueError(f"{path}:{n}: expected `<token> <role>` with role in {ROLES}")
        tokens[parts[0]] = parts[1]
    if not tokens:
        raise ValueError(f"{path}: no tokens")
    return tokens


def role_of_token(tokens: dict[str, str], given: str) -> str | None:
    """The role of a known token, else None; compared in constant time against each known token."""
    if not given:
        return None
    for tok, role in tokens.items():
        if hmac.compare_digest(given.encode(), tok.encode()):
            return role
    return None


def allowed(method: str, role: str) -> bool:
    if role == "admin":
        return True
    for prefix, roles in RULES.items():
        if method == prefix or (prefix.endswith(("/", ".")) and method.startswith(prefix)):
            return role in roles
    return False


class AuthInterceptor(grpc.ServerInterceptor):
    def __init__(self, tokens: dict[str, str]):
        self.tokens = tokens

    def _role_of(self, metadata) -> str | None:
        for k, v in metadata or ():
            if k == "authorization" and v.startswith("Bearer "):
                return role_of_token(self.tokens, v[7:])
        return None

    def intercept_service(self, continuation, details):
        method = details.method
        handler = continuation(details)
        if handler is None or method.startswith(OPEN):
            return handler
        role = self._role_of(details.invocation_metadata)
        if role is None:
            return _deny(handler, grpc.StatusCode.UNAUTHENTICATED, "missing or invalid token")
        if not allowed(method, role):
            return _deny(handler, grpc.StatusCode.PERMISSION_DENIED, f"role {role} may not call {method}")
        return _with_role(handler, role)


def _deny(handler, code, msg):
    def unary(request, context):
        context.abort(code, msg)

    def stream(request_or_iterator, context):
        context.abort(code, msg)
        yield  # pragma: no cover

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(stream)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(stream)
    return grpc.unary_unary_rpc_method_handler(unary)


def _with_role(handler, role: str):
    """The same handler, with current_role() set while it runs."""
    def wrap(fn, streaming_response: bool):
        if fn is None:
            return None
        if streaming_response:
            def gen(req, context):
                tok = _role.set(role)
                try:
                    yield from fn(req, context)
                finally:
                    _role.reset(tok)
            return gen

        def call(req, context):
            tok = _role.set(role)
            try:
                return fn(req, context)
            finally:
                _role.reset(tok)
        return call

    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary, False), **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream, True), **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary, False), **kw)
    return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream, True), **kw)


def interceptors(tokens_file: str) -> list:
    """Every server's interceptors: undecodable requests -> INVALID_ARGUMENT (common/decode_guard.py),
    then the token check when a token file is given."""
    return [DecodeGuard(), *([AuthInterceptor(load_tokens(tokens_file))] if tokens_file else [])]


EXCLUSIVE_PORT = [("grpc.so_reuseport", 0)]
"""Every gRPC server's option: gRPC sets SO_REUSEPORT on Linux by default, so a second server started on
a port already served would bind it too and share its connections instead of failing (bind then
raises, below)."""


class PortInUse(OSError):
    """A server could not listen on its address."""


def bind(server, address: str, tls_cert: str = "", tls_key: str = "") -> int:
    """Binds with TLS when a certificate and key are given, plaintext otherwise. Returns the port;
    PortInUse if the address cannot be bound (with EXCLUSIVE_PORT: also when another server has it)."""
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("TLS needs both a certificate and a key")
    try:
        if tls_cert:
            creds = grpc.ssl_server_credentials([(Path(tls_key).read_bytes(), Path(tls_cert).read_bytes())])
            return server.add_secure_port(address, creds)
        return server.add_insecure_port(address)
    except RuntimeError as e:   # grpcio: "Failed to bind to address ..."
        raise PortInUse(f"cannot listen on {address}: the port is in use, or the host is not an address of "
                        f"this machine ({e})") from e


def channel(target: str, tls_ca: str = "", options=None):
    """A client channel: TLS verified against tls_ca when given."""
    if tls_ca:
        return grpc.secure_channel(target, grpc.ssl_channel_credentials(Path(tls_ca).read_bytes()), options=options)
    return grpc.insecure_channel(target, options=options)


def bearer(token: str) -> tuple:
    return (("authorization", f"Bearer {token}"),) if token else ()
