"""position_ids_from_mask: the one position-id helper (trainer, rollout engine, reward models)."""
from __future__ import annotations

import torch

from align.algos import position_ids_from_mask


def test_left_padding_counts_from_the_first_real_token():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    expected = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]])
    for m in (mask, mask.bool(), mask.float(), mask.int()):
        out = position_ids_from_mask(m)
        assert out.dtype == torch.int64 and torch.equal(out, expected)


def test_matches_a_written_out_loop_on_random_masks():
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(6, 9, generator=g) > 0.4).long()
    ref = torch.zeros_like(mask)
    for i in range(mask.shape[0]):
        seen = 0
        for t in range(mask.shape[1]):
            ref[i, t] = max(seen - 1 + int(mask[i, t]), 0)
            seen += int(mask[i, t])
    assert torch.equal(position_ids_from_mask(mask), ref)
