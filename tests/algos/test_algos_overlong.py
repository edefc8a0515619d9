"""DAPO's soft over-long punishment (arXiv 2503.14476 eq. 13, verl's overlong_buffer) against the formula
written out in float64."""
from __future__ import annotations

import pytest
import torch

from align import algos


def reference(length: float, l_max: int, l_cache: int, factor: float) -> float:
    """eq. 13 with verl's penalty factor: 0 up to L_max - L_cache, then linear down to -factor at L_max."""
    if length <= l_max - l_cache:
        return 0.0
    if length <= l_max:
        return ((l_max - l_cache) - length) / l_cache * factor
    return -factor


@pytest.mark.parametrize("l_max, l_cache, factor", [(16, 4, 1.0), (16, 16, 0.5), (20, 1, 2.0), (10, 3, 0.0)])
def test_overlong_penalty_matches_the_formula(l_max, l_cache, factor):
    lengths = torch.arange(0, l_max + 3, dtype=torch.float64)
    got = algos.overlong_penalty(lengths, l_max, l_cache, factor)
    want = torch.tensor([reference(float(y), l_max, l_cache, factor) for y in lengths], dtype=torch.float64)
    assert got.dtype == torch.float64 and got.shape == lengths.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)


def test_overlong_penalty_hand_values():
    # L_max 16, L_cache 4: free up to 12 tokens, -0.25 per token after, -1 at 16
    got = algos.overlong_penalty(torch.tensor([3, 12, 13, 14, 16]), 16, 4)
    assert got.dtype == torch.float32
    assert got.tolist() == [0.0, 0.0, -0.25, -0.5, -1.0]


def test_overlong_penalty_errors():
    with pytest.raises(ValueError, match="lengths must be"):
        algos.overlong_penalty(torch.ones(2, 2), 8, 2)
    with pytest.raises(ValueError, match="buffer_length"):
        algos.overlong_penalty(torch.ones(2), 8, 9)
    with pytest.raises(ValueError, match="buffer_length"):
        algos.overlong_penalty(torch.ones(2), 8, 0)
    with pytest.raises(ValueError, match="penalty_factor"):
        algos.overlong_penalty(torch.ones(2), 8, 2, -1.0)
