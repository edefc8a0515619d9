"""Weight sync by broadcast in bounded buckets: trainer (rank 0 of a private group) -> rollout workers.

Why buckets: concatenating the whole state dict per dtype (the earlier sync) costs a second copy of the model on
the trainer's device at every sync, and the receiver built a full state dict before loading it (another copy).
Here the distinct tensors (tied weights such as Qwen's embedding / lm_head are sent once: dedupe by storage)
are laid out in buckets of at most `bucket_bytes`; a tensor larger than a bucket is split across buckets. The
sender copies pieces into one bucket buffer at a time (a bucket that is exactly one contiguous slice of a
tensor on the group's device is sent as a view, without a buffer); the receiver receives a bucket and copies
its pieces straight into its model's parameters, so neither side builds more than one bucket of extra memory.

Sharded trainers (FSDP2 `DTensor` parameters): `full_tensor()` gathers one tensor at a time, a collective of the
trainer ranks, so every trainer rank calls `send_buckets` with the same plan (`channel=None` on all but the
sender); the transient is one gathered tensor plus one bucket.

`WeightChannel` is a process group of its own (a TCPStore and a ProcessGroupGloo / ProcessGroupNCCL object,
not `init_process_group`): the trainer's default group (its SPMD ranks) and the workers' processes stay free.
Every wait is bounded: a broadcast that has not completed within `timeout_s`, or whose `check` callback raises
(the trainer checks that no receiver died), raises `WeightSyncError`; it never hangs (TRL #6797, verl #3873).
"""
from __future__ import annotations

import datetime
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from align.errors import AlignError


class WeightSyncError(AlignError, RuntimeError):
    """A broadcast weight sync failed or stalled (the message says which side and why)."""


@dataclass(frozen=True)
class Entry:
    """One distinct tensor: `names[0]` is sent; `names[1:]` share its storage (tied weights)."""

    names: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Piece:
    entry: int  # index into the entries
    start: int  # flat element range [start, stop) of the tensor
    stop: int
    offset: int  # where it sits in the bucket


@dataclass(frozen=True)
class Bucket:
    dtype: torch.dtype
    numel: int
    pieces: tuple[Piece, ...]

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "full_tensor")


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a sharded DTensor is all-gathered (a collective: every trainer rank must call it)."""
    return t.full_tensor() if _is_dtensor(t) else t


def _storage_key(t: torch.Tensor):
    local = t.to_local() if _is_dtensor(t) else t
    if local.numel() == 0:
        return None  # empty tensors share data_ptr 0: never merged
    return (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(t.shape), local.stride(), t.dtype)


def distinct_tensors(state: dict[str, torch.Tensor]) -> tuple[list[Entry], list[torch.Tensor]]:
    """Group a state dict's names by the storage they view (tied weights -> one entry), in state order."""
    entries: list[list[str]] = []
    tensors: list[torch.Tensor] = []
    seen: dict[tuple, int] = {}
    for name, t in state.items():
        key = _storage_key(t)
        if key is not None and key in seen:
            entries[seen[key]].append(name)
            continue
        if key is not None:
            seen[key] = len(entries)
        entries.append([name])
        tensors.append(t)
    return [Entry(tuple(n), tuple(t.shape), t.dtype) for n, t in zip(entries, tensors)], tensors


