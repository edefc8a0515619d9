"""Who this process is in a multi-process run, and the reductions that make batch statistics global.

One process (no torchrun, no Ray trainer actors) is the world of size 1: every reduction returns its input, so the
single-process loop runs the same code path as an N-rank one. torchrun (and align's Ray trainer actors, which set
the same variables) name the rank through RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place and returned: the sum over ranks (the tensor itself in a world of one)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


_CONTEXT = DistContext()


def get_context() -> DistContext:
    return _CONTEXT


def init_from_env(timeout_s: float = 300.0, backend: str | None = None) -> DistContext:
    """Join the process group that torchrun's environment describes (a no-op without WORLD_SIZE > 1).
    timeout_s bounds every collective, so a dead or stalled rank ends the run instead of hanging it."""
    global _CONTEXT
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        _CONTEXT = DistContext()
        return _CONTEXT
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    _CONTEXT = DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                           local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    return _CONTEXT
