"""Smoke tests of every entry point: --help explains itself, and the main job's demo runs."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import REPO, free_port

MODULES = ["serve", "serve.rm_server", "train.loop", "serve.client", "serve.make_policy", "serve.demo", "feedback.service",
           "feedback.consumer", "feedback.broker", "train.rm_train", "train.rm_eval", "train.sft", "online"]


BAD_CONFIGS = {"serve --dtype float8": "dtype must be float32 or bfloat16",
               "train.loop --ppo.lr -1": "lr and critic_lr must be > 0",
               "train.rm_train --out x --device gpu": "device must be cpu, cuda or cuda:N",
               "serve.make_policy --out x --size huge": "size must be one of",
               "serve.rm_server --port 99999": "port must be in [0, 65535], got 99999",
               "feedback.service --metrics-port -5": "metrics_port must be in [0, 65535], got -5",
               "serve --auth-tokens /nonexistent/tokens.txt": "--auth-tokens /nonexistent/tokens.txt: no such file",
               "train.rm_eval --rm x --data y --batch 0": "batch must be >= 1"}

# Runs `python -m MODULE ARGS...` (argv: MODULE ARGS...) and says last, on stderr, whether torch was
# imported by then: --help and a bad flag are answered before a command's module imports torch.
RUN_AND_REPORT_TORCH = """import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
finally:
    print("torch imported" if "torch" in sys.modules else "torch not imported", file=sys.stderr)
"""


@pytest.fixture(scope="module")
def commands():
    """Every module's --help and the bad configs, started at once (each is a Python start-up)."""
    runs = {args[0] if args[1:] == ["--help"] else " ".join(args): subprocess.Popen(
        [sys.executable, "-c", RUN_AND_REPORT_TORCH, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for args in [[m, "--help"] for m in MODULES] + [c.split() for c in BAD_CONFIGS]}
    yield runs
    for p in runs.values():
        if p.poll() is None:
            p.kill()
        p.communicate()


def finished(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


@pytest.mark.parametrize("module", MODULES)
def test_help(module, commands):
    code, out, err = finished(commands[module])
    assert code == 0, err
    assert "usage:" in out and len(out.splitlines()) > 5
    assert err.splitlines()[-1] == "torch not imported", err   # --help at once, not after 3-7 s of imports


@pytest.mark.parametrize("command", BAD_CONFIGS)
def test_bad_config_is_a_clear_error(command, commands):
    code, _, err = finished(commands[command])
    assert code == 2 and BAD_CONFIGS[command] in err, err
    assert err.splitlines()[-1] == "torch not imported", err


@pytest.mark.slow
def test_demo_serves_and_answers(tiny_gpt2):
    out = subprocess.run([sys.executable, "-m", "serve.demo", "--model", str(tiny_gpt2), "--port", str(free_port()),
                          "--metrics-port", "0", "--exit-after-sample"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[demo] serving gpt2 model v0" in out.stdout
    assert out.stdout.count("[demo] sample ") == 2
