"""Smoke tests of every entry point: --help explains itself, and the main job's demo runs."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import REPO, free_port

MODULES = ["serve", "train.loop", "serve.client", "serve.make_policy", "serve.demo", "feedback.service", "feedback.consumer",
           "feedback.broker", "train.rm_train", "train.rm_eval", "train.sft", "online"]


BAD_CONFIG = ["serve", "--dtype", "float8"]


@pytest.fixture(scope="module")
def commands():
    """Every module's --help and one bad config, started at once: each imports torch or transformers
    in its own process (1-7 s apiece), so together on two cores they take about half the time."""
    runs = {args[0] if args[1:] == ["--help"] else " ".join(args): subprocess.Popen(
        [sys.executable, "-m", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for args in [[m, "--help"] for m in MODULES] + [BAD_CONFIG]}
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


def test_bad_config_is_a_clear_error(commands):
    code, _, err = finished(commands[" ".join(BAD_CONFIG)])
    assert code == 2 and "dtype must be float32 or bfloat16" in err


@pytest.mark.slow
def test_demo_serves_and_answers(tiny_gpt2):
    out = subprocess.run([sys.executable, "-m", "serve.demo", "--model", str(tiny_gpt2), "--port", str(free_port()),
                          "--metrics-port", "0", "--exit-after-sample"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[demo] serving gpt2 model v0" in out.stdout
    assert out.stdout.count("[demo] sample ") == 2
