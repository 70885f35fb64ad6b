"""Smoke tests of every entry point: --help explains itself, and the main job's demo runs."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import REPO, free_port

MODULES = ["serve", "train.loop", "serve.client", "serve.make_policy", "serve.demo", "feedback.service", "feedback.consumer",
           "feedback.broker", "train.rm_train", "train.rm_eval", "train.sft", "online"]


@pytest.mark.parametrize("module", MODULES)
def test_help(module):
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout and len(out.stdout.splitlines()) > 5


def test_bad_config_is_a_clear_error():
    out = subprocess.run([sys.executable, "-m", "serve", "--dtype", "float8"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "dtype must be float32 or bfloat16" in out.stderr


@pytest.mark.slow
def test_demo_serves_and_answers(tiny_gpt2):
    out = subprocess.run([sys.executable, "-m", "serve.demo", "--model", str(tiny_gpt2), "--port", str(free_port()),
                          "--metrics-port", "0", "--exit-after-sample"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[demo] serving gpt2 model v0" in out.stdout
    assert out.stdout.count("[demo] sample ") == 2
