"""A server process's start and end: start-up errors as one line, bounded shutdown.

A start-up failure the user can fix (a port in use, a missing or malformed file, a token file that
does not parse, a checkpoint that does not load) ends the command with one line that names it, exit 1,
not a traceback (`startup_errors`).

grpcio's `server.stop(grace).wait()` can wait for ever: after one undecodable message on a
bidirectional stream (seen with grpcio 1.85.1 on FeedbackService.SubmitMany and on the reflection
service's ServerReflectionInfo), the stream's handler thread never ends. A SIGTERM must still end
the process within grace + a few seconds, so the wait is bounded and a server that did not finish
is left behind by exiting without the interpreter's wait for its threads.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from contextlib import contextmanager

log = logging.getLogger(__name__)


@contextmanager
def startup_errors(prog: str, also: tuple[type[BaseException], ...] = ()):
    """Around a command's start-up only: OSError and ValueError (and `also`) end it with
    "<prog>: error: <message>" and exit 1. A failure once it serves keeps its traceback: that is a bug."""
    try:
        yield
    except (OSError, ValueError, *also) as e:
        name = type(e).__name__
        text = str(e) if isinstance(e, (OSError, ValueError)) or str(e).startswith(name) else f"{name}: {e}"
        raise SystemExit(f"{prog}: error: {text}") from e


def stop_server(server, grace: float, margin: float = 3.0) -> bool:
    """New calls are refused at once, running ones get `grace` seconds; waits at most grace +
    margin. Returns False if grpcio did not finish by then."""
    finished = server.stop(grace).wait(grace + margin)
    if not finished:
        log.warning("gRPC server did not stop within %.0fs (a stream handler is stuck); exiting anyway", grace + margin)
    return finished


def exit_now(code: int = 0) -> None:
    """Ends the process without the interpreter's teardown: flushes output and logs first. For a
    server or the trainer after its orderly stop: threads grpcio could not stop (stop_server returned
    False) are not waited for, and nothing is left to release, while tearing down torch's and
    transformers' modules takes 0.8-1.5 s that a restart, a rolling update or the main job's end
    would wait on (the trainer's SIGTERM to exit: 1.6-1.9 -> 0.17-0.27 s). Nothing registered with
    atexit runs: such a process must not leave work to it."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


class ShutdownDeadline:
    """Ends the process `seconds` after it is started (exit_now with `code`) unless `done()` comes first:
    a shutdown step that hangs (a Kafka client that does not close, an interpreter exit waiting for a
    thread) cannot keep a SIGTERM'd process alive past it. For a process whose work is safe to drop by
    then (every write it acknowledged is already durable). `step(name)` names the step in progress, for
    the log line if the deadline passes."""

    def __init__(self, seconds: float, code: int = 0):
        self.seconds, self.code, self.current = seconds, code, "starting"
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def step(self, name: str) -> None:
        self.current = name

    def done(self) -> None:
        self._timer.cancel()

    def _expire(self) -> None:
        log.warning("shutdown still at step %r after %.0fs; exiting now", self.current, self.seconds)
        exit_now(self.code)
