"""Clipping inside the fused optimiser step (train/optim.py) against clip_grad_norm_ + step."""
from __future__ import annotations

import pytest
import torch

from common.malloc import keep_freed_memory
from train.optim import clip_and_step, clip_scale, global_norm


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


def test_glibc_takes_the_allocator_thresholds():
    assert keep_freed_memory() is True    # Linux with glibc, as every machine this runs on
