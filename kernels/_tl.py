"""Combine functions for `tl.reduce` / `tl.associative_scan`.

The kernels call `tl.reduce(x, axis, _SUM)` instead of `tl.sum(x, axis)`: the same code on the GPU, but the
Triton CPU interpreter maps these combine functions to numpy directly, whereas every call of a @triton.jit
helper such as tl.sum re-patches the language module (milliseconds per call), which made the interpreted
tests ~5x slower.
"""

import triton
import triton.language as tl

try:
    from triton.language.standard import _elementwise_max as MAX
    from triton.language.standard import _elementwise_min as MIN
    from triton.language.standard import _sum_combine as SUM
except ImportError:  # pragma: no cover - older/newer triton without these private names

    @triton.jit
    def SUM(a, b):
        return a + b

    @triton.jit
    def MAX(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def MIN(a, b):
        return tl.minimum(a, b)
