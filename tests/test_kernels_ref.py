"""The torch references of serve/kernels: hand-computed cases, distribution tests, autograd."""
from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chisquare

from serve import kernels
from serve.kernels.rng import uniform
from serve.kernels.sampling import filtered_probs, sample_ref


def _params(B, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    return (torch.full((B,), float(temperature)), torch.full((B,), top_k, dtype=torch.long),
            torch.full((B,), float(top_p)), torch.full((B,), float(min_p)))


P4 = torch.tensor([[0.5, 0.3, 0.15, 0.05]])


@pytest.mark.parametrize("kw,expected", [
    (dict(top_p=0.75), [0.5 / 0.8, 0.3 / 0.8, 0, 0]),   # mass before the 3rd token is 0.8 >= 0.75
    (dict(top_p=0.81), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),
    (dict(top_k=3), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),
    (dict(top_k=1), [1, 0, 0, 0]),
    (dict(min_p=0.5), [0.5 / 0.8, 0.3 / 0.8, 0, 0]),   # keep p >= 0.25
    (dict(top_k=3, top_p=0.6), [0.5 / 0.8, 0.3 / 0.8, 0, 0]),  # top-p over the renormalised top-3
    (dict(), [0.5, 0.3, 0.15, 0.05]),
])
def test_filtered_probs_hand_computed(kw, expected):
    got = filtered_probs(P4.log(), *_params(1, **kw))
    torch.testing.assert_close(got[0], torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=0)


def test_filtering_on_top_candidates_equals_the_full_sort():
    """The top-K fast path (with its per-row fallback) keeps exactly what a full sort keeps."""
    torch.manual_seed(5)
    B, V = 12, 3000
    logits = torch.randn(B, V) * torch.linspace(0.2, 6, B)[:, None]   # flat to peaked rows
    temperature = torch.tensor([1.0, 0.7, 1.3, 1.0] * 3)
    top_k = torch.tensor([0, 0, 0, 50, 0, 0, 200, 0, 0, 10, 0, 0])
    top_p = torch.tensor([0.9, 1.0, 0.5, 1.0, 0.95, 0.99, 0.8, 1.0, 0.3, 0.9, 0.999, 1.0])
    min_p = torch.tensor([0.0, 0.05, 0.0, 0.0, 0.0, 0.0, 0.1, 0.0, 0.0, 0.0, 0.0, 0.2])
    full = filtered_probs(logits, temperature, top_k, top_p, min_p, candidates=V)
    for cand in (16, 64, 300):
        fast = filtered_probs(logits, temperature, top_k, top_p, min_p, candidates=cand)
        assert torch.equal(fast > 0, full > 0), cand                   # the same kept sets
        torch.testing.assert_close(fast, full, atol=1e-6, rtol=1e-5)
    # both paths ran: some rows fit in 16 candidates, some needed the fallback
    kept = (full > 0).sum(-1)
    assert (kept <= 16).any() and (kept > 300).any(), kept


def test_temperature_scales_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    got = filtered_probs(logits, *_params(1, temperature=0.5))
    torch.testing.assert_close(got, torch.softmax(logits / 0.5, -1))


def test_greedy_and_top_k_1_are_argmax():
    torch.manual_seed(0)
    logits = torch.randn(7, 1823)
    seeds, offs = torch.arange(7), torch.zeros(7, dtype=torch.long)
    for params in (_params(7, temperature=0.0), _params(7, temperature=1.3, top_k=1)):
        tok, lp = sample_ref(logits, *params, seeds, offs)
        assert torch.equal(tok, logits.argmax(-1))
    # logprob of a greedy token is log_softmax at T=1
    tok, lp = sample_ref(logits, *_params(7, temperature=0.0), seeds, offs)
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1).gather(1, tok[:, None])[:, 0])


def test_rows_with_different_parameters_in_one_batch():
    torch.manual_seed(1)
    logits = torch.randn(4, 300)
    temp = torch.tensor([0.0, 1.0, 0.7, 1.0])
    top_k = torch.tensor([0, 1, 5, 0])
    top_p = torch.tensor([1.0, 1.0, 1.0, 0.3])
    min_p = torch.zeros(4)
    seeds, offs = torch.tensor([1, 2, 3, 4]), torch.tensor([0, 5, 9, 2])
    tok, _ = sample_ref(logits, temp, top_k, top_p, min_p, seeds, offs)
    for b in range(4):  # each row alone gives the same token
        t1, _ = sample_ref(logits[b:b + 1], temp[b:b + 1], top_k[b:b + 1], top_p[b:b + 1], min_p[b:b + 1],
                           seeds[b:b + 1], offs[b:b + 1])
        assert t1.item() == tok[b].item()
    assert tok[0] == logits[0].argmax() and tok[1] == logits[1].argmax()
    assert tok[2] in logits[2].topk(5).indices


def test_uniform_is_stateless_and_uniform():
    seed = torch.full((20000,), 42, dtype=torch.long)
    off = torch.arange(20000)
    u = uniform(seed, off)
    assert torch.equal(u, uniform(seed, off))
    assert torch.equal(u[5:9], uniform(seed[5:9], off[5:9]))
    assert 0 <= u.min() and u.max() < 1
    counts = torch.histc(u, bins=20, min=0, max=1)
    assert chisquare(counts.numpy()).pvalue > 1e-3
    # different seeds decorrelate; seeds above 2^32 matter too
    assert not torch.equal(uniform(seed + 1, off), u)
    assert not torch.equal(uniform(seed + (1 << 40), off), u)


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.7, top_k=20), dict(top_p=0.7), dict(min_p=0.02, top_k=40),
                                dict(temperature=1.5, top_p=0.9)])
def test_sampling_distribution_chi_square(kw):
    torch.manual_seed(2)
    V, N = 64, 20000
    logits = torch.randn(1, V) * 2
    params = _params(N, **kw)
    tok, _ = sample_ref(logits.expand(N, V), *params, torch.full((N,), 7, dtype=torch.long), torch.arange(N))
    p = filtered_probs(logits, *_params(1, **kw))[0]
    counts = torch.bincount(tok, minlength=V).double()
    assert counts[p == 0].sum() == 0, "drew a filtered-out token"
    keep = p > 0
    assert keep.sum() >= 3, "a setting that keeps one token tests nothing"
    expected = p[keep].double() / p[keep].double().sum() * N
    assert chisquare(counts[keep].numpy(), expected.numpy()).pvalue > 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_forward_and_backward(dtype):
    torch.manual_seed(3)
    logits = torch.randn(9, 1823, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 1823, (9,))
    got = kernels.token_logprobs(logits, targets)
    ref_logits = logits.detach().clone().requires_grad_(True)
    ref = torch.log_softmax(ref_logits.float(), -1).gather(1, targets[:, None])[:, 0]
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, ref, atol=tol, rtol=0)
    w = torch.randn(9)
    (got * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(logits.grad.float(), ref_logits.grad.float(), atol=tol, rtol=0)
    assert math.isfinite(got.sum().item())


def test_dispatch_env_is_validated(monkeypatch):
    monkeypatch.setenv("RLHF_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match="RLHF_KERNELS"):
        kernels.token_logprobs(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long))
