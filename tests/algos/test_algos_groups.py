"""align.algos.nonzero_variance_groups against a brute-force reference (DAPO's dynamic-sampling filter)."""
from __future__ import annotations

import itertools

import pytest
import torch

from align.algos import nonzero_variance_groups


def reference(scores: list[float], valid: list[bool], g: int) -> list[bool]:
    out = []
    for start in range(0, len(scores), g):
        vals = [s for s, v in zip(scores[start:start + g], valid[start:start + g]) if v]
        out.append(len(vals) >= 2 and any(a != b for a, b in itertools.combinations(vals, 2)))
    return out


@pytest.mark.parametrize("g", [2, 3, 4, 8])
@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force(g, seed):
    gen = torch.Generator().manual_seed(seed)
    b = 6 * g
    scores = torch.randint(0, 3, (b,), generator=gen).double() / 2  # many ties and whole flat groups
    valid = torch.rand(b, generator=gen) > 0.25
    got = nonzero_variance_groups(scores, g, valid)
    assert got.dtype == torch.bool and got.shape == (6,)
    assert got.tolist() == reference(scores.tolist(), valid.tolist(), g)
    assert nonzero_variance_groups(scores, g).tolist() == reference(scores.tolist(), [True] * b, g)


def test_edge_cases():
    s = torch.tensor([1.0, 1.0, 0.0, 1.0, 5.0, 7.0])
    assert nonzero_variance_groups(s, 2).tolist() == [False, True, True]
    # an invalid sample's score is never read: the group has one valid sample left, so no signal
    assert nonzero_variance_groups(s, 2, torch.tensor([True] * 4 + [True, False])).tolist() == [False, True, False]
    assert nonzero_variance_groups(torch.zeros(8), 4).tolist() == [False, False]
    with pytest.raises(ValueError):
        nonzero_variance_groups(torch.zeros(5), 2)
