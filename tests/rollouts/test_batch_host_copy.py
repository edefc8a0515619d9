"""F22 (GPU readiness review): `RolloutBatch.reward_columns` copies the responses to the host once.

On GPU each per-row `row[mask.bool()].tolist()` is two device syncs (512 per step at 256 samples). The test
counts the tensor operations dispatched while building `completion_ids`: a fixed number whatever the batch
size (one copy per tensor), where a per-row loop grows with the rows.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from align.rollouts.batch import RolloutBatch


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def _batch(n: int, t: int = 5) -> RolloutBatch:
    gen = torch.Generator().manual_seed(n)
    ids = torch.randint(0, 50, (n, t), generator=gen)
    lengths = torch.randint(0, t + 1, (n,), generator=gen)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    return RolloutBatch(prompt_ids=torch.zeros(n, 1, dtype=torch.long), prompt_mask=torch.ones(n, 1, dtype=torch.long),
                        response_ids=ids, mask=mask, logprobs=torch.zeros(n, t))


def test_completion_ids_are_the_masked_rows():
    b = _batch(9)
    expected = [[int(b.response_ids[i, j]) for j in range(5) if int(b.mask[i, j]) == 1] for i in range(9)]
    assert b.reward_columns()["completion_ids"] == expected


def test_completion_ids_cost_no_per_row_tensor_ops():
    counts = []
    for n in (2, 64):
        b = _batch(n)
        with _CountOps() as mode:
            b.reward_columns()
        counts.append(mode.n)
    assert counts[0] == counts[1] and counts[1] <= 4, counts
