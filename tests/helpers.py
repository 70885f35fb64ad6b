"""Test helpers: real server processes on free loopback ports, and /metrics scraping."""
from __future__ import annotations

import difflib
import os
import re
import time
import urllib.request
from pathlib import Path

from common.child_process import REPO, ChildProcess
from common.net import free_port


class ServerProc(ChildProcess):
    """A server under test, started and waited for: .match is the first match of ready_pattern in
    its output. Its log is a file in $TMPDIR (the failure message of a test names it)."""

    def __init__(self, module: str, args: list[str], ready_pattern: str, timeout: float = 120.0,
                 env: dict | None = None):
        log = Path(os.environ.get("TMPDIR", "/tmp")) / f"{module.replace('.', '_')}-{os.getpid()}-{time.time_ns()}.log"
        super().__init__(module, args, log, env=env)
        try:
            self.match = self.wait_for(ready_pattern, timeout)
        except TimeoutError:
            self.stop()
            raise


def start_policy_server(model: Path, **flags) -> tuple[ServerProc, int, int]:
    port, mport = free_port(), free_port()
    args = ["--model", str(model), "--port", str(port), "--metrics-port", str(mport)]
    for k, v in flags.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return ServerProc("serve", args, r"policy server listening on \S+:(\d+)"), port, mport


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def metric(port: int, name: str, labels: str = "", default: float | None = None) -> float:
    """Value of one sample in a /metrics scrape. A missing series raises (a renamed metric must not read as 0);
    pass `default=` only where the series legitimately does not exist yet (a labelled counter before its first inc)."""
    key = name + ("{" + labels + "}" if labels else "")
    text = scrape(port)
    m = re.search(rf"^{re.escape(key)}\s+(\S+)$", text, re.M)
    if m:
        return float(m.group(1))
    if default is not None:
        return default
    present = [ln.rsplit(None, 1)[0] for ln in text.splitlines() if ln and not ln.startswith("#")]
    close = difflib.get_close_matches(key, present, n=5, cutoff=0.5) or [k for k in present if k.startswith(name)]
    raise LookupError(f"no series {key} on :{port}/metrics; similar: {close}")


def start_feedback_service(bootstrap: str, **flags) -> tuple[ServerProc, int]:
    port = free_port()
    args = ["--bootstrap", bootstrap, "--port", str(port), "--metrics-port", "0"]
    for k, v in flags.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return ServerProc("feedback.service", args, r"feedback service listening on \S+:(\d+)"), port


def engine_greedy(model, prompts: list[list[int]], eos_id, n_new: int, max_batch_size: int = 16,
                  max_context: int = 256) -> list[tuple[list[int], list[float]]]:
    """Every prompt submitted at once to a serve.engine.Engine over `model`, greedy with logprobs:
    [(tokens, logprobs)] per prompt. Each must end by length or EOS."""
    from serve.engine import DoneEvent, Engine, EngineConfig, Finish, Request, SamplingSpec   # torch: only when used
    engine = Engine(model, EngineConfig(max_batch_size=max_batch_size, max_queue=max(16, len(prompts)),
                                        max_context=max_context), eos_id, lambda ids: "", "test").start()
    try:
        reqs = [engine.submit(Request(prompt=p, stream=False, spec=SamplingSpec(
            temperature=0.0, max_new_tokens=n_new, logprobs=True))) for p in prompts]
        for r in reqs:
            ev = r.events.get(timeout=120)
            assert isinstance(ev, DoneEvent) and ev.finish in (Finish.LENGTH, Finish.EOS), ev
    finally:
        engine.stop()
    return [(r.seqs[0].out, r.seqs[0].logprobs) for r in reqs]
