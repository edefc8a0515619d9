"""Data-parallel reward-model training: each rank holds the whole RM, takes its share of every step's pairs, and
the ranks sum their gradients before the optimizer step, so N ranks take the same steps as one process.

The process group is joined by the core (`align train-rm` under torchrun calls align.distributed.init_from_env,
which bounds every collective with a timeout); this module only reads it, so without torchrun it is a world of
one and every function returns its input. Each rank's loss is its pairs' share of the whole batch's loss (the
whole batch's denominators: pairs, supervised tokens), so the summed gradients are the gradients of the loss one
process computes on the whole batch; the same clipped update on every rank keeps the replicas identical.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

# gradients are summed in flat buckets of at most this many elements: one collective per bucket, and the copy
# a bucket needs stays small next to the model for a large RM
BUCKET_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence[int]) -> list[int]:
        """This rank's items of one step's batch: every world_size-th from its rank (an empty list is fine: the
        rank then adds zero gradients)."""
        return list(items[self.rank::self.world_size])

    def sum(self, values: Sequence[float]) -> list[float]:
        """Elementwise sum over ranks of a few float64 numbers (the values themselves in a world of one)."""
        if self.world_size == 1:
            return [float(v) for v in values]
        t = torch.tensor(list(values), dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def gather(self, value: float) -> list[float]:
        """Every rank's `value`, in rank order."""
        return self.sum([value if r == self.rank else 0.0 for r in range(self.world_size)])

    def sum_gradients(self, model: torch.nn.Module) -> None:
        """In place: every trainable parameter's .grad becomes the sum over ranks (a parameter this rank left
        without a gradient contributes zeros, so every rank issues the same collectives)."""
        if self.world_size == 1:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket: list[torch.nn.Parameter] = []
        size = 0
        for p in params:
            bucket.append(p)
            size += p.numel()
            if size >= BUCKET_ELEMENTS:
                _all_reduce_bucket(bucket)
                bucket, size = [], 0
        if bucket:
            _all_reduce_bucket(bucket)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def _all_reduce_bucket(params: list[torch.nn.Parameter]) -> None:
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def _collective_device() -> torch.device:
    """Where a collective's tensor must live: NCCL reduces CUDA tensors only (this rank's current device), gloo
    CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def current_ranks() -> Ranks:
    """The process group this process joined (torchrun + init_from_env), or a world of one."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()
