"""GSPO: the clipped surrogate with a sequence-level, length-normalised importance ratio.

Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv 2507.18071 (eqs. 5-7 and 10-11). Metrics are
0-dim detached tensors, like `align.algos.policy_loss`.
"""
from __future__ import annotations

import torch

from align.algos.losses import _MAX_LOG_RATIO, _compute_dtype, clipped_surrogate, policy_loss_inputs
from align.algos.masked import as_bool_mask, check_same_shape, masked_mean

__all__ = ["gspo_policy_loss", "sequence_log_ratio"]


def sequence_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log s_i = (1/|y_i|) * sum_t (logp_t - old_logp_t) over response tokens (GSPO, arXiv 2507.18071, eq. 7).

    logp, old_logp, mask: [B, T] -> [B] (0 for a row without response tokens). Differentiable in logp;
    padding positions are never read. Computed in float32 (float64 for float64 inputs)."""
    check_same_shape("logp", logp, "old_logp", old_logp)
    check_same_shape("logp", logp, "mask", mask)
    keep = as_bool_mask(mask)
    dtype = _compute_dtype(logp)
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    diff = torch.where(keep, logp.to(dtype) - old_logp.detach().to(dtype), zero)
    return diff.sum(-1) / keep.sum(-1).clamp(min=1).to(dtype)


def gspo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    dual_clip: float | None = None,
    agg: str = "seq-mean-token-mean",
    norm_length: float | None = None,
    *,
    global_denom: float | torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO-token loss (arXiv 2507.18071, eqs. 10-11; verl core_algos.compute_policy_loss_gspo).

    logp, old_logp, mask: [B, T]; advantages: [B] or [B, T]; weights (optional, detached): [B] or [B, T],
    multiplies the per-token loss (rollout corrections) -> (loss 0-dim, metrics).
    Per token, with s_i = exp(sequence_log_ratio) and s_i,t = sg[s_i] * pi(y_t) / sg[pi(y_t)] (the value of
    s_i,t is s_i; its gradient is s_i * grad log pi(y_t)):
        L = max(-A s_i,t, -A clip(s_i,t, 1 - clip_low, 1 + clip_high))
    Aggregated by `aggregate(..., agg, norm_length, global_denom=...)`. With advantages [B] and
    agg="seq-mean-token-mean" (verl's forced choice; the paper's 1/G sum_i) this equals sequence-level GSPO,
    -1/G sum_i min(s_i A_i, clip(s_i, 1 - e_low, 1 + e_high) A_i), in value and gradient (paper, sec. 4.3).
    The ratio is length-normalised, so it stays close to 1: the paper clips at 3e-4 / 4e-4, two orders of
    magnitude below the token-level 0.2. dual_clip must be None (it bounds token-level ratios).
    The sequence log-ratio is clamped to [-20, 20] before exp; padding positions are never read.
    Computed in float32 (float64 for float64 inputs).
    metrics: the keys of `policy_loss` (clipfrac, clipfrac_high, clipfrac_low, dual_clip_frac = 0, approx_kl
    = mean 0.5 (logp - old)^2 over tokens, ratio_mean / ratio_max of s_i,t over tokens) and seq_ratio_mean,
    the mean of s_i over rows with response tokens.
    """
    if dual_clip is not None:
        raise ValueError("dual_clip bounds token-level ratios; GSPO's ratio is per sequence: pass dual_clip=None")
    keep, adv = policy_loss_inputs("gspo_policy_loss", logp, old_logp, advantages, mask, clip_low, clip_high)
    dtype = adv.dtype
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    lp = torch.where(keep, logp.to(dtype), zero)
    seq_log_ratio = sequence_log_ratio(logp, old_logp, keep).detach().clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    # log s_i,t = sg[log s_i] + log pi(y_t) - sg[log pi(y_t)]
    ratio = torch.exp(seq_log_ratio.unsqueeze(-1) + lp - lp.detach())
    token_log_ratio = torch.where(keep, logp.detach().to(dtype) - old_logp.detach().to(dtype), zero)  # approx_kl
    loss, metrics = clipped_surrogate(ratio, token_log_ratio, adv, keep, clip_low, clip_high, None, weights, agg,
                                      norm_length, global_denom)
    metrics["seq_ratio_mean"] = masked_mean(torch.exp(seq_log_ratio), keep.any(-1)).detach()
    return loss, metrics
