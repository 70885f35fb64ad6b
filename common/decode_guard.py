"""Undecodable requests answer INVALID_ARGUMENT, logged one line per burst.

grpcio deserialises a request before the handler runs; when that fails it logs a traceback
("Exception deserializing request!") and answers INTERNAL, once per bad message: a fuzzer's
random bytes turned into 1,400 tracebacks in one run. This interceptor wraps every method's
request deserializer: a message that does not parse becomes a marker the handler never sees; a
unary call is aborted with INVALID_ARGUMENT, a request stream ends there with INVALID_ARGUMENT.
It goes first in a server's interceptors so that it also covers health and reflection.
"""
from __future__ import annotations

import logging
import threading
import time

import grpc

log = logging.getLogger(__name__)


class _Undecodable:
    def __init__(self, error: Exception):
        self.error = error


class _BurstLog:
    """One warning per `every_s` seconds, with the count since the last one."""

    def __init__(self, every_s: float = 10.0):
        self.every_s, self.count, self.last = every_s, 0, 0.0
        self.lock = threading.Lock()

    def note(self, method: str, error: Exception) -> None:
        with self.lock:
            self.count += 1
            now = time.monotonic()
            if now - self.last < self.every_s:
                return
            n, self.count, self.last = self.count, 0, now
        log.warning("%d undecodable request message(s) answered INVALID_ARGUMENT (latest: %s: %s)", n, method,
                    type(error).__name__)


BURSTS = _BurstLog()


def _safe(deserializer):
    if deserializer is None:
        return None

    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception as e:   # a DecodeError, or anything a malformed message makes the parser raise
            return _Undecodable(e)
    return parse


def _message(method: str) -> str:
    return f"request: not a valid protobuf message for {method}"


class DecodeGuard(grpc.ServerInterceptor):
    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method

        def check_one(request, context):
            if isinstance(request, _Undecodable):
                BURSTS.note(method, request.error)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, _message(method))
            return request

        def check_stream(requests, context):
            for r in requests:
                if isinstance(r, _Undecodable):
                    BURSTS.note(method, r.error)
                    context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
                    context.set_details(_message(method))
                    return
                yield r

        kw = dict(request_deserializer=_safe(handler.request_deserializer),
                  response_serializer=handler.response_serializer)
        if handler.unary_unary:
            fn = handler.unary_unary
            return grpc.unary_unary_rpc_method_handler(lambda req, ctx: fn(check_one(req, ctx), ctx), **kw)
        if handler.unary_stream:
            fn = handler.unary_stream
            return grpc.unary_stream_rpc_method_handler(lambda req, ctx: fn(check_one(req, ctx), ctx), **kw)
        if handler.stream_unary:
            fn = handler.stream_unary
            return grpc.stream_unary_rpc_method_handler(lambda reqs, ctx: fn(check_stream(reqs, ctx), ctx), **kw)
        fn = handler.stream_stream
        return grpc.stream_stream_rpc_method_handler(lambda reqs, ctx: fn(check_stream(reqs, ctx), ctx), **kw)
