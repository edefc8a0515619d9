"""Counter-based Gumbel noise drawn inside the Triton sampler (F4 of the GPU readiness review).

The noise of sample key k at decode step s and vocabulary index j is a pure function of (k, s, j):
  h = mix64(s * GOLDEN + j);  x = mix64(k ^ h);  u = ((x >>> 40) + 1/2) / 2^24;  g = -log(-log(clamp(u)))
with SplitMix64's finaliser `mix64` (Steele et al. 2014) in wrapping int64 arithmetic, u clamped to
[tiny, 1 - 2^-24]. These are exactly the operations of the PyTorch stream (`align.rollouts.noise`,
`align.rollouts.sampler.counter_gumbel`, which import the constants from here: one definition): the integer
part and u are bit-identical by construction (u is an exact fp32 value), and g takes the same two fp32 logs.
Drawn in the kernel, the noise costs no memory traffic, where the PyTorch stream builds [B, V] int64
temporaries (~12 GB of traffic per decode step at B = 256, V = 151,936) and the sampler then reads a
[B, V] fp32 noise tensor; and it stays sharding-invariant (a row's draws depend on its own key only).
"""
from __future__ import annotations

import triton
import triton.language as tl

GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64
M1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
M2 = -7723592293110705685  # 0x94D049BB133111EB


@triton.jit
def _shr(x, n: tl.constexpr):
    """Logical right shift of int64 (`>>` is arithmetic on signed integers)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


@triton.jit
def _mix64(x):
    # the literals are M1 and M2 above (a @jit function cannot read module globals that are not constexpr)
    x = x ^ _shr(x, 30)
    x = x * -4658895280553007687
    x = x ^ _shr(x, 27)
    x = x * -7723592293110705685
    return x ^ _shr(x, 31)


@triton.jit
def counter_gumbel(key, step, idx):
    """Gumbel noise for sample key `key` (int64 scalar) at decode step `step` (int64 scalar), columns `idx`."""
    h = _mix64(step * -7046029254386353131 + idx.to(tl.int64))  # GOLDEN
    x = _mix64(key ^ h)
    u = (_shr(x, 40).to(tl.float32) + 0.5) * 5.9604644775390625e-08  # 2^-24, exact
    u = tl.minimum(tl.maximum(u, 1.1754943508222875e-38), 0.99999994)  # [tiny, 1 - 2^-24]
    return -tl.log(-tl.log(u))


@triton.jit
def _counter_gumbel_kernel(keys_ptr, step_ptr, out_ptr, V: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    key = tl.load(keys_ptr + row)
    step = tl.load(step_ptr)
    for start in range(0, V, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        tl.store(out_ptr + row * V + idx, counter_gumbel(key, step, idx), mask=idx < V)


def counter_gumbel_triton(keys, step, vocab_size: int):
    """[B, V] fp32: the noise the sampler draws in-kernel, written out (tests and debugging only)."""
    import torch

    out = torch.empty((keys.shape[0], vocab_size), dtype=torch.float32, device=keys.device)
    if keys.shape[0]:
        _counter_gumbel_kernel[(keys.shape[0],)](keys, step, out, V=vocab_size, BLOCK=min(1024, 1 << max(
            4, (vocab_size - 1).bit_length())), enable_fp_fusion=False)
    return out
