"""Each Triton kernel against its torch reference: on the CPU under TRITON_INTERPRET=1 (the
default, tests/conftest.py), compiled on the GPU when CUDA is there and TRITON_INTERPRET=0
(scripts/gpu_check.sh)."""
from __future__ import annotations

import os

import pytest
import torch
from scipy.stats import chisquare

from serve import kernels
from serve.kernels.entropy_kl import entropy_kl_ref
from serve.kernels.entropy_kl_triton import entropy_kl_triton
from serve.kernels.logprobs import token_logprobs_ref
from serve.kernels.logprobs_triton import token_logprobs_triton
from serve.kernels.sampling import filtered_probs, sample_ref
from serve.kernels.sampling_triton import (CANDIDATES, FULL_ROW, GREEDY, PLAIN, sample_triton,
                                           sample_triton_paths)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET,
                                reason="compiled Triton needs CUDA; without a GPU set TRITON_INTERPRET=1")


def _logits(n, v, dtype=torch.float32, seed=0, scale=2.0):
    """Drawn on the CPU (the same numbers on every device), then moved to DEVICE."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g) * scale).to(dtype).to(DEVICE)


def _on(*ts):
    return tuple(t.to(DEVICE) for t in ts)


@pytest.mark.parametrize("V", [1823, 30522, 50257])
@pytest.mark.parametrize("N", [1, 3, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_kernel_matches_reference(V, N, dtype):
    x = _logits(N, V, dtype, seed=V + N).requires_grad_(True)
    t = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(N)).to(DEVICE)
    got = token_logprobs_triton(x, t)
    xr = x.detach().clone().requires_grad_(True)
    ref = token_logprobs_ref(xr, t)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    w = torch.linspace(-1, 1, N, device=DEVICE)
    g1, = torch.autograd.grad((got * w).sum(), x)
    g2, = torch.autograd.grad((ref * w).sum(), xr)
    assert g1.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(g1.float(), g2.float(), atol=tol, rtol=0)


def test_token_logprobs_backward_matches_autograd_of_naive():
    x = _logits(5, 1823).requires_grad_(True)
    t = torch.tensor([0, 1822, 7, 7, 900], device=DEVICE)
    g1, = torch.autograd.grad(token_logprobs_triton(x, t).sum(), x)
    g2, = torch.autograd.grad(torch.log_softmax(x, -1).gather(1, t[:, None]).sum(), x)
    torch.testing.assert_close(g1, g2, atol=1e-6, rtol=0)


def _huge_row_view(V: int, dtype=torch.bfloat16):
    """(2, V) rows 2^31 elements apart: the second row's offset overflows int32. On the CPU
    torch.empty only reserves address space (only the pages we write are touched); on a GPU it
    takes 4 GiB."""
    stride = 2 ** 31
    big = torch.empty(stride + V, dtype=dtype, device=DEVICE)
    x = big.as_strided((2, V), (stride, 1))
    x.copy_(_logits(2, V, dtype, seed=5))
    return big, x


def test_int64_offsets_where_n_times_v_passes_2_31():
    big, x = _huge_row_view(4096)
    dense = x.clone()
    t = torch.tensor([17, 4000], device=DEVICE)
    torch.testing.assert_close(token_logprobs_triton(x, t), token_logprobs_ref(dense, t), atol=1e-5, rtol=0)
    ones = torch.ones(2, dtype=torch.float32)
    tok, _ = sample_triton(x, *_on(torch.zeros(2), torch.zeros(2, dtype=torch.long), ones, torch.zeros(2),
                                   torch.arange(2), torch.zeros(2, dtype=torch.long)))
    assert tok.tolist() == dense.float().argmax(-1).tolist()
    got = entropy_kl_triton(x, x, t)
    ref = entropy_kl_ref(dense, dense, t)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    del big


@pytest.mark.parametrize("V", [1823, 30522])
@pytest.mark.parametrize("N", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_kl_kernel_matches_reference(V, N, dtype):
    p = _logits(N, V, dtype, seed=1)
    q = (p.float() + _logits(N, V, seed=2, scale=0.5)).to(dtype)
    t = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    for a, b in zip(entropy_kl_triton(p, q, t), entropy_kl_ref(p, q, t)):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)
    ent, kl, lp, lq = entropy_kl_triton(p, p, t)
    assert kl.abs().max() < 1e-4 and (lp == lq).all()   # KL(p||p) = 0


def _params(B, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    return _on(torch.full((B,), float(temperature)), torch.full((B,), top_k, dtype=torch.long),
               torch.full((B,), float(top_p)), torch.full((B,), float(min_p)))


def test_sampling_kernel_mixed_rows_match_reference():
    B, V = 8, 1823
    x = _logits(B, V, seed=11)
    temp, k, p, mp, seed, off = _on(
        torch.tensor([0.0, 1.0, 0.7, 1.0, 1.3, 0.9, 1.0, 0.5]), torch.tensor([0, 0, 50, 0, 1, 20, V, 3]),
        torch.tensor([1.0, 1.0, 1.0, 0.8, 1.0, 0.5, 1.0, 0.9]),
        torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.05, 0.0, 0.1]), torch.arange(B) * 7 + 3, torch.arange(B) * 5)
    tok, lp = sample_triton(x, temp, k, p, mp, seed, off)
    rtok, rlp = sample_ref(x, temp, k, p, mp, seed, off)
    assert tok.tolist() == rtok.tolist()
    torch.testing.assert_close(lp, rlp, atol=1e-5, rtol=0)
    # each row alone gives its token: nothing leaks between rows
    for b in (2, 5):
        t1, _ = sample_triton(x[b:b + 1], temp[b:b + 1], k[b:b + 1], p[b:b + 1], mp[b:b + 1], seed[b:b + 1],
                              off[b:b + 1])
        assert t1.item() == tok[b].item()


@pytest.mark.parametrize("V", [30522, 50257])
def test_sampling_kernel_large_vocab(V):
    B = 3
    x = _logits(B, V, seed=V)
    for params in (_params(B, temperature=0.0), _params(B, temperature=1.0), _params(B, top_k=1),
                   _params(B, temperature=0.8, top_k=V, top_p=1.0)):
        args = (*params, *_on(torch.tensor([1, 2, 3]), torch.tensor([0, 9, 4])))
        tok, lp = sample_triton(x, *args)
        rtok, rlp = sample_ref(x, *args)
        assert tok.tolist() == rtok.tolist()
        torch.testing.assert_close(lp, rlp, atol=1e-5, rtol=0)


def test_top_k_1_and_temperature_0_are_argmax_and_k_eq_v_is_plain_sampling():
    B, V = 6, 777
    x = _logits(B, V, seed=4)
    seeds, offs = _on(torch.arange(B), torch.zeros(B, dtype=torch.long))
    for params in (_params(B, temperature=0.0), _params(B, temperature=1.7, top_k=1)):
        assert sample_triton(x, *params, seeds, offs)[0].tolist() == x.argmax(-1).tolist()
    plain = sample_triton(x, *_params(B), seeds, offs)[0]
    full = sample_triton(x, *_params(B, top_k=V, top_p=1.0), seeds, offs)[0]
    assert plain.tolist() == full.tolist()


def _rows(V, rows, seed):
    """rows of (scale, temperature, top_k, top_p, min_p) -> logits (B, V) scaled per row, and the six
    sampling arguments (seeds and offsets per row)."""
    scale, temp, k, p, mp = (torch.tensor(c) for c in zip(*rows))
    B = len(rows)
    x = _logits(B, V, seed=seed, scale=1.0) * scale.to(DEVICE)[:, None]
    return x, _on(temp.float(), k.long(), p.float(), mp.float(), torch.arange(B) * 11 + 1, torch.arange(B))


def _assert_matches_reference(x, args, **kw):
    tok, lp, paths = sample_triton_paths(x, *args, **kw)
    rtok, rlp = sample_ref(x, *args)
    assert tok.tolist() == rtok.tolist()
    torch.testing.assert_close(lp, rlp, atol=1e-5, rtol=0)
    return paths.tolist()


def test_sampling_kernel_edge_cases_across_chunks_take_the_candidate_path():
    V = 20000   # three chunks of 8192 (the last one partial): the rows are combined across programs
    x, args = _rows(V, [
        (2.0, 0.0, 0, 1.0, 0.0),        # greedy
        (2.0, 1.0, 0, 1.0, 0.0),        # no filter: one chunk scanned for the draw
        (1.0, 0.8, 50, 0.9, 0.0),       # the benchmark's filters
        (2.0, 1.7, 1, 1.0, 0.0),        # k = 1: the argmax
        (2.0, 1.0, V - 1, 1.0, 0.0),    # k = V - 1: the cut in the lowest bins, almost all kept for sure
        (2.0, 1.0, 0, 0.0, 0.0),        # top_p = 0: the most likely token only
        (2.0, 1.0, 0, 1.0, 1.0),        # min_p = 1: p >= p_max
        (2.0, 0.05, 20, 1.0, 0.0),      # T = 0.05
        (4.0, 1.3, 0, 0.5, 0.05),       # top-p and min-p
        (2.0, 1.0, V + 5, 1.0, 0.0),    # k > V: no filter
        (4.0, 1.0, 0, 0.95, 0.0),       # top-p alone: M_k is Z
        (2.0, 0.7, 3000, 0.8, 0.0),     # top-p over 3,000 top-k survivors
    ], seed=21)
    assert _assert_matches_reference(x, args) == [GREEDY, PLAIN] + [CANDIDATES] * 7 + [PLAIN] + [CANDIDATES] * 2


def test_sampling_kernel_full_row_path_matches_reference():
    """With 4 candidate slots the rows with more candidates take the full-row search, same tokens."""
    x, args = _rows(20000, [(1.0, 0.8, 50, 0.9, 0.0), (2.0, 1.0, 500, 1.0, 0.0), (2.0, 0.7, 3000, 0.8, 0.0),
                            (2.0, 1.0, 0, 1.0, 0.05), (2.0, 1.7, 1, 1.0, 0.0)], seed=22)
    assert _assert_matches_reference(x, args, cap=4) == [FULL_ROW] * 4 + [CANDIDATES]


def test_sampling_kernel_masked_vocabulary_and_cut_beyond_the_histogram():
    # a padded vocabulary: tokens >= 12000 are -inf, the whole last chunk among them; k = 15000
    # reaches into the -inf tokens (kept by top-k, never drawn)
    x, args = _rows(20000, [(2.0, 0.0, 0, 1.0, 0.0), (2.0, 1.0, 0, 1.0, 0.0), (2.0, 1.0, 50, 1.0, 0.0),
                            (2.0, 0.9, 15000, 1.0, 0.0), (2.0, 1.0, 0, 0.9, 0.0)], seed=3)
    x[:, 12000:] = -float("inf")
    paths = _assert_matches_reference(x, args)
    assert paths[:3] == [GREEDY, PLAIN, CANDIDATES]
    # the 900th of 1000 logits of scale 20 lies ~85 logits below the max, past the histogram's 32:
    # the candidates are the histogram's last bin
    x, args = _rows(1000, [(20.0, 1.0, 900, 1.0, 0.0), (20.0, 1.0, 900, 0.99, 0.0)], seed=4)
    sorted_x = x.sort(-1, descending=True).values
    assert ((sorted_x[:, 0] - sorted_x[:, 899]) > 32).all()
    assert _assert_matches_reference(x, args) == [CANDIDATES] * 2


@pytest.mark.slow
@pytest.mark.parametrize("kw", [dict(temperature=0.8, top_k=5), dict(top_p=0.6), dict(min_p=0.1, temperature=1.2)])
def test_sampling_kernel_distribution_chi_square(kw):
    V, N = 12, 300  # four launches of ~70 interpreted calls per row: keep N small
    logits = _logits(1, V, seed=9, scale=1.0)
    args = (*_params(N, **kw), *_on(torch.full((N,), 99, dtype=torch.long), torch.arange(N)))
    tok, _ = sample_triton(logits.expand(N, V), *args)
    assert tok.tolist() == sample_ref(logits.expand(N, V), *args)[0].tolist()
    p = filtered_probs(logits, *_params(1, **kw))[0].double().cpu()
    counts = torch.bincount(tok.cpu(), minlength=V).double()
    assert counts[p == 0].sum() == 0
    keep = p > 0
    assert keep.sum() >= 3
    assert chisquare(counts[keep].numpy(), (p[keep] / p[keep].sum() * N).numpy()).pvalue > 1e-4


def test_dispatch_forced_to_triton_runs_the_kernels(monkeypatch):
    monkeypatch.setenv("RLHF_KERNELS", "triton")
    called = []
    import serve.kernels.logprobs_triton as lt
    orig = lt.token_logprobs_triton
    monkeypatch.setattr(lt, "token_logprobs_triton", lambda *a: called.append(1) or orig(*a))
    x, t = _logits(2, 100), torch.tensor([3, 4], device=DEVICE)
    torch.testing.assert_close(kernels.token_logprobs(x, t), token_logprobs_ref(x, t))
    assert called
    monkeypatch.setenv("RLHF_KERNELS", "torch")
    assert kernels.entropy_kl(x, x, t)[0].shape == (2,)
