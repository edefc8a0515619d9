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

from align.errors import DistributedError

__all__ = ["DistContext", "DistributedError", "get_context", "init_from_env", "rank_threads"]


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

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place and returned: the elementwise max over ranks."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def all_gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank-major concatenation along dim 0 of a same-shaped tensor from every rank (the tensor in a world of one)."""
        if not self.enabled:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def all_gather_objects(self, obj: object) -> list[object]:
        """Every rank's picklable `obj`, in rank order ([obj] in a world of one). Only for our own small values."""
        if not self.enabled:
            return [obj]
        out: list[object] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


_CONTEXT = DistContext()


def get_context() -> DistContext:
    return _CONTEXT


def init_from_env(timeout_s: float = 300.0, backend: str | None = None, threads: int = 0) -> DistContext:
    """Join the process group that torchrun's environment describes (a no-op without WORLD_SIZE > 1).
    timeout_s bounds every collective, so a dead or stalled rank ends the run instead of hanging it.
    threads: torch threads of this rank (0: the usable cores / LOCAL_WORLD_SIZE), so threads x ranks <= cores
    (two 2-thread processes on 2 cores run ~5x slower than two 1-thread ones: measured, NOTES.md)."""
    global _CONTEXT
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        _CONTEXT = DistContext()
        return _CONTEXT
    torch.set_num_threads(threads or rank_threads())
    if torch.cuda.is_available():  # each rank its own GPU: "cuda" (train.device) then means cuda:LOCAL_RANK
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if not dist.is_initialized():
        backend = None if backend in (None, "auto") else backend
        # auto on CUDA: NCCL for GPU tensors, gloo for CPU ones (offloaded shards, small bookkeeping tensors)
        backend = backend or ("cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo")
        try:
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        except (RuntimeError, dist.DistError) as err:
            raise DistributedError(f"rank {os.environ.get('RANK')}: cannot join the process group at "
                                   f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} "
                                   f"({str(err).splitlines()[0]}); check that every rank started and the port is free") from None
    _CONTEXT = DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                           local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    return _CONTEXT


def rank_threads() -> int:
    """Torch threads per rank so that threads x local ranks <= the cores this process may use."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return max(1, cores // max(1, local))
