"""Masked reductions over response tokens.

Convention for every function here: `mask` has the shape of `x`; a nonzero entry marks a response token
(it counts), a zero entry marks padding (it contributes nothing). Values at padding positions are never
read, so NaN / inf there cannot leak into a result. An empty selection gives 0, never NaN.
"""
from __future__ import annotations

from typing import Callable

import torch

# A reduction over data-parallel ranks: tensor -> its elementwise sum over every rank (None: one process).
Reduce = Callable[[torch.Tensor], torch.Tensor] | None

__all__ = ["masked_sum", "masked_mean", "masked_var", "masked_whiten"]


def check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """Raise a one-line ValueError when two tensors that must align do not."""
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}; they must match")


def as_bool_mask(mask: torch.Tensor) -> torch.Tensor:
    """Any 0/1 (bool, int or float) mask as a bool tensor: nonzero = counted."""
    return mask if mask.dtype == torch.bool else mask != 0


def _zero_padding(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    # torch.where (not x * mask) so that NaN / inf at padding positions give 0, not NaN.
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `x` over entries where `mask` is nonzero.

    x, mask: same shape (e.g. [B, T]). dim=None -> 0-dim tensor; dim=d -> that dim reduced.
    """
    check_same_shape("x", x, "mask", mask)
    keep = as_bool_mask(mask)
    xs = _zero_padding(x, keep)
    return xs.sum() if dim is None else xs.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None, *, reduce: Reduce = None) -> torch.Tensor:
    """Mean of `x` over entries where `mask` is nonzero; 0 where nothing is selected.

    x, mask: same shape (e.g. [B, T]). dim=None -> 0-dim tensor; dim=d -> that dim reduced.
    reduce (dim=None only): sums a tensor over data-parallel ranks; the sum and the count are reduced, so the mean
    is over every rank's entries (None: this tensor's entries alone).
    Source: masked_mean in TRL core / verl `verl.utils.torch_functional` (sum(x*mask) / sum(mask)).
    """
    check_same_shape("x", x, "mask", mask)
    keep = as_bool_mask(mask)
    total = _zero_padding(x, keep)
    count = keep.to(x.dtype if x.is_floating_point() else torch.float32)
    if dim is None:
        total, count = total.sum(), count.sum()
        if reduce is not None:
            total, count = reduce(torch.stack([total, count.to(total.dtype)]))
    else:
        total, count = total.sum(dim=dim), count.sum(dim=dim)
    # total is exactly 0 where count is 0, so clamping the count turns 0/0 into 0 without a branch.
    return total / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, dim: int | None = None, *,
               reduce: Reduce = None) -> torch.Tensor:
    """Variance of `x` over entries where `mask` is nonzero.

    x, mask: same shape. dim=None -> 0-dim tensor; dim=d -> that dim reduced.
    unbiased=True applies Bessel's correction n / (n - 1). Fewer than 2 selected entries (unbiased) or none
    (biased) give 0 instead of NaN / an error (verl raises there; we prefer a defined, NaN-free value).
    reduce (dim=None only): as in `masked_mean`; mean, variance and count are over every rank's entries.
    Source: masked_var in TRL core / verl torch_functional.
    """
    check_same_shape("x", x, "mask", mask)
    keep = as_bool_mask(mask)
    mean = masked_mean(x, mask, dim=dim, reduce=reduce)
    if dim is not None:
        mean = mean.unsqueeze(dim)
    centered_sq = (x - mean) ** 2
    var = masked_mean(centered_sq, mask, dim=dim, reduce=reduce)
    if unbiased:
        count = keep.to(var.dtype).sum() if dim is None else keep.to(var.dtype).sum(dim=dim)
        if reduce is not None:
            count = reduce(count)
        correction = torch.where(count > 1, count / (count - 1).clamp(min=1), torch.zeros_like(count))
        var = var * correction
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8, unbiased: bool = True, *,
    reduce: Reduce = None,
) -> torch.Tensor:
    """Whiten `x` with the mean and variance of its masked entries, over the whole tensor.

    x, mask: same shape (e.g. [B, T]) -> same shape. out = (x - mean) * rsqrt(var + eps); with
    shift_mean=False the mean is added back (out + mean), as TRL / verl do for advantages.
    unbiased=True (TRL / verl) uses Bessel's correction; unbiased=False the biased variance
    (torch.var(unbiased=False)), as the released CD-RLHF `whiten` of its intrinsic reward does.
    Padding positions are 0 in the output. A single selected entry gives 0 (unbiased var is taken as 0).
    reduce: sums a tensor over data-parallel ranks (see `masked_mean`): the statistics are those of every rank's
    entries together, so N ranks whiten as one process would (None: this tensor's entries alone).
    Source: `whiten` / `masked_whiten` in TRL core and verl torch_functional.
    """
    check_same_shape("x", x, "mask", mask)
    keep = as_bool_mask(mask)
    mean = masked_mean(x, mask, reduce=reduce)
    var = masked_var(x, mask, unbiased=unbiased, reduce=reduce)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_padding(whitened, keep)
