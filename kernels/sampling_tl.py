"""Triton device functions shared by the sampling kernels (`align.kernels.sampling_kernels`): order-preserving
fp32 keys, Philox / injected / counter Gumbel noise, first-argmax and the threshold counts and masses the
bisections use. The semantics are documented in `align.kernels.sampling`."""

from __future__ import annotations

import triton
import triton.language as tl

from align.kernels._tl import MAX as _MAX
from align.kernels._tl import MIN as _MIN
from align.kernels._tl import SUM as _SUM
from align.kernels.counter import counter_gumbel


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
