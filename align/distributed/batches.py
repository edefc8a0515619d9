"""How a step's global batch is split over ranks, and the reductions that make its statistics global.

Every rank draws the same global batch of prompts (same sampler, same seed) and keeps its contiguous share of whole
prompt groups, so rank r holds global rows [r * n, (r + 1) * n) with n = rows per rank. The update walks the
global minibatch order (one generator, the same on every rank) and each rank trains the rows of a minibatch it
owns; loss denominators are global counts, so the gradients summed over ranks are the one-process gradient.
Every function here is the identity (or the local value) in a world of one.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from align.distributed.context import DistContext


def local_share(ctx: DistContext, items: Sequence[Any]) -> tuple[list[Any], int]:
    """(this rank's contiguous share of `items`, the global index of its first item). len(items) % world == 0
    (checked at start-up for train.prompts_per_step)."""
    per = len(items) // ctx.world_size
    lo = ctx.rank * per
    return list(items[lo:lo + per]), lo


def global_train_rows(ctx: DistContext, local_rows: torch.Tensor, n_local: int) -> torch.Tensor:
    """[K] sorted global indices of every rank's training rows (local_rows: sorted indices into this rank's
    n_local rows), the list one process would hold for the same global batch."""
    if not ctx.enabled:
        return local_rows
    keep = torch.zeros(n_local * ctx.world_size, dtype=torch.int32, device=local_rows.device)
    keep[local_rows + ctx.rank * n_local] = 1
    return ctx.all_reduce_sum(keep).nonzero().squeeze(-1).to(local_rows.dtype)


def owned_rows(ctx: DistContext, global_rows: torch.Tensor, n_local: int) -> torch.Tensor:
    """The local indices of the rows of `global_rows` (a global minibatch, in its order) that this rank holds."""
    if not ctx.enabled:
        return global_rows
    lo = ctx.rank * n_local
    mine = (global_rows >= lo) & (global_rows < lo + n_local)
    return global_rows[mine] - lo


def global_sums(ctx: DistContext, *values: float) -> list[float]:
    """Each value summed over ranks (one collective; float64 so counts stay exact)."""
    if not ctx.enabled:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=collective_device(ctx))
    return ctx.all_reduce_sum(t).tolist()


def global_mean(ctx: DistContext, values: torch.Tensor) -> float:
    """The mean of `values` over every rank's entries (0 for none; one process: values.mean() as it is)."""
    if not ctx.enabled:
        return float(values.mean())
    total, count = global_sums(ctx, float(values.sum()), float(values.numel()))
    return total / count if count else 0.0


def global_ratio(ctx: DistContext, numerator: torch.Tensor | float, denominator: torch.Tensor | float) -> float:
    """sum over ranks of numerator / sum over ranks of denominator (clamped at 1, as the one-process metric)."""
    if not ctx.enabled:
        return float(torch.as_tensor(numerator) / torch.as_tensor(denominator).clamp(min=1))
    num, den = global_sums(ctx, float(numerator), float(denominator))
    return num / max(den, 1.0)


def missing_passes(ctx: DistContext, passes: int) -> int:
    """How many zero-weight forward/backward passes this rank owes so that every rank runs as many as the busiest
    one: FSDP's all-gathers and reduce-scatters are collectives, a rank that skipped one would hang the others."""
    if not ctx.enabled:
        return 0
    t = torch.tensor([passes], dtype=torch.int64, device=collective_device(ctx))
    return int(ctx.all_reduce_max(t)) - passes


def reduce_sum_fn(ctx: DistContext):
    """The reduction `align.algos` batch statistics take (`reduce=`): None (the identity) in a world of one."""
    if not ctx.enabled:
        return None
    return lambda t: ctx.all_reduce_sum(t.clone())


def gather_padded(ctx: DistContext, tensor: torch.Tensor, fill: float = 0) -> torch.Tensor:
    """Every rank's [n, T_r, ...] tensor concatenated in rank order, dim 1 padded with `fill` to the widest T_r
    (response widths differ between ranks); [n, ...] tensors are concatenated as they are."""
    if not ctx.enabled:
        return tensor
    if tensor.dim() >= 2:
        width = torch.tensor([tensor.shape[1]], dtype=torch.int64, device=tensor.device)
        wide = int(ctx.all_reduce_max(width))
        if wide > tensor.shape[1]:
            pad = list(tensor.shape)
            pad[1] = wide - tensor.shape[1]
            tensor = torch.cat([tensor, torch.full(pad, fill, dtype=tensor.dtype, device=tensor.device)], dim=1)
    if tensor.dtype == torch.bool:  # gloo has no bool all-gather
        return ctx.all_gather_rows(tensor.to(torch.uint8)).bool()
    return ctx.all_gather_rows(tensor)


def local_rows_of(ctx: DistContext, global_tensor: torch.Tensor, n_local: int, width: int | None = None) -> torch.Tensor:
    """This rank's rows of a gathered tensor (and its own width of dim 1, when given)."""
    if not ctx.enabled:
        return global_tensor
    out = global_tensor[ctx.rank * n_local:(ctx.rank + 1) * n_local]
    return out[:, :width] if width is not None and out.dim() >= 2 else out


def collective_device(ctx: DistContext) -> torch.device:
    import torch.distributed as dist

    # NCCL alone reduces CUDA tensors only; with gloo beside it (or alone) CPU tensors work
    backend = str(dist.get_backend()) if dist.is_initialized() else ""
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------- logged metrics
# Keys whose value each phase already made global (identical on every rank): rank 0's value is logged.
GLOBAL_KEYS = frozenset({"reward/mean", "reward/std", "reward/max", "reward/min", "train/grad_norm", "train/lr",
                         "kl/coef", "kl/mean", "kl/mean_seq", "advantages/mean", "returns/mean", "advantages/abs_mean",
                         "grpo/zero_variance_groups", "train/skipped"})
# Counts and partial sums (loss/* are per-rank shares of the global loss: their sum is the loss).
SUMMED_KEYS = frozenset({"rollout/tokens", "rollout/tokens_per_s", "rollout/policy_tokens", "rollout/tool_tokens",
                         "reward/errors", "reward/not_applicable", "train/samples"})
SUMMED_PREFIXES = ("loss/", "reward/sandbox_")


def reduce_metrics(ctx: DistContext, metrics: dict[str, float]) -> dict[str, float]:
    """One step's metrics over ranks, as rank 0 logs them: global keys as they are, counts and loss shares summed,
    */max and time/* the max, */min the min, every other key the mean over ranks (each rank holds the same number
    of samples, so per-sample means are exact; token-weighted ones such as policy/clipfrac are the rank average)."""
    if not ctx.enabled:
        return metrics
    every = ctx.all_gather_objects(metrics)
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for m in every for k in m):
        values = [float(m[key]) for m in every if key in m]
        if key in GLOBAL_KEYS:
            out[key] = values[0]
        elif key in SUMMED_KEYS or key.startswith(SUMMED_PREFIXES):
            out[key] = sum(values)
        elif key.startswith("time/") or key.endswith(("/max", "_max")):
            out[key] = max(values)
        elif key.endswith(("/min", "_min")):
            out[key] = min(values)
        else:
            out[key] = sum(values) / len(values)
    return out
