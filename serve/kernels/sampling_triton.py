"""Triton kernel for sampling.py: temperature, top-k, top-p, min-p per row, without sorting.

The filters keep {x : key(x) >= tau} for one threshold tau per row (key: the order-preserving
integer of the float32 bits; ties at tau are all kept), and the draw is the inverse CDF in
vocabulary order with u = uniform(seed, offset), the same counter-based hash as rng.py, so kernel
and reference draw the same token. A row is split over C chunks of CHUNK tokens:

  1. _stats   (B x C programs): per chunk the max, first argmax, sum exp((x - max) / T) and, for
              filtered rows, a histogram of the chunk on a grid of W = 1/4 logit, counted down from
              the chunk's top bin (NB bins, the last one holds everything further down).
  2. _select  (B): m, argmax, Z from the chunks; the row histogram (exact counts; the mass of a
              bin is bounded by its edges) gives the bins [j_lo, j_hi] that can hold tau. Bins
              above j_lo are kept for sure (S), bins below j_hi dropped for sure (L), the tokens in
              between are the candidates; each chunk gets the offset its candidates go to.
  3. _compact (B x C): copies the candidates, in vocabulary order, into a (B, cap) buffer and sums
              the mass of S per chunk. Chunks with neither are not read.
  4. _solve   (B): the exact tau over the candidates only (the top-k, top-p and min-p cuts, counts
              and masses of S added; a 16-ary search, _search), checked to fall between S and L;
              then the chunk whose cumulative kept mass holds u * total, and the inverse CDF
              inside that chunk.
Rows whose candidates do not fit in `cap`, or whose cut is not between S and L, take the full-row
path: the same cuts searched over the whole row, one program per row.

Bytes read per row, V = 128,256 fp32 (513 KB), the benchmark's top_k=50, top_p=0.9, T=0.8:
  candidates: stats 1 pass + compact <= 1 pass + histograms 2 x 8 KB + one chunk (32 KB) for the
    draw + ~40 candidates (8 B each) per search step, L1-resident: ~2.1 passes, ~1.1 MB;
  unfiltered rows: 1 pass + one chunk; greedy rows: 1 pass;
  full-row path: 1 + 8 (top-k) + 1 + ~6 (top-p) + 2 (draw) = ~18 passes, ~9 MB, one program per row;
  the previous kernel (bisection, every row): 1 + 32 + 1 + ~22 + 2 = ~58 passes, ~29 MB.
Everything stays on the device: no host synchronisation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

GREEDY, PLAIN, CANDIDATES, FULL_ROW = 0, 1, 2, 3   # the path a row takes (sample_triton_paths)
CHUNK = 8192    # tokens per program in the (B, C) passes: one register tile, 16 per thread at 16 warps
NB = 128        # histogram bins of W = 1/4 logit: 32 logits below the top, then one bin for the rest
INV_W = 4.0     # 1 / W (a power of 2: x * INV_W is exact)
CAP = 8192      # candidate slots per row (64 KB); a row with more takes the full-row path
BLOCK = 2048    # tile of the loops over a row (masses, the draw inside one chunk)
SBLOCK = 512    # tile of the searches and of the loops over the candidates
PIVOTS = 16     # thresholds tried per search pass: a (SBLOCK, PIVOTS) compare, 8 passes for 32 bits

_KEY_MIN = tl.constexpr(-2147483648)   # below every key: "no cut"
_KEY_MAX = tl.constexpr(2147483647)
_G_NONE = tl.constexpr(-1073741824)     # below every grid coordinate (_grid clamps to +-2^29)
_INV_W = tl.constexpr(INV_W)
_GREEDY = tl.constexpr(GREEDY)
_PLAIN = tl.constexpr(PLAIN)
_CANDIDATES = tl.constexpr(CANDIDATES)
_FULL_ROW = tl.constexpr(FULL_ROW)
# plan (B, 6) int64 columns: path, argmax, g_s, g_l (candidates: g_l <= _grid(x) < g_s), |S|, candidates
_P_PATH, _P_ARGMAX, _P_GS, _P_GL, _P_ACNT, _P_NCAND = (tl.constexpr(i) for i in range(6))


@triton.jit
def _fmix32(h):
    # h: uint64 holding a 32-bit value; products of two 32-bit values fit in 64 bits
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


@triton.jit
def _uniform(seed, offset):
    s = seed.to(tl.uint64, bitcast=True)
    o = offset.to(tl.uint64, bitcast=True)
    h = _fmix32((s & 0xFFFFFFFF) ^ _fmix32((o & 0xFFFFFFFF) ^ 0x9E3779B9))
    h = _fmix32(h ^ (s >> 32))
    return (h >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def _key(x):
    # order-preserving int32 key of float32 values (thresholds are int64: search ranges reach 2^32)
    b = x.to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _grid(x):
    # histogram coordinate floor(x / W): x * INV_W is exact, so every pass bins a token alike and
    # coordinate g holds exactly [g W, (g + 1) W); clamped so that differences fit in int32
    return tl.floor(tl.minimum(tl.maximum(x * _INV_W, -536870912.0), 536870912.0)).to(tl.int32)


@triton.jit
def _min_p_cut(m, min_p, inv_t):
    # p >= min_p * p_max  <=>  x >= m + T log(min_p) (callers ignore it when min_p <= 0)
    return m + tl.log(tl.where(min_p > 0, min_p, 1.0)) / inv_t


@triton.jit
def _row_params(row, temp_ptr, topk_ptr, topp_ptr, minp_ptr, V):
    T = tl.load(temp_ptr + row)
    greedy = T <= 0
    inv_t = 1.0 / tl.where(greedy, 1.0, T)          # greedy rows: logprob at T = 1
    k = tl.load(topk_ptr + row)
    top_p = tl.load(topp_ptr + row)
    min_p = tl.load(minp_ptr + row)
    k_on = (k > 0) & (k < V)                         # top_k 0 or >= V keeps everything
    p_on = top_p < 1.0
    m_on = min_p > 0.0
    filtered = (T > 0) & (k_on | p_on | m_on)
    return greedy, inv_t, k, k_on, top_p, p_on, min_p, m_on, filtered


@triton.jit
def _mass_ge(base, n, t, m, inv_t, BLOCK: tl.constexpr):
    z = tl.full((), 0.0, tl.float32)
    for start in range(0, n, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < n, other=-float("inf")).to(tl.float32)
        z += tl.sum(tl.where((cols < n) & (_key(x) >= t), tl.exp((x - m) * inv_t), 0.0), 0)
    return z


@triton.jit
def _search(base, n, need, lo, hi, m, inv_t, MASS: tl.constexpr, BLOCK: tl.constexpr, P: tl.constexpr):
    # the largest t in [lo, hi) with f(t) >= need, given f(lo) >= need, where f(t) is the count
    # (MASS: the mass exp((x - m) / T)) of base[:n] with key >= t: the k-th largest key, the top-p
    # cut. Each pass evaluates f at P pivots splitting [lo, hi) evenly (a (BLOCK, P) compare), so
    # the range shrinks (P + 1)x per pass: 8 passes for 32 bits at P = 16 (bisection: 32)
    q = tl.arange(0, P)
    while hi - lo > 1:
        piv = lo + ((hi - lo) * (q + 1)) // (P + 1)                        # (P,) ascending in [lo, hi)
        f = tl.full((P,), 0.0, tl.float32)
        for start in range(0, n, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < n, other=-float("inf")).to(tl.float32)
            if MASS:
                w = tl.where(cols < n, tl.exp((x - m) * inv_t), 0.0)
            else:
                w = tl.where(cols < n, 1.0, 0.0)
            ge = _key(x)[:, None] >= piv.to(tl.int32)[None, :]                # (BLOCK, P)
            f += tl.sum(tl.where(ge, w[:, None], 0.0), 0)
        ok = f >= need                                                       # a prefix: f falls with t
        lo = tl.max(tl.where(ok, piv, lo), 0)
        hi = tl.min(tl.where(ok, hi, piv), 0)
    return lo


@triton.jit
def _inverse_cdf(base, start, end, tau, m, inv_t, run, target, BLOCK: tl.constexpr):
    # first kept token in [start, end) whose running mass (from `run`) passes target; the last
    # kept one when rounding leaves target unreached
    chosen = tl.full((), 0, tl.int64) + end
    last = tl.full((), -1, tl.int64)
    for s in range(start, end, BLOCK):
        cols = s + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < end, other=-float("inf")).to(tl.float32)
        keep = (cols < end) & (_key(x) >= tau)
        e = tl.where(keep, tl.exp((x - m) * inv_t), 0.0)
        cs = tl.cumsum(e, 0) + run
        chosen = tl.minimum(chosen, tl.min(tl.where(keep & (cs > target), cols, end), 0).to(tl.int64))
        last = tl.maximum(last, tl.max(tl.where(keep, cols, -1), 0).to(tl.int64))
        run += tl.sum(e, 0)
    return tl.where(chosen < end, chosen, last)


@triton.jit(do_not_specialize=["V", "C"])
def _stats(logits_ptr, stride, temp_ptr, topk_ptr, topp_ptr, minp_ptr, V, C,
           cmax_ptr, carg_ptr, csum_ptr, ctop_ptr, hist_ptr, CHUNK: tl.constexpr, NB: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    greedy, inv_t, k, k_on, top_p, p_on, min_p, m_on, filtered = _row_params(
        row, temp_ptr, topk_ptr, topp_ptr, minp_ptr, V)
    cols = c * CHUNK + tl.arange(0, CHUNK)
    mask = cols < V
    x = tl.load(logits_ptr + row * stride + cols, mask=mask, other=-float("inf")).to(tl.float32)  # (CHUNK,)
    cmax = tl.max(x, 0)
    out = row * C + c
    tl.store(cmax_ptr + out, cmax)
    tl.store(carg_ptr + out, tl.min(tl.where(x == cmax, cols, V), 0))   # first index of the chunk max
    # a chunk of -inf (a masked vocabulary tail) sums to 0 instead of exp(nan)
    tl.store(csum_ptr + out, tl.sum(tl.exp((x - tl.where(cmax > -float("inf"), cmax, 0.0)) * inv_t), 0))
    if filtered:
        top = _grid(cmax)
        tl.store(ctop_ptr + out, top)
        b = tl.minimum(top - _grid(x), NB - 1)                               # bin below the chunk's top
        tl.store(hist_ptr + out * NB + tl.arange(0, NB), tl.histogram(b, NB, mask=mask))


@triton.jit
def _plan_candidates(row, V, C, k, k_on, top_p, p_on, min_p, m_on, m, z, inv_t,
                     ctop_ptr, hist_ptr, coff_ptr, CP: tl.constexpr, NB: tl.constexpr):
    """-> (g_s, g_l, a_cnt, n_cand): candidates are the tokens with g_l <= _grid(x) < g_s."""
    cs = tl.arange(0, CP)
    live = cs < C
    jj = tl.arange(0, NB)
    top = _grid(m)                                                           # = max of the chunk tops
    shift = top - tl.load(ctop_ptr + row * C + cs, mask=live, other=0)      # (CP,) chunk bin -> row bin
    # row histogram (NB,): row bin j is chunk c's bin j - shift[c]; the last bin is the rest of V
    src = jj[None, :] - shift[:, None]                                       # (CP, NB)
    ok = live[:, None] & (src >= 0) & (src < NB - 1) & (jj[None, :] < NB - 1)
    cnt = tl.sum(tl.load(hist_ptr + (row * C + cs[:, None]) * NB + src, mask=ok, other=0), 0)
    cnt = tl.where(jj == NB - 1, V - tl.sum(cnt, 0), cnt)
    cum = tl.cumsum(cnt, 0)
    # a token of row bin j has m - x in ((j - 1) W, (j + 1) W): its mass exp((x - m) / T) lies in
    # (lo_e[j], hi_e[j]]. Bounds on the mass of bins <= j: summed from the top, and Z minus the
    # bounds on the bins below (tight where the tail is small, as at top_p = 0.9: alone, the sums
    # from the top are off by up to e^(2W/T), 1.28x at T = 1); 1e-4 of slack for fp32 sums
    wt = inv_t / _INV_W
    jf = jj.to(tl.float32)
    lo_e = tl.where(jj < NB - 1, tl.exp(-(jf + 1.0) * wt), 0.0)
    hi_e = tl.exp(-tl.maximum(jf - 1.0, 0.0) * wt)
    head_lo = tl.cumsum(cnt.to(tl.float32) * lo_e, 0)
    head_hi = tl.cumsum(cnt.to(tl.float32) * hi_e, 0)
    cm_lo = tl.maximum(head_lo, z - (tl.sum(cnt.to(tl.float32) * hi_e, 0) - head_hi)) * (1.0 - 1e-4)
    cm_hi = tl.minimum(head_hi, z - (tl.sum(cnt.to(tl.float32) * lo_e, 0) - head_lo)) * (1.0 + 1e-4)
    last = NB - 1
    # top-k: exact bin; bounds on the top-k mass M_k (Z when there is no top-k): the bins above
    # j_k, and the rest of the k tokens from bin j_k
    j_k = tl.min(tl.where(cum >= k, jj, last), 0)
    rest = (k - tl.sum(tl.where(jj < j_k, cnt, 0), 0)).to(tl.float32)
    take = tl.where(jj < j_k, cnt.to(tl.float32), tl.where(jj == j_k, rest, 0.0))
    mk_lo = tl.where(k_on, tl.sum(take * lo_e, 0), z)
    mk_hi = tl.where(k_on, tl.sum(take * hi_e, 0), z)
    # top-p: the first bin whose cumulative mass reaches top_p * M_k, earliest and latest possible
    jp_lo = tl.min(tl.where(cm_hi >= top_p * mk_lo, jj, last), 0)
    jp_hi = tl.min(tl.where(cm_lo >= top_p * mk_hi, jj, last), 0)
    jp_lo = tl.where(k_on, tl.minimum(jp_lo, j_k), jp_lo)
    jp_hi = tl.where(k_on, tl.minimum(jp_hi, j_k), jp_hi)
    # min-p: the bin of its cut, exactly
    j_m = tl.minimum(tl.maximum(top - _grid(_min_p_cut(m, min_p, inv_t)), 0), last)
    # tau = max of the active cuts, so its bin is the min of theirs
    j_lo = tl.minimum(tl.minimum(tl.where(k_on, j_k, last), tl.where(p_on, jp_lo, last)), tl.where(m_on, j_m, last))
    j_hi = tl.minimum(tl.minimum(tl.where(k_on, j_k, last), tl.where(p_on, jp_hi, last)), tl.where(m_on, j_m, last))
    j_hi = tl.where(k_on & p_on, j_k, j_hi)       # top-p needs M_k exactly: keep the top-k bin too
    # candidates per chunk -> offsets into the row's buffer, in vocabulary order
    h = tl.load(hist_ptr + (row * C + cs[:, None]) * NB + jj[None, :], mask=live[:, None], other=0)  # (CP, NB)
    rb = tl.minimum(jj[None, :] + shift[:, None], last)
    per = tl.sum(tl.where((rb >= j_lo) & (rb <= j_hi), h, 0), 1)                                      # (CP,)
    tl.store(coff_ptr + row * C + cs, tl.cumsum(per, 0) - per, mask=live)
    g_l = tl.where(j_hi == last, _G_NONE, top - j_hi)
    a_cnt = tl.sum(tl.where(jj < j_lo, cnt, 0), 0)
    return (top - j_lo + 1).to(tl.int64), g_l.to(tl.int64), a_cnt.to(tl.int64), tl.sum(per, 0).to(tl.int64)


@triton.jit(do_not_specialize=["V", "C", "cap"])
def _select(temp_ptr, topk_ptr, topp_ptr, minp_ptr, V, C, cap, cmax_ptr, carg_ptr, csum_ptr, ctop_ptr,
            hist_ptr, plan_ptr, rowf_ptr, coff_ptr, above_ptr, CP: tl.constexpr, NB: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    greedy, inv_t, k, k_on, top_p, p_on, min_p, m_on, filtered = _row_params(
        row, temp_ptr, topk_ptr, topp_ptr, minp_ptr, V)
    cs = tl.arange(0, CP)
    live = cs < C
    cmax = tl.load(cmax_ptr + row * C + cs, mask=live, other=-float("inf"))     # (CP,)
    m = tl.max(cmax, 0)
    argmax = tl.load(carg_ptr + row * C + tl.min(tl.where(cmax == m, cs, CP), 0))
    zc = tl.load(csum_ptr + row * C + cs, mask=live, other=0.0) * tl.where(live, tl.exp((cmax - m) * inv_t), 0.0)
    z = tl.sum(zc, 0)
    path = tl.where(greedy, _GREEDY, _PLAIN).to(tl.int64)
    g_s = tl.full((), 0, tl.int64)
    g_l = tl.full((), 0, tl.int64)
    a_cnt = tl.full((), 0, tl.int64)
    n_cand = tl.full((), 0, tl.int64)
    if filtered:
        g_s, g_l, a_cnt, n_cand = _plan_candidates(row, V, C, k, k_on, top_p, p_on, min_p, m_on, m, z, inv_t,
                                                   ctop_ptr, hist_ptr, coff_ptr, CP, NB)
        path = tl.where(n_cand <= cap, _CANDIDATES, _FULL_ROW).to(tl.int64)
    else:
        tl.store(above_ptr + row * C + cs, zc, mask=live)    # unfiltered: every token is kept
    p = plan_ptr + row * 6
    tl.store(p + _P_PATH, path)
    tl.store(p + _P_ARGMAX, argmax.to(tl.int64))
    tl.store(p + _P_GS, g_s.to(tl.int64))
    tl.store(p + _P_GL, g_l.to(tl.int64))
    tl.store(p + _P_ACNT, a_cnt.to(tl.int64))
    tl.store(p + _P_NCAND, n_cand.to(tl.int64))
    tl.store(rowf_ptr + row * 2, m)
    tl.store(rowf_ptr + row * 2 + 1, z)


@triton.jit(do_not_specialize=["V", "C", "cap"])
def _compact(logits_ptr, stride, temp_ptr, V, C, cap, ctop_ptr, plan_ptr, rowf_ptr, coff_ptr, above_ptr,
             cval_ptr, cidx_ptr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    # the chunk in tiles of BLOCK at 4 warps: small programs, many per SM, so that one's chain of
    # dependent loads (plan, offsets, then the logits) overlaps the others' streaming
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    p = plan_ptr + row * 6
    if tl.load(p + _P_PATH) == _CANDIDATES:
        g_s = tl.load(p + _P_GS).to(tl.int32)
        g_l = tl.load(p + _P_GL).to(tl.int32)
        off = tl.load(coff_ptr + row * C + c)
        nxt = tl.where(c + 1 < C, tl.load(coff_ptr + row * C + c + 1, mask=c + 1 < C, other=0),
                       tl.load(p + _P_NCAND).to(tl.int32))
        above = tl.full((), 0.0, tl.float32)
        if (tl.load(ctop_ptr + row * C + c) >= g_s) | (nxt > off):     # the chunk has S or candidates
            m = tl.load(rowf_ptr + row * 2)
            inv_t = 1.0 / tl.load(temp_ptr + row)
            for start in range(c * CHUNK, tl.minimum(c * CHUNK + CHUNK, V), BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < V
                x = tl.load(logits_ptr + row * stride + cols, mask=mask, other=-float("inf")).to(tl.float32)
                g = _grid(x)
                above += tl.sum(tl.where(mask & (g >= g_s), tl.exp((x - m) * inv_t), 0.0), 0)
                cand = mask & (g < g_s) & (g >= g_l)
                pos = row * cap + off + tl.cumsum(cand.to(tl.int32), 0) - 1
                tl.store(cval_ptr + pos, x, mask=cand)
                tl.store(cidx_ptr + pos, cols, mask=cand)
                off += tl.sum(cand.to(tl.int32), 0)
        tl.store(above_ptr + row * C + c, above)


@triton.jit
def _cut_candidates(cval, n, a_cnt, a_mass, e_l, e_s, k, k_on, top_p, p_on, min_p, m_on, m, z, inv_t,
                    BLOCK: tl.constexpr, P: tl.constexpr):
    """tau from the n candidate logits at cval, S's count and mass added -> (tau, ok): ok when tau
    lies between L's keys (< e_l) and S's (>= e_s), so S is kept and L dropped as planned."""
    lo = tl.full((), _KEY_MAX, tl.int64)
    hi = tl.full((), _KEY_MIN, tl.int64)
    for start in range(0, n, BLOCK):
        i = start + tl.arange(0, BLOCK)
        kx = _key(tl.load(cval + i, mask=i < n, other=0.0))
        lo = tl.minimum(lo, tl.min(tl.where(i < n, kx, _KEY_MAX), 0))
        hi = tl.maximum(hi, tl.max(tl.where(i < n, kx, _KEY_MIN), 0))
    hi += 1
    ok = tl.full((), True, tl.int1)
    tau_k = tl.full((), _KEY_MIN, tl.int64)
    mk = z
    if k_on:
        in_cands = a_cnt + n >= k
        ok = ok & (in_cands | (top_p >= 1.0))      # a cut below the candidates leaves M_k unknown
        if in_cands:
            tau_k = _search(cval, n, (k - a_cnt).to(tl.float32), lo, hi, m, inv_t, False, BLOCK, P)
            mk = a_mass + _mass_ge(cval, n, tau_k, m, inv_t, BLOCK)
    tau_p = tl.full((), _KEY_MIN, tl.int64)
    if p_on:
        rest = top_p * mk - a_mass               # mass the candidates must add
        ok = ok & ((a_cnt == 0) | (rest > 0))    # else the cut lies inside S
        start = tl.maximum(lo, tau_k)
        if _mass_ge(cval, n, start, m, inv_t, BLOCK) >= rest:   # else below: top-p keeps them all
            tau_p = _search(cval, n, rest, start, hi, m, inv_t, True, BLOCK, P)
    tau_m = tl.where(m_on, _key(_min_p_cut(m, min_p, inv_t)), _KEY_MIN)
    tau = tl.maximum(tl.maximum(tau_k, tau_p), tau_m)
    return tau, ok & (tau >= e_l) & (tau <= e_s)


@triton.jit
def _draw_by_chunks(base, V, above, C, cval, cidx, n, tau, m, inv_t, u,
                    CHUNK: tl.constexpr, CP: tl.constexpr, BLOCK: tl.constexpr, SBLOCK: tl.constexpr):
    # kept mass per chunk (CP,): S's (or the whole chunk's) plus the kept candidates'
    cs = tl.arange(0, CP)
    mass = tl.load(above + cs, mask=cs < C, other=0.0)
    for start in range(0, n, SBLOCK):
        i = start + tl.arange(0, SBLOCK)
        x = tl.load(cval + i, mask=i < n, other=-float("inf"))
        e = tl.where((i < n) & (_key(x) >= tau), tl.exp((x - m) * inv_t), 0.0)
        chunk = tl.load(cidx + i, mask=i < n, other=0) // CHUNK
        mass += tl.sum(tl.where(chunk[:, None] == cs[None, :], e[:, None], 0.0), 0)   # (SBLOCK, CP) -> (CP,)
    target = u * tl.sum(mass, 0)
    cum = tl.cumsum(mass, 0)
    c = tl.minimum(tl.min(tl.where((cum > target) & (mass > 0), cs, CP), 0), tl.max(tl.where(mass > 0, cs, 0), 0))
    start = c * CHUNK
    return _inverse_cdf(base, start, tl.minimum(start + CHUNK, V), tau, m, inv_t,
                        tl.sum(tl.where(cs < c, mass, 0.0), 0), target, BLOCK)


@triton.jit
def _draw_full_row(base, V, k, k_on, top_p, p_on, min_p, m_on, m, inv_t, u,
                   BLOCK: tl.constexpr, SBLOCK: tl.constexpr, P: tl.constexpr):
    # the cuts searched over the whole row: <= 8 passes each, + 1 for the top-p mass, + 2 to draw
    kmax1 = _key(m).to(tl.int64) + 1
    tau = tl.full((), _KEY_MIN, tl.int64)
    if k_on:
        tau = _search(base, V, k.to(tl.float32), tau, kmax1, m, inv_t, False, SBLOCK, P)
    if p_on:   # top-p over the top-k survivors
        need = top_p * _mass_ge(base, V, tau, m, inv_t, BLOCK)
        tau = _search(base, V, need, tau, kmax1, m, inv_t, True, SBLOCK, P)
    if m_on:
        tau = tl.maximum(tau, _key(_min_p_cut(m, min_p, inv_t)))
    target = u * _mass_ge(base, V, tau, m, inv_t, BLOCK)
    return _inverse_cdf(base, 0, V, tau, m, inv_t, tl.full((), 0.0, tl.float32), target, BLOCK)


@triton.jit(do_not_specialize=["V", "C", "cap"])
def _solve(logits_ptr, stride, temp_ptr, topk_ptr, topp_ptr, minp_ptr, seed_ptr, off_ptr, V, C, cap,
           plan_ptr, rowf_ptr, above_ptr, cval_ptr, cidx_ptr, tok_ptr, logp_ptr,
           CHUNK: tl.constexpr, CP: tl.constexpr, BLOCK: tl.constexpr, SBLOCK: tl.constexpr, P: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    greedy, inv_t, k, k_on, top_p, p_on, min_p, m_on, filtered = _row_params(
        row, temp_ptr, topk_ptr, topp_ptr, minp_ptr, V)
    base = logits_ptr + row * stride
    p = plan_ptr + row * 6
    path = tl.load(p + _P_PATH)
    m = tl.load(rowf_ptr + row * 2)
    z = tl.load(rowf_ptr + row * 2 + 1)
    tok = tl.load(p + _P_ARGMAX)
    if path != _GREEDY:
        u = _uniform(tl.load(seed_ptr + row), tl.load(off_ptr + row))
        n = tl.load(p + _P_NCAND)
        cval = cval_ptr + row * cap
        tau = tl.full((), _KEY_MIN, tl.int64)
        ok = path != _FULL_ROW
        if path == _CANDIDATES:
            # S: keys >= e_s, L: keys < e_l (grid coordinate g covers exactly [g W, (g + 1) W))
            g_l = tl.load(p + _P_GL)
            e_l = tl.where(g_l == _G_NONE, _KEY_MIN, _key(g_l.to(tl.float32) / _INV_W))
            e_s = _key(tl.load(p + _P_GS).to(tl.float32) / _INV_W)
            cs = tl.arange(0, CP)
            a_mass = tl.sum(tl.load(above_ptr + row * C + cs, mask=cs < C, other=0.0), 0)
            tau, ok = _cut_candidates(cval, n, tl.load(p + _P_ACNT), a_mass, e_l, e_s, k, k_on, top_p, p_on,
                                      min_p, m_on, m, z, inv_t, SBLOCK, P)
        if ok:
            tok = _draw_by_chunks(base, V, above_ptr + row * C, C, cval, cidx_ptr + row * cap, n, tau, m, inv_t, u,
                                  CHUNK, CP, BLOCK, SBLOCK)
        else:
            tok = _draw_full_row(base, V, k, k_on, top_p, p_on, min_p, m_on, m, inv_t, u, BLOCK, SBLOCK, P)
            tl.store(p + _P_PATH, tl.full((), _FULL_ROW, tl.int64))
    xt = tl.load(base + tok).to(tl.float32)
    tl.store(tok_ptr + row, tok)
    tl.store(logp_ptr + row, (xt - m) * inv_t - tl.log(z))


def sample_triton_paths(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                        min_p: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor,
                        cap: int = CAP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sample_triton, plus the path each row took, (B,) int64: GREEDY, PLAIN, CANDIDATES, FULL_ROW."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    B, V = logits.shape
    dev = logits.device
    tok = torch.empty(B, dtype=torch.int64, device=dev)
    logp = torch.empty(B, dtype=torch.float32, device=dev)
    plan = torch.empty(B, 6, dtype=torch.int64, device=dev)
    if not B:
        return tok, logp, plan[:, _P_PATH.value]
    f32 = lambda t: t.to(device=dev, dtype=torch.float32).contiguous()  # noqa: E731
    i64 = lambda t: t.to(device=dev, dtype=torch.int64).contiguous()  # noqa: E731
    params = (f32(temperature), i64(top_k), f32(top_p), f32(min_p))
    # one compiled variant per kernel for V <= 16 x CHUNK (= 131,072): small vocabularies mask
    C = triton.cdiv(V, CHUNK)
    CP = max(16, triton.next_power_of_2(C))
    cap = max(int(cap), 0)
    f = lambda *s: torch.empty(*s, dtype=torch.float32, device=dev)  # noqa: E731
    i = lambda *s: torch.empty(*s, dtype=torch.int32, device=dev)  # noqa: E731
    cmax, csum, above, rowf, cval = f(B, C), f(B, C), f(B, C), f(B, 2), f(B, max(cap, 1))
    carg, ctop, coff, cidx, hist = i(B, C), i(B, C), i(B, C), i(B, max(cap, 1)), i(B, C, NB)
    stride = logits.stride(0)
    _stats[(B, C)](logits, stride, *params, V, C, cmax, carg, csum, ctop, hist, CHUNK=CHUNK, NB=NB, num_warps=16)
    _select[(B,)](*params, V, C, cap, cmax, carg, csum, ctop, hist, plan, rowf, coff, above, CP=CP, NB=NB)
    _compact[(B, C)](logits, stride, params[0], V, C, cap, ctop, plan, rowf, coff, above, cval, cidx,
                     CHUNK=CHUNK, BLOCK=BLOCK, num_warps=4)
    _solve[(B,)](logits, stride, *params, i64(seed), i64(offset), V, C, cap, plan, rowf, above, cval, cidx,
                 tok, logp, CHUNK=CHUNK, CP=CP, BLOCK=BLOCK, SBLOCK=SBLOCK, P=PIVOTS, num_warps=8)
    return tok, logp, plan[:, _P_PATH.value]


def sample_triton(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor,
                  cap: int = CAP) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as sampling.sample_ref. cap: candidate slots per row (memory: B x cap x 8 bytes);
    rows whose candidates do not fit take the full-row path, with the same result."""
    tok, logp, _ = sample_triton_paths(logits, temperature, top_k, top_p, min_p, seed, offset, cap)
    return tok, logp
