"""The two sampling kernels, one program per row: `_sample_plain_kernel` (temperature only, one pass) and
`_sample_filtered_kernel` (top-k / top-p / min-p thresholds by bisection, the candidate and the full-row
paths). Launched by `align.kernels.sampling.sample_triton`, whose docstring gives the algorithm."""

from __future__ import annotations

import triton
import triton.language as tl

from align.kernels._tl import MAX as _MAX
from align.kernels._tl import MIN as _MIN
from align.kernels._tl import SUM as _SUM
from align.kernels.counter import counter_gumbel
from align.kernels.sampling_tl import (
    _count_compact,
    _count_ge,
    _count_gt,
    _first_argmax,
    _key,
    _mass_ge,
    _noise_args,
    _noise_at,
    _unkey,
)


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
