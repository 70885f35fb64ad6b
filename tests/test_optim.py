"""Clipping inside the fused optimiser step (train/optim.py) against clip_grad_norm_ + step."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.malloc import keep_freed_memory
from train.optim import clip_and_step, clip_scale, global_norm

REPO = Path(__file__).resolve().parent.parent


def test_clip_scale_by_hand():
    assert clip_scale(torch.tensor(0.5), 1.0).item() == 1.0                 # under the limit: unchanged
    assert clip_scale(torch.tensor(4.0), 2.0).item() == pytest.approx(2.0 + 5e-7)   # (4 + 1e-6) / 2


def test_global_norm_is_the_norm_of_everything():
    gs = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0]]), torch.tensor([12.0], dtype=torch.bfloat16)]
    assert global_norm(gs).item() == pytest.approx(13.0)


@pytest.mark.parametrize("loss_scale", [0.01, 100.0])   # not clipped; clipped
@pytest.mark.parametrize("opt_cls", [torch.optim.AdamW, torch.optim.Adam])
def test_same_trajectory_as_clip_grad_norm_then_step(loss_scale, opt_cls):
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    b = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    b.load_state_dict(a.state_dict())
    oa = opt_cls(a.parameters(), lr=0.05, weight_decay=0.01, fused=True)
    ob = opt_cls(b.parameters(), lr=0.05, weight_decay=0.01, fused=True)
    for step in range(4):
        x = torch.randn(8, 6)
        (a(x).pow(2).sum() * loss_scale).backward()
        (b(x).pow(2).sum() * loss_scale).backward()
        ref = torch.nn.utils.clip_grad_norm_(a.parameters(), 1.0)
        oa.step()
        norm = clip_and_step(ob, b.parameters(), 1.0)
        assert norm == pytest.approx(float(ref), rel=1e-5)
        assert (norm > 1.0) == (loss_scale > 1)
        oa.zero_grad(), ob.zero_grad()
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pb, pa, atol=1e-6, rtol=1e-5)
    assert not hasattr(ob, "grad_scale")   # left as found: a later GradScaler or plain step is not scaled


def test_other_optimisers_take_the_plain_path():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=1.0)
    p.grad = torch.tensor([30.0, 40.0, 0.0])     # norm 50: clipped to 1
    assert clip_and_step(opt, [p], 1.0) == pytest.approx(50.0)
    torch.testing.assert_close(p.detach(), torch.tensor([1 - 0.6, 1 - 0.8, 1.0]), atol=1e-5, rtol=0)


def test_a_subset_of_the_optimisers_parameters_takes_the_plain_path():
    """The norm over `params` must not scale gradients outside them: clip only what is asked."""
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([a, b], lr=0.1, weight_decay=0.0, fused=True)
    a.grad, b.grad = torch.tensor([30.0, 40.0]), torch.tensor([3.0, 4.0])
    ref_a, ref_b = a.detach().clone(), b.detach().clone()
    clip_and_step(opt, [a], 1.0)   # a clipped to norm 1, b stepped unclipped: Adam's first step is -lr*sign
    torch.testing.assert_close(a.detach(), ref_a - 0.1, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.detach(), ref_b - 0.1, atol=1e-5, rtol=0)
    assert torch.allclose(b.grad, torch.tensor([3.0, 4.0]))   # b's gradient was not scaled by a's clip


def test_glibc_takes_the_allocator_thresholds():
    # in a child process: the thresholds would stay for the rest of this test session
    code = "from common.malloc import keep_freed_memory; import sys; sys.exit(0 if keep_freed_memory() else 3)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0   # Linux with glibc
    with pytest.raises(ValueError):
        keep_freed_memory(trim_threshold=1 << 31)
