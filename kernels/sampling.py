"""Fused top-k / top-p / min-p sampling without a full-vocabulary sort (Triton), and its dispatcher.

`sample(logits [B, V], temperature, top_k, top_p, min_p)` draws one token per row and returns its log-prob
under the raw policy. Semantics (identical in the PyTorch reference, `sampling_reference.py`):
  z = x * (1/T); top-k keeps z >= v_k (k-th largest, ties kept); top-p keeps, among the renormalised top-k
  survivors, z >= the value of the crossing token (first one, in descending order, whose cumulative mass
  reaches top_p); min-p keeps z >= z_max + log(min_p); the token is argmax over kept tokens of z + g with
  Gumbel noise g (the exponential race argmax p / E of vLLM, written in log space). T == 0 is greedy.
Every filter is a threshold on z, so each row needs only thresholds, found without sorting the row:

One program per row (int64 row offsets, logits read in tiles of BLOCK, loads upcast to fp32):
* no filter (temperature only): ONE pass. Online log-sum-exp of x (raw log-prob) and of z (sampling
  log-prob) and a lane-wise Gumbel-max with one Philox call per 4 tokens (randint4x) and log2.
  Cost: 1 read of the row (+1 with return_details for the rank).
* filtered rows, pass A: online log-sum-exp of x, per-lane maxima, greedy argmax, NaN/+inf detection.
  - top-k with 1 <= k <= min(BLOCK, CAP/2) ("candidate path"): the k-th largest lane maximum t0 is a pivot
    with count(z >= t0) >= k (k lanes reach it) and, for real logits, close to k. Pass B counts z >= pivot
    and compacts those tokens (value, index) into a [CAP] scratch row with an in-tile cumsum. If the count
    is above CAP the pivot is raised by bisection (one pass per round, PIVOT_ROUNDS at most). Then exact
    top-k, top-p and min-p thresholds come from bisection on the ordered fp32 bit patterns of the <= CAP
    candidates held in registers (no memory traffic), and the Gumbel-max, both log-probs and the rank are
    computed on the candidates. Cost: 2 reads of the row + O(rounds * CAP) register work.
  - otherwise ("full-row path": top_k = 0 with top_p < 1, k > min(BLOCK, CAP/2), ties beyond CAP, min-p
    only): the same exact bisections with one pass over the row per round, one sum pass and one final
    Gumbel-max pass. Cost: 3 + rounds reads of the row; no sort and no [B, V] temporaries.
  Bisection rounds: at most 32 per threshold (the int32 key space). Each round snaps the lower bound to the
  smallest value >= the midpoint and stops as soon as that value is provably the k-th largest (exactly k
  tokens at or above it) or the top-p crossing value (dropping its tokens loses the target mass). A numpy
  emulation on N(0, 3^2) logits, V = 151,936, took 18 rounds on average for top-p 0.9 and 14 for top-k 50
  (21 at most), so the full-row top-p path reads the row about 21 times (vs. a full sort).
Noise: internal noise is Philox (`tl.rand` / `tl.randint4x`) keyed by (seed, row) with the token index as
counter, so it needs no host sync and is CUDA-graph safe (the seed is a device tensor drawn from
`generator`). Injected noise (`noise=` [B, V] fp32 Gumbel g) reproduces the PyTorch reference bit for
bit: both compute z = x * inv_t and z + g in fp32 (FMA contraction is disabled for these kernels) and take
the first maximum.
Counter noise (`counter=(keys, step)`): the counter-based Gumbel noise of `align.kernels.counter` is drawn
in the kernel at the indices it needs, so the engine's sharding-invariant stream costs no [B, V] tensors.
Invalid rows (NaN or +inf anywhere, or all -inf) return token -1, NaN log-probs and rank -1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from align.kernels._common import next_pow2, resolve_backend
from align.kernels._tl import MAX as _MAX
from align.kernels._tl import MIN as _MIN
from align.kernels._tl import SUM as _SUM
from align.kernels.counter import counter_gumbel
from align.kernels.sampling_reference import (
    RowParams,
    SampleOutput,
    raise_on_invalid,
    row_params,
    sample_reference,
)

CAP_DEFAULT = 2048
PIVOT_ROUNDS = 16


@triton.jit
def _key(x):
    """fp32 -> int32 whose signed order is the float order (-0.0 maps to the key of +0.0)."""
    b = x.to(tl.int32, bitcast=True)
    k = tl.where(b >= 0, b, b ^ 0x7FFFFFFF)
    return tl.where(k == -1, 0, k)


@triton.jit
def _unkey(k):
    k = k.to(tl.int32)
    b = tl.where(k >= 0, k, k ^ 0x7FFFFFFF)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _gumbel(seed_row, idx):
    """Gumbel noise up to an additive constant: -ln2 * log2(-log2(u)) (the constant does not move the argmax)."""
    u = tl.rand(seed_row, idx)
    u = tl.minimum(tl.maximum(u, 1.1754943508222875e-38), 0.99999994)
    return -0.6931471805599453 * tl.log2(-tl.log2(u))


@triton.jit
def _noise_at(noise_ptr, nrow, seed_row, idx, mask, NOISE: tl.constexpr):
    """NOISE 0: Philox keyed by (seed, row); 1: the injected [B, V] tensor; 2: counter noise, where seed_row
    holds the row's sample key and nrow the decode step (see `_noise_args`)."""
    if NOISE == 1:
        g = tl.load(noise_ptr + nrow + idx, mask=mask, other=0.0).to(tl.float32)
    elif NOISE == 2:
        g = counter_gumbel(seed_row, nrow, idx)
    else:
        g = _gumbel(seed_row, idx)
    return g