def plan_buckets(entries: list[Entry], bucket_bytes: int) -> list[Bucket]:
    """Pack the entries, per dtype in order of first appearance, into buckets of at most `bucket_bytes` (at least
    one element); a tensor that does not fit the current bucket continues in the next."""
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, e in enumerate(entries):
        by_dtype.setdefault(e.dtype, []).append(i)
    buckets: list[Bucket] = []
    for dtype, idx in by_dtype.items():
        cap = max(1, int(bucket_bytes) // torch.empty((), dtype=dtype).element_size())
        pieces: list[Piece] = []
        used = 0
        for i in idx:
            start, n = 0, entries[i].numel
            while start < n:
                take = min(n - start, cap - used)
                pieces.append(Piece(i, start, start + take, used))
                start += take
                used += take
                if used == cap:
                    buckets.append(Bucket(dtype, used, tuple(pieces)))
                    pieces, used = [], 0
        if pieces:
            buckets.append(Bucket(dtype, used, tuple(pieces)))
    return buckets


class WeightChannel:
    """A private broadcast group: rank 0 (the trainer) hosts the TCPStore at host:port; ranks 1.. are workers.
    backend "gloo" (CPU tensors) or "nccl" (CUDA tensors on `device`)."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float,
                 device: torch.device | str = "cpu"):
        import torch.distributed as dist

        self.rank, self.world_size, self.backend, self.timeout_s = rank, world_size, backend, float(timeout_s)
        self.device = torch.device(device)
        timeout = datetime.timedelta(seconds=self.timeout_s)
        self.store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
        if backend == "gloo":
            self.pg = dist.ProcessGroupGloo(self.store, rank, world_size, timeout)
        elif backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            # NCCL's watchdog takes the whole process down when a collective outlives the group's timeout; give it
            # a margin so that the poll in `broadcast` raises first and `close` aborts the communicator
            opts._timeout = timeout + datetime.timedelta(seconds=60)
            self.pg = dist.ProcessGroupNCCL(self.store, rank, world_size, opts)
        else:
            raise ValueError(f"backend = {backend!r}: use 'gloo' or 'nccl'")

    def broadcast(self, tensor: torch.Tensor, check: Callable[[], None] | None = None, what: str = "bucket") -> None:
        """Broadcast `tensor` from rank 0 (in place on the others); bounded by `timeout_s`. `check` is called while
        waiting (the trainer raises there when a receiver died) so a dead peer ends the wait early."""
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        deadline = time.monotonic() + self.timeout_s
        try:
            work = self.pg.broadcast([tensor], opts)
            # NCCL: the CPU does not block here; is_completed polls the CUDA event. gloo: runs on its own thread.
            pause = 0.0005
            while not work.is_completed():
                if check is not None:
                    check()
                if time.monotonic() > deadline:
                    raise WeightSyncError(f"weight sync: a {what} broadcast did not complete within {self.timeout_s:g} s "
                                          f"(rank {self.rank} of {self.world_size}, {self.backend})")
                time.sleep(pause)
                pause = min(pause * 2, 0.05)
            work.wait()  # raises the collective's own error (a peer that closed its connection, a timeout)
        except WeightSyncError:
            raise
        except Exception as err:  # noqa: BLE001 - torch raises DistBackendError / RuntimeError variants
            lines = [x.strip() for x in str(err).splitlines() if x.strip()]
            raise WeightSyncError(f"weight sync: the {what} broadcast failed on rank {self.rank} ({self.backend}): "
                                  f"{type(err).__name__}: {lines[0] if lines else ''}") from None

    def close(self) -> None:
        """Drop the group; NCCL's communicator is aborted (a pending collective must not keep the GPU)."""
        pg, self.pg = getattr(self, "pg", None), None
        if pg is None:
            return
        try:
            if self.backend == "nccl":
                pg.abort()
            else:
                pg.shutdown()
        except Exception:  # noqa: BLE001 - best effort: a broken group has nothing left to free
            pass


def send_buckets(tensors: list[torch.Tensor], entries: list[Entry], buckets: list[Bucket], channel: WeightChannel | None,
                 device: torch.device, *, check: Callable[[], None] | None = None,
                 on_bucket: Callable[[int], None] | None = None) -> dict[str, int]:
    """Rank 0's side (and, with `channel=None`, a non-sending trainer rank that only joins the gathers).
    Returns {"largest_buffer_bytes", "largest_gathered_bytes", "buckets", "bytes"}."""
    last_use = {}
    for b, bucket in enumerate(buckets):
        for p in bucket.pieces:
            last_use[p.entry] = b
    flat: dict[int, torch.Tensor] = {}
    stats = {"largest_buffer_bytes": 0, "largest_gathered_bytes": 0, "buckets": len(buckets), "bytes": 0}

    def source(i: int) -> torch.Tensor:
        if i not in flat:
            t = tensors[i].detach()
            if _is_dtensor(t):
                t = full_tensor(t)
                stats["largest_gathered_bytes"] = max(stats["largest_gathered_bytes"], t.numel() * t.element_size())
            flat[i] = t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)
        return flat[i]

    with torch.no_grad():
        for b, bucket in enumerate(buckets):
            pieces = bucket.pieces
            only = pieces[0]
            src = source(only.entry)
            if len(pieces) == 1 and src.device == device and only.stop - only.start == bucket.numel:
                buf = src[only.start:only.stop]  # a view: no buffer
            else:
                buf = torch.empty(bucket.numel, dtype=bucket.dtype, device=device)
                stats["largest_buffer_bytes"] = max(stats["largest_buffer_bytes"], bucket.nbytes)
                for p in pieces:
                    buf[p.offset:p.offset + p.stop - p.start].copy_(source(p.entry)[p.start:p.stop])
            if channel is not None:
                channel.broadcast(buf, check, what=f"bucket {b + 1}/{len(buckets)}")
            stats["bytes"] += bucket.nbytes
            del buf
            for p in pieces:
                if last_use[p.entry] == b:
                    flat.pop(p.entry, None)
            if on_bucket is not None:
                on_bucket(b)
    return stats


