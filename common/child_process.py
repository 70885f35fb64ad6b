"""A child process of the main job, a test or a bench: `python -u -m <module> <args>` from the repo
root, its stdout and stderr copied line by line into a log file (and its last lines kept in memory,
for output() and wait_for: a server the main job runs for days must not grow with its log), waited
for until it is ready, stopped with SIGTERM and, after a grace period, SIGKILL.

    server = ChildProcess("serve.rm_server", [...], Path("logs/rm-server.log"))
    port = server.wait_for(r"rm server listening on \\S+:(\\d+)", 300).group(1)
    ...
    server.stop()
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, TypeVar

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")


class ChildProcess:
    """One running `python -u -m module args` (.proc: its Popen). own_session=True starts it in a
    session of its own, so a Ctrl-C in the terminal reaches only the parent, which then stops its
    children in order; env entries are added to this process's environment."""

    def __init__(self, module: str, args: list[str], log_path: Path, env: dict[str, str] | None = None,
                 own_session: bool = False, name: str = "", keep_lines: int = 20_000):
        self.name = name or module
        self.log_path = Path(log_path)
        self._lines: deque[str] = deque(maxlen=keep_lines)   # the log file has every line
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-u", "-m", module, *args], cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, errors="replace",
                                     env={**os.environ, **(env or {})}, start_new_session=own_session)
        self._copier = threading.Thread(target=self._copy_output, args=(log,), name=f"{self.name}-output",
                                        daemon=True)
        self._copier.start()

    def _copy_output(self, log) -> None:
        with log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()   # the log is read while the child runs (tail -f, a failed test's message)
                self._lines.append(line)

    def output(self) -> str:
        """The last `keep_lines` lines the child printed so far; once it has exited, up to its end."""
        if self.proc.poll() is not None:
            self._copier.join(timeout=5)   # the copier may still hold its last lines
        return "".join(self._lines)

    def wait_until(self, ready: Callable[[], T | None], timeout: float) -> T:
        """ready()'s first true value, asked every 0.2 s. Raises RuntimeError if the child exits
        first and TimeoutError after `timeout` seconds, both with the end of its output."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := ready():
                return found
            if self.proc.poll() is not None:
                if found := ready():   # ready just before it exited
                    return found
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}) before it was ready; {self._tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} not ready after {timeout:.0f}s; {self._tail()}")

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """The first match of `pattern` in the child's output (its ready line)."""
        return self.wait_until(lambda: re.search(pattern, self.output()), timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, then SIGKILL if it is still running after `timeout` seconds. Idempotent."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # bounded: a grandchild in its own session (a torchrun rank) may still hold the pipe open
        self._copier.join(timeout=5)

    def _tail(self, chars: int = 3000) -> str:
        return f"see {self.log_path}; its last output:\n{self.output()[-chars:]}"