@triton.jit
def _noise_args(noise_ptr, nstride, seed_ptr, row, NOISE: tl.constexpr):
    """(nrow, seed_row) for `_noise_at`. NOISE 2 passes the [B] int64 sample keys as noise_ptr and the [1]
    int64 decode-step counter as seed_ptr (device tensors: graph-safe, no host values)."""
    if NOISE == 2:
        nrow = tl.load(seed_ptr)
        seed_row = tl.load(noise_ptr + row)
    else:
        nrow = row * nstride
        seed_row = tl.load(seed_ptr) + (row << 32)
    return nrow, seed_row


@triton.jit
def _first_argmax(best, besti, V: tl.constexpr):
    top = tl.reduce(best, 0, _MAX)
    return tl.reduce(tl.where(best == top, besti, V), 0, _MIN)


@triton.jit
def _count_gt(xrow, x_ref, V: tl.constexpr, BLOCK: tl.constexpr):
    n = 0
    for start in range(0, V, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        x = tl.load(xrow + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
        n += tl.reduce((x > x_ref).to(tl.int32), 0, _SUM)
    return n


@triton.jit
def _sample_plain_kernel(x_ptr, stride, inv_t_ptr, noise_ptr, nstride, seed_ptr,
                         tok_ptr, lp_ptr, slp_ptr, rank_ptr,
                         V: tl.constexpr, BLOCK: tl.constexpr, NOISE: tl.constexpr, RANK_MODE: tl.constexpr,
                         UNIT_T: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    xrow = x_ptr + row * stride
    nrow, seed_row = _noise_args(noise_ptr, nstride, seed_ptr, row, NOISE)
    inv_t = tl.load(inv_t_ptr + row)
    greedy = inv_t == 0.0
    inv_t = tl.where(greedy, 1.0, inv_t)
    nscale = tl.where(greedy, 0.0, 1.0)
    Q: tl.constexpr = BLOCK // 4
    lanes = tl.arange(0, Q)
    sub = tl.arange(0, 4)[:, None]
    tile = sub * Q + lanes[None, :]  # [4, Q]: sub-tile r covers tokens start + r*Q + lane
    mx = float("-inf")
    sx = 0.0
    mz = float("-inf")
    sz = 0.0
    bad = tile < 0
    best = tl.full([4, Q], float("-inf"), tl.float32)
    besti = tl.zeros([4, Q], tl.int32)
    for start in range(0, V, BLOCK):
        idx = start + tile
        m = idx < V
        x = tl.load(xrow + idx, mask=m, other=float("-inf")).to(tl.float32)
        bad = bad | (x != x) | (x == float("inf"))
        # online log-sum-exp of x (raw policy) and of z (sampling distribution)
        mx_new = tl.maximum(mx, tl.reduce(tl.reduce(x, 1, _MAX), 0, _MAX))
        ms = tl.where(mx_new == float("-inf"), 0.0, mx_new)
        sx = sx * tl.exp(mx - ms) + tl.reduce(tl.reduce(tl.exp(x - ms), 1, _SUM), 0, _SUM)
        mx = mx_new
        if UNIT_T:  # temperature 1: z == x, the sampling log-sum-exp is the raw one (saves an exp per token)
            z = x
        else:
            z = x * inv_t
            mz_new = tl.maximum(mz, tl.reduce(tl.reduce(z, 1, _MAX), 0, _MAX))
            ms = tl.where(mz_new == float("-inf"), 0.0, mz_new)
            sz = sz * tl.exp(mz - ms) + tl.reduce(tl.reduce(tl.exp(z - ms), 1, _SUM), 0, _SUM)
            mz = mz_new
        if NOISE == 1:
            g = tl.load(noise_ptr + nrow + idx, mask=m, other=0.0).to(tl.float32)
        elif NOISE == 2:
            g = counter_gumbel(seed_row, nrow, idx)
        else:
            # one Philox call yields the uniforms of the 4 sub-tiles (counter = start / 4 + lane: unique per token)
            r0, r1, r2, r3 = tl.randint4x(seed_row, start // 4 + lanes)
            r = tl.where(sub == 0, r0[None, :], tl.where(sub == 1, r1[None, :], tl.where(sub == 2, r2[None, :],
                                                                                             r3[None, :])))
            r = r.to(tl.int32, bitcast=True)  # uint32 -> uniform in [0, 1), as tl.uint_to_uniform_float
            u = tl.where(r < 0, -r - 1, r).to(tl.float32) * 4.6566127342e-10
            u = tl.minimum(tl.maximum(u, 1.1754943508222875e-38), 0.99999994)
            g = -0.6931471805599453 * tl.log2(-tl.log2(u))
        sc = z + g * nscale
        upd = sc > best
        best = tl.where(upd, sc, best)
        besti = tl.where(upd, idx, besti)
    top = tl.reduce(tl.reduce(best, 1, _MAX), 0, _MAX)
    tok = tl.reduce(tl.reduce(tl.where(best == top, besti, V), 1, _MIN), 0, _MIN)
    bad_any = tl.reduce(tl.reduce(bad.to(tl.int32), 1, _SUM), 0, _SUM)
    if UNIT_T:
        mz = mx
        sz = sx
    valid = (bad_any == 0) & (mx > float("-inf"))
    tok = tl.minimum(tok, V - 1)  # NaN rows may match no lane; stay in bounds
    x_tok = tl.load(xrow + tok).to(tl.float32)
    lp = (x_tok - mx) - tl.log(sx)  # subtract the max first: exact, keeps huge logits accurate
    slp = tl.where(greedy, 0.0, (x_tok * inv_t - mz) - tl.log(sz))
    rank = 0
    if RANK_MODE == 1:  # only "rank >= 1?": the token is not the row maximum, which the pass already has
        rank = (x_tok < mx).to(tl.int32)
    if RANK_MODE == 2:
        if valid:
            rank = _count_gt(xrow, x_tok, V, BLOCK)  # full tiles: half the block reductions
    tl.store(tok_ptr + row, tl.where(valid, tok, -1).to(tl.int64))
    tl.store(lp_ptr + row, tl.where(valid, lp, float("nan")))
    tl.store(slp_ptr + row, tl.where(valid, slp, float("nan")))
    tl.store(rank_ptr + row, tl.where(valid, rank, -1).to(tl.int64))


@triton.jit
def _count_compact(xrow, inv_t, thr, cx_row, ci_row, V: tl.constexpr, BLOCK: tl.constexpr, CAP: tl.constexpr):
    """Count tokens with z >= thr; write the first CAP of them (raw value, index) in index order."""
    n = 0
    for start in range(0, V, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        m = idx < V
        x = tl.load(xrow + idx, mask=m, other=float("-inf")).to(tl.float32)
        sel = m & (x * inv_t >= thr)
        sel32 = sel.to(tl.int32)
        pos = n + tl.associative_scan(sel32, 0, _SUM) - 1
        w = sel & (pos < CAP)
        tl.store(cx_row + pos, x, mask=w)
        tl.store(ci_row + pos, idx, mask=w)
        n += tl.reduce(sel32, 0, _SUM)
    return n


@triton.jit
def _count_ge(xrow, inv_t, thr, V: tl.constexpr, BLOCK: tl.constexpr):
    """(number of tokens with z >= thr, smallest such z)."""
    n = 0
    zmin = float("inf")
    for start in range(0, V, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        z = tl.load(xrow + idx, mask=idx < V, other=float("-inf")).to(tl.float32) * inv_t
        ge = z >= thr
        n += tl.reduce(ge.to(tl.int32), 0, _SUM)
        zmin = tl.minimum(zmin, tl.reduce(tl.where(ge, z, float("inf")), 0, _MIN))
    return n, zmin


@triton.jit
def _mass_ge(xrow, inv_t, zmax, thr, V: tl.constexpr, BLOCK: tl.constexpr):
    """(mass = sum of exp(z - zmax) over tokens with z >= thr, a = smallest such z, mass of the tokens at a)."""
    s = 0.0
    a = float("inf")
    s_a = 0.0
    for start in range(0, V, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        z = tl.load(xrow + idx, mask=idx < V, other=float("-inf")).to(tl.float32) * inv_t
        ge = z >= thr
        e = tl.where(ge, tl.exp(z - zmax), 0.0)
        s += tl.reduce(e, 0, _SUM)
        a_t = tl.reduce(tl.where(ge, z, float("inf")), 0, _MIN)
        s_t = tl.reduce(tl.where(ge & (z == a_t), e, 0.0), 0, _SUM)
        s_a = tl.where(a_t < a, s_t, tl.where(a_t == a, s_a + s_t, s_a))
        a = tl.minimum(a, a_t)
    return s, a, s_a


@triton.jit
def _sample_filtered_kernel(x_ptr, stride, inv_t_ptr, k_ptr, p_ptr, lmp_ptr, noise_ptr, nstride, seed_ptr,
                            cx_ptr, ci_ptr, tok_ptr, lp_ptr, slp_ptr, rank_ptr,
                            V: tl.constexpr, BLOCK: tl.constexpr, CAP: tl.constexpr, KC: tl.constexpr,
                            PIVOT_ROUNDS: tl.constexpr, NOISE: tl.constexpr, RANK_MODE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    xrow = x_ptr + row * stride
    nrow, seed_row = _noise_args(noise_ptr, nstride, seed_ptr, row, NOISE)
    cx_row = cx_ptr + row * CAP
    ci_row = ci_ptr + row * CAP
    inv_t = tl.load(inv_t_ptr + row)
    greedy = inv_t == 0.0
    inv_t = tl.where(greedy, 1.0, inv_t)
    lanes = tl.arange(0, BLOCK)
    NEG_KEY: tl.constexpr = -2139095041  # key of -inf

    # pass A: raw log-sum-exp, per-lane maxima (pivot for top-k, greedy argmax), NaN / +inf detection
    mx = float("-inf")
    sx = 0.0
    bad = lanes < 0
    lmax = tl.full([BLOCK], float("-inf"), tl.float32)
    larg = tl.zeros([BLOCK], tl.int32)
    for start in range(0, V, BLOCK):
        idx = start + lanes
        x = tl.load(xrow + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
        bad = bad | (x != x) | (x == float("inf"))
        mx_new = tl.maximum(mx, tl.reduce(x, 0, _MAX))
        ms = tl.where(mx_new == float("-inf"), 0.0, mx_new)
        sx = sx * tl.exp(mx - ms) + tl.reduce(tl.exp(x - ms), 0, _SUM)
        mx = mx_new
        upd = x > lmax
        lmax = tl.where(upd, x, lmax)
        larg = tl.where(upd, idx, larg)
    valid = (tl.reduce(bad.to(tl.int32), 0, _SUM) == 0) & (mx > float("-inf"))
    log_sx = tl.log(sx)

    tok = _first_argmax(lmax, larg, V)  # greedy answer; replaced below for sampled rows
    slp = 0.0
    rank = 0
    if valid & (greedy == 0):
        zmax = mx * inv_t
        k = tl.load(k_ptr + row)
        p = tl.load(p_ptr + row)
        lmp = tl.load(lmp_ptr + row)
        use_k = k > 0
        use_p = p < 1.0
        lo_k = tl.full([], NEG_KEY, tl.int64)
        hi_k = _key(zmax).to(tl.int64) + 1
        done = tl.full([], 0, tl.int32)
        ncand = 0
        piv = lo_k
        if use_k & (k <= KC):
            # pivot t0 = k-th largest lane maximum (register bisection); count(z >= t0) >= k
            lz = lmax * inv_t
            lo = lo_k
            hi = hi_k
            for _r in range(32):
                if hi - lo > 1:
                    mid = lo + (hi - lo) // 2
                    mid32 = mid.to(tl.int32)  # inline _unkey(mid): no helper call inside the loop
                    thr = tl.where(mid32 >= 0, mid32, mid32 ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)
                    ge = lz >= thr
                    c = tl.reduce(ge.to(tl.int32), 0, _SUM)
                    if c >= k:
                        # snap to the smallest value >= thr (same count); exactly k of them: it is the k-th
                        lo = _key(tl.reduce(tl.where(ge, lz, float("inf")), 0, _MIN)).to(tl.int64)
                        if c == k:
                            hi = lo + 1
                    else:
                        hi = mid
            piv = lo
            for r in range(PIVOT_ROUNDS):
                if (done == 0) & ((r == 0) | (hi_k - lo_k > 1)):
                    tl.debug_barrier()  # order this round's scratch writes after the previous round's
                    cnt = _count_compact(xrow, inv_t, _unkey(piv), cx_row, ci_row, V, BLOCK, CAP)
                    if cnt > CAP:
                        lo_k = piv
                        piv = lo_k + (hi_k - lo_k) // 2
                    elif cnt < k:
                        hi_k = piv
                        piv = lo_k + (hi_k - lo_k) // 2
                    else:
                        done = tl.full([], 1, tl.int32)
                        ncand = cnt
        if done == 1:
            # candidate path: everything on <= CAP candidates in registers. The scratch row was written by
            # other threads of this program: a CTA barrier makes those global stores visible before loading.
            tl.debug_barrier()
            offs = tl.arange(0, CAP)
            cm = offs < ncand
            cx = tl.load(cx_row + offs, mask=cm, other=float("-inf"))
            ci = tl.load(ci_row + offs, mask=cm, other=0)
            cz = cx * inv_t
            lo = piv
            hi = _key(zmax).to(tl.int64) + 1
            for _r in range(32):
                if hi - lo > 1:
                    mid = lo + (hi - lo) // 2
                    mid32 = mid.to(tl.int32)  # inline _unkey(mid): no helper call inside the loop
                    thr = tl.where(mid32 >= 0, mid32, mid32 ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)
                    ge = cm & (cz >= thr)
                    c = tl.reduce(ge.to(tl.int32), 0, _SUM)
                    if c >= k:
                        lo = _key(tl.reduce(tl.where(ge, cz, float("inf")), 0, _MIN)).to(tl.int64)
                        if c == k:
                            hi = lo + 1
                    else:
                        hi = mid
            t_k = _unkey(lo)
            e = tl.where(cm & (cz >= t_k), tl.exp(cz - zmax), 0.0)
            t_p = float("-inf")
            if use_p:
                target = tl.maximum(p * tl.reduce(e, 0, _SUM), 1e-30)
                lo = _key(t_k).to(tl.int64)
                hi = _key(zmax).to(tl.int64) + 1
                for _r in range(32):
                    if hi - lo > 1:
                        mid = lo + (hi - lo) // 2
                        mid32 = mid.to(tl.int32)  # inline _unkey(mid): no helper call inside the loop
                        thr = tl.where(mid32 >= 0, mid32, mid32 ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)
                        ge = cm & (cz >= thr)
                        mass = tl.reduce(tl.where(ge, e, 0.0), 0, _SUM)
                        if mass >= target:
                            # snap to a = smallest value >= thr; if dropping a's tokens loses the target,
                            # a is the crossing value and the search is over
                            a = tl.reduce(tl.where(ge, cz, float("inf")), 0, _MIN)
                            mass_a = tl.reduce(tl.where(ge & (cz == a), e, 0.0), 0, _SUM)
                            lo = _key(a).to(tl.int64)
                            if mass - mass_a < target:
                                hi = lo + 1
                        else:
                            hi = mid
                t_p = _unkey(lo)
            tau = tl.maximum(tl.maximum(t_k, t_p), zmax + lmp)
            keep = cm & (cz >= tau)
            g = _noise_at(noise_ptr, nrow, seed_row, ci, cm, NOISE)
            s = tl.where(keep, cz + g, float("-inf"))
            top = tl.reduce(s, 0, _MAX)
            tok = tl.reduce(tl.where(keep & (s == top), ci, V), 0, _MIN)
            is_tok = cm & (ci == tok)
            z_tok = tl.reduce(tl.where(is_tok, cz, float("-inf")), 0, _MAX)
            x_tok = tl.reduce(tl.where(is_tok, cx, float("-inf")), 0, _MAX)
            s_keep = tl.reduce(tl.where(keep, tl.exp(cz - zmax), 0.0), 0, _SUM)
            slp = (z_tok - zmax) - tl.log(s_keep)
            if RANK_MODE == 1:
                rank = (x_tok < mx).to(tl.int32)
            if RANK_MODE == 2:  # tokens above x_tok have z above the threshold: all are candidates
                rank = tl.reduce((cm & (cx > x_tok)).to(tl.int32), 0, _SUM)
        else:
            # full-row path: exact thresholds by bisection on ordered bit patterns, one pass per round
            t_k = float("-inf")
            if use_k:
                for _r in range(32):
                    if hi_k - lo_k > 1:
                        mid = lo_k + (hi_k - lo_k) // 2
                        mid32 = mid.to(tl.int32)  # inline _unkey(mid): no helper call inside the loop
                        thr = tl.where(mid32 >= 0, mid32, mid32 ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)
                        c, zmin = _count_ge(xrow, inv_t, thr, V, BLOCK)
                        if c >= k:
                            lo_k = _key(zmin).to(tl.int64)
                            if c == k:
                                hi_k = lo_k + 1
                        else:
                            hi_k = mid
                t_k = _unkey(lo_k)
            t_p = float("-inf")
            if use_p:
                s_k, _a, _ma = _mass_ge(xrow, inv_t, zmax, t_k, V, BLOCK)
                target = tl.maximum(p * s_k, 1e-30)
                lo = _key(t_k).to(tl.int64)
                hi = _key(zmax).to(tl.int64) + 1
                for _r in range(32):
                    if hi - lo > 1:
                        mid = lo + (hi - lo) // 2
                        mid32 = mid.to(tl.int32)  # inline _unkey(mid): no helper call inside the loop
                        thr = tl.where(mid32 >= 0, mid32, mid32 ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)
                        mass, a, mass_a = _mass_ge(xrow, inv_t, zmax, thr, V, BLOCK)
                        if mass >= target:
                            lo = _key(a).to(tl.int64)
                            if mass - mass_a < target:
                                hi = lo + 1
                        else:
                            hi = mid
                t_p = _unkey(lo)
            tau = tl.maximum(tl.maximum(t_k, t_p), zmax + lmp)
            best = tl.full([BLOCK], float("-inf"), tl.float32)
            besti = tl.zeros([BLOCK], tl.int32)
            s_keep = 0.0
            for start in range(0, V, BLOCK):
                idx = start + lanes
                m = idx < V
                x = tl.load(xrow + idx, mask=m, other=float("-inf")).to(tl.float32)
                z = x * inv_t
                keep = m & (z >= tau)
                if NOISE == 1:
                    g = tl.load(noise_ptr + nrow + idx, mask=m, other=0.0).to(tl.float32)
                elif NOISE == 2:
                    g = counter_gumbel(seed_row, nrow, idx)
                else:
                    u = tl.minimum(tl.maximum(tl.rand(seed_row, idx), 1.1754943508222875e-38), 0.99999994)
                    g = -0.6931471805599453 * tl.log2(-tl.log2(u))
                s = tl.where(keep, z + g, float("-inf"))
                upd = s > best
                best = tl.where(upd, s, best)
                besti = tl.where(upd, idx, besti)
                s_keep += tl.reduce(tl.where(keep, tl.exp(z - zmax), 0.0), 0, _SUM)
            tok = _first_argmax(best, besti, V)
            x_tok = tl.load(xrow + tok).to(tl.float32)
            slp = (x_tok * inv_t - zmax) - tl.log(s_keep)
            if RANK_MODE == 1:
                rank = (x_tok < mx).to(tl.int32)
            if RANK_MODE == 2:
                rank = _count_gt(xrow, x_tok, V, BLOCK)
    tok = tl.minimum(tok, V - 1)
    x_tok = tl.load(xrow + tok).to(tl.float32)
    lp = (x_tok - mx) - log_sx  # subtract the max first: exact, keeps huge logits accurate
    tl.store(tok_ptr + row, tl.where(valid, tok, -1).to(tl.int64))
    tl.store(lp_ptr + row, tl.where(valid, lp, float("nan")))
    tl.store(slp_ptr + row, tl.where(valid, slp, float("nan")))
    tl.store(rank_ptr + row, tl.where(valid, rank, -1).to(tl.int64))


def rank_pass_mode(return_rank: bool, rank_cap: int | None) -> int:
    """The kernels' RANK_MODE: 0 no rank, 1 only whether rank >= 1 (free), 2 the full count (a row pass)."""
    if rank_cap is not None and (isinstance(rank_cap, bool) or int(rank_cap) != rank_cap or rank_cap < 0):
        raise ValueError(f"sample: rank_cap={rank_cap!r} must be None or an integer >= 0")
    if not return_rank or rank_cap == 0:
        return 0
    return 1 if rank_cap == 1 else 2


def _seed(device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    # drawn on the device: no host sync, and graph-capturable with the device generator
    return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64, generator=generator)


def sample_triton(
    logits: torch.Tensor,
    params: RowParams,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    return_rank: bool = True,
    cap: int | None = None,
    block: int | None = None,
    rank_cap: int | None = None,
    counter: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> SampleOutput:
    """Launch the Triton sampler on logits [B, V] with normalised per-row `params`; returns SampleOutput.

    counter: (keys [B] int64, step [1] int64) draws the counter-based noise of `align.kernels.counter` inside
    the kernel (the same numbers as the PyTorch stream `align.rollouts.noise`; no [B, V] noise tensor).

    rank: the full count with return_rank and no rank_cap; min(rank, rank_cap) with one (rank_cap 1 costs no
    extra pass: rank >= 1 iff the token is below the row maximum); 0 for valid rows without return_rank.
    """
    rank_mode = rank_pass_mode(return_rank, rank_cap)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    b, v = logits.shape
    dev = logits.device
    tok = torch.empty(b, device=dev, dtype=torch.int64)
    lp = torch.empty(b, device=dev, dtype=torch.float32)
    slp = torch.empty(b, device=dev, dtype=torch.float32)
    rank = torch.empty(b, device=dev, dtype=torch.int64)
    if b == 0:
        return SampleOutput(tok, lp, slp, rank)
    mode = 0
    if counter is not None:
        if noise is not None:
            raise ValueError("sample: pass noise= or counter=, not both")
        keys, step = counter
        if keys.shape != (b,) or keys.dtype != torch.int64 or step.numel() != 1 or step.dtype != torch.int64:
            raise ValueError(f"sample: counter must be (keys int64 [{b}], step int64 [1]), got "
                             f"({keys.dtype} {tuple(keys.shape)}, {step.dtype} {tuple(step.shape)})")
        mode, nbuf, nstride, seed = 2, keys.contiguous(), 0, step.reshape(1)
    elif noise is not None:
        if noise.shape != (b, v):
            raise ValueError(f"sample: noise must have the logits' shape {(b, v)}, got {tuple(noise.shape)}")
        noise = noise.to(device=dev, dtype=torch.float32)
        if noise.stride(-1) != 1:
            noise = noise.contiguous()
        seed = torch.zeros(1, device=dev, dtype=torch.int64)
        mode, nbuf, nstride = 1, noise, noise.stride(0)
    else:
        seed = _seed(dev, generator)
        nbuf, nstride = logits, 0
    if not params.filtered:
        blk = block or max(16, min(2048, next_pow2(v)))  # [4, 512] tiles: 94 registers on sm_90, 2 programs per SM
        _sample_plain_kernel[(b,)](
            logits, logits.stride(0), params.inv_t, nbuf, nstride, seed, tok, lp, slp, rank,
            V=v, BLOCK=blk, NOISE=mode, RANK_MODE=rank_mode, UNIT_T=params.unit_temperature,
            num_warps=8, enable_fp_fusion=False)
    else:
        blk = block or max(16, min(1024, next_pow2(v)))
        if cap is None:
            # a static top-k sizes the candidate buffer (smaller register vectors, cheaper reductions);
            # per-row tensors get the largest one (reading them would need a host sync)
            k = params.k_static
            cap = CAP_DEFAULT if k is None else (16 if k == 0 else min(CAP_DEFAULT, max(256, next_pow2(4 * k))))
        cap = next_pow2(cap)
        cx = torch.empty((b, cap), device=dev, dtype=torch.float32)
        ci = torch.empty((b, cap), device=dev, dtype=torch.int32)
        _sample_filtered_kernel[(b,)](
            logits, logits.stride(0), params.inv_t, params.top_k, params.top_p, params.log_min_p, nbuf, nstride,
            seed, cx, ci, tok, lp, slp, rank,
            V=v, BLOCK=blk, CAP=cap, KC=min(blk, cap // 2), PIVOT_ROUNDS=PIVOT_ROUNDS,
            NOISE=mode, RANK_MODE=rank_mode, num_warps=8, enable_fp_fusion=False)
    if rank_mode == 2 and rank_cap is not None:
        rank = rank.clamp_(max=rank_cap)
    return SampleOutput(tok, lp, slp, rank)


def sample(
    logits: torch.Tensor,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    generator: torch.Generator | None = None,
    backend: str = "auto",
    noise: torch.Tensor | None = None,
    return_details: bool = False,
    check: bool = False,
    rank_cap: int | None = None,
    counter: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    """Sample one token per row of logits [B, V] (fp32 / bf16 / fp16).

    temperature, top_k, top_p, min_p: Python scalars or per-row tensors [B]. Order: temperature -> top-k ->
    top-p (over the renormalised top-k survivors, crossing token included) -> min-p -> draw. top_k=0,
    top_p=1, min_p=0 disable a filter; temperature 0 is greedy (argmax, first index on ties). Ties with a
    threshold value are kept. Python scalars are validated; tensor values are clamped on the device.
    generator: torch.Generator on the logits' device (seed source; no host sync).
    noise: optional Gumbel noise g [B, V] (fp32); the token is argmax over kept tokens of z + g. With the same
    noise the "triton" and "torch" backends return identical tokens.
    Returns (tokens int64 [B], logprobs fp32 [B]) with logprobs = log_softmax(logits.float())[token], or with
    return_details=True a SampleOutput(tokens, logprobs, sampling_logprobs, rank).
    rank_cap: with return_details, report min(rank, rank_cap) and skip the work beyond it: 0 computes no rank
    (a caller that needs none), 1 reads it off the row maximum the sampler already has (no second pass over
    the row), None or > 1 counts the larger logits (a second pass on the unfiltered and full-row paths).
    counter: (keys [B] int64, step [1] int64): counter-based noise drawn inside the Triton kernel (the numbers
    of `align.rollouts.noise` for these sample keys and decode step); Triton backend only (the PyTorch path
    takes that noise materialised as noise=).
    Rows with NaN / +inf or all -inf give token -1 and NaN log-probs (check=True raises; it syncs the host).
    """
    which = resolve_backend(backend, logits, "sample")
    if which == "torch" and counter is not None:
        raise ValueError("sample: counter= noise is drawn inside the Triton kernel; on the torch backend pass it "
                         "materialised as noise= (align.rollouts.sampler.counter_gumbel)")
    if which == "torch":
        return sample_reference(logits, temperature, top_k, top_p, min_p, generator=generator, noise=noise,
                                return_details=return_details, check=check, rank_cap=rank_cap)
    params = row_params(logits, temperature, top_k, top_p, min_p)
    out = sample_triton(logits, params, generator=generator, noise=noise, return_rank=return_details,
                        rank_cap=rank_cap, counter=counter)
    if check:
        raise_on_invalid(out.tokens)
    if return_details:
        return out
    return out.tokens, out.logprobs