def receive_buckets(targets: dict[str, torch.Tensor], entries: list[Entry], buckets: list[Bucket],
                    channel: WeightChannel) -> dict[str, int]:
    """A worker's side: receive every bucket and copy its pieces into `targets` (name -> a tensor viewing the
    model's parameter: `model.state_dict()`), in place. Tied names that do not share storage here get a copy."""
    for e in entries:
        for name in e.names:
            t = targets.get(name)
            if t is None:
                raise WeightSyncError(f"weight sync: the worker's model has no tensor {name!r}")
            if tuple(t.shape) != e.shape or t.dtype != e.dtype or not t.is_contiguous():
                raise WeightSyncError(f"weight sync: {name!r} is {tuple(t.shape)} {t.dtype} here, the trainer sends "
                                      f"{e.shape} {e.dtype}")
    stats = {"largest_buffer_bytes": 0, "buckets": len(buckets)}
    with torch.no_grad():
        for b, bucket in enumerate(buckets):
            only = bucket.pieces[0]
            dest = targets[entries[only.entry].names[0]].view(-1)
            if len(bucket.pieces) == 1 and dest.device == channel.device and only.stop - only.start == bucket.numel:
                channel.broadcast(dest[only.start:only.stop], what=f"bucket {b + 1}/{len(buckets)}")  # straight in
                continue
            buf = torch.empty(bucket.numel, dtype=bucket.dtype, device=channel.device)
            stats["largest_buffer_bytes"] = max(stats["largest_buffer_bytes"], bucket.nbytes)
            channel.broadcast(buf, what=f"bucket {b + 1}/{len(buckets)}")
            for p in bucket.pieces:
                targets[entries[p.entry].names[0]].view(-1)[p.start:p.stop].copy_(buf[p.offset:p.offset + p.stop - p.start])
            del buf
        for e in entries:
            first = targets[e.names[0]]
            for alias in e.names[1:]:
                if targets[alias].data_ptr() != first.data_ptr():
                    targets[alias].copy_(first)
    return stats


__all__ = ["Bucket", "Entry", "Piece", "WeightChannel", "WeightSyncError", "distinct_tensors", "full_tensor",
           "plan_buckets", "receive_buckets", "send_buckets"]
