"""Bounded shutdown of a gRPC server process.

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

log = logging.getLogger(__name__)


def stop_server(server, grace: float, margin: float = 3.0) -> bool:
    """New calls are refused at once, running ones get `grace` seconds; waits at most grace +
    margin. Returns False if grpcio did not finish by then."""
    finished = server.stop(grace).wait(grace + margin)
    if not finished:
        log.warning("gRPC server did not stop within %.0fs (a stream handler is stuck); exiting anyway", grace + margin)
    return finished


def exit_now(code: int = 0) -> None:
    """Ends the process without waiting for threads that will never end (after stop_server
    returned False): flushes output and logs first."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
