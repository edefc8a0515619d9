"""PPO-clip policy loss, clipped value loss, and the loss aggregations they share.

Metrics are returned as dict[str, Tensor] of 0-dim detached tensors (no host sync inside the loss);
callers turn them into python numbers with float(). Token metrics are means over response tokens.
"""
from __future__ import annotations

import torch

from align.algos.masked import as_bool_mask, check_same_shape, masked_mean, masked_var

__all__ = ["AGG_MODES", "aggregate", "check_loss_weights", "policy_loss", "value_loss"]

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")

# Log-ratios beyond +-20 (ratio ~ 5e8) only arise from broken inputs; clamping keeps exp finite (verl does too).
_MAX_LOG_RATIO = 20.0


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # bf16/fp16 log-ratios are too coarse for PPO ratios (bf16 resolves ~0.8% near 1): compute in float32.
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def check_loss_weights(weights: torch.Tensor, logp: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per-token loss weights (rollout corrections) as a detached [B, T] tensor, 0 at padding.
    weights: [B] (one per sequence, broadcast over tokens) or [B, T]; values at padding are never read."""
    if weights.dim() == 1 and weights.shape[0] == logp.shape[0]:
        weights = weights.unsqueeze(-1).expand_as(logp)
    check_same_shape("weights", weights, "logp", logp)
    return torch.where(keep, weights.detach(), torch.zeros((), dtype=weights.dtype, device=weights.device))


def aggregate(
    loss: torch.Tensor,
    mask: torch.Tensor,
    agg: str = "token-mean",
    norm_length: float | None = None,
    *,
    global_denom: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss [B, T] over response tokens to a scalar (verl core_algos.agg_loss modes).

    loss, mask: [B, T] -> 0-dim. Padding positions are never read (NaN there is harmless).
    token-mean:              sum(loss*mask) / sum(mask)                      (DAPO, arXiv 2503.14476, eq. 8)
    seq-mean-token-mean:     mean over rows with >= 1 token of (row sum / row count)   (GRPO, arXiv 2402.03300)
    seq-mean-token-sum:      mean over all B rows of row sums (an empty row counts, with sum 0)
    seq-mean-token-sum-norm: sum(loss*mask) / (B * L), L = norm_length or T = mask.shape[-1]
                             (Dr. GRPO, arXiv 2503.20783: a constant normaliser; the trainers pass
                             algo.loss_norm_length, so L never follows the step's padded width T)
    Empty selections give 0. global_denom (optional) replaces the local count in the denominator (tokens
    for token-mean, non-empty rows for seq-mean-token-mean, B for the two token-sum modes) so that
    micro-batch losses computed with the whole minibatch's count sum to the minibatch loss (grad accumulation).
    """
    check_same_shape("loss", loss, "mask", mask)
    if loss.dim() != 2:
        raise ValueError(f"aggregate expects [B, T] losses, got shape {tuple(loss.shape)}")
    if agg not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation {agg!r}; choose one of {', '.join(AGG_MODES)}")
    if norm_length is not None:
        if agg != "seq-mean-token-sum-norm":
            raise ValueError(f"norm_length only applies to agg='seq-mean-token-sum-norm', not {agg!r}; drop it")
        if not norm_length > 0:
            raise ValueError(f"norm_length must be > 0, got {norm_length}")
    keep = as_bool_mask(mask)
    zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
    masked = torch.where(keep, loss, zero)
    row_sums = masked.sum(dim=-1)
    row_counts = keep.sum(dim=-1).to(loss.dtype)

    def denom(local: torch.Tensor | float) -> torch.Tensor | float:
        d = local if global_denom is None else global_denom
        return d.clamp(min=1) if isinstance(d, torch.Tensor) else max(float(d), 1.0)

    if agg == "token-mean":
        return row_sums.sum() / denom(row_counts.sum())
    if agg == "seq-mean-token-mean":
        nonempty = row_counts > 0
        row_means = torch.where(nonempty, row_sums / row_counts.clamp(min=1), zero)
        return row_means.sum() / denom(nonempty.sum().to(loss.dtype))
    batch = float(loss.shape[0])
    if agg == "seq-mean-token-sum":
        return row_sums.sum() / denom(batch)
    length = float(norm_length) if norm_length is not None else float(loss.shape[-1])
    return row_sums.sum() / (denom(batch) * max(length, 1.0))


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    norm_length: float | None = None,
    *,
    global_denom: float | torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss with asymmetric clipping and optional dual clip.

    logp, old_logp, mask: [B, T]; advantages: [B] (one per sequence, broadcast over tokens) or [B, T];
    weights (optional, detached): [B] or [B, T], multiplies the per-token loss before aggregation (rollout
    importance-sampling corrections, `align.algos.corrections`; verl's rollout_is_weights). -> (loss 0-dim, metrics).
    Per token, r = exp(logp - old_logp):  L = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))
    (Schulman et al. 2017, arXiv 1707.06347, eq. 7; clip-higher: DAPO, arXiv 2503.14476, eq. 10).
    Dual clip c > 1 (Ye et al. 2020, arXiv 1912.09729, eq. 5; verl compute_policy_loss): for A < 0,
    L = min(L, -c A). Aggregated by `aggregate(..., agg, norm_length, global_denom=...)`.
    Log-ratios are clamped to [-20, 20] before exp (verl). Padding positions are never read.
    Computed in float32 (float64 for float64 inputs); the loss is float32/float64 even for bf16 log-probs.
    metrics (0-dim detached tensors, means over response tokens):
      clipfrac        tokens where the clipped term is strictly larger (the clip is active, zero gradient)
      clipfrac_high   of those, tokens with A > 0 (r > 1 + clip_high); clipfrac_low: A < 0 (r < 1 - clip_low)
      dual_clip_frac  tokens with A < 0 where the dual clip -c A is strictly smaller (0 when dual_clip=None)
      approx_kl       0.5 (logp - old_logp)^2 (k2, TRL's approxkl)
      ratio_mean, ratio_max
    """
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None to disable), got {dual_clip}")
    keep, adv = policy_loss_inputs("policy_loss", logp, old_logp, advantages, mask, clip_low, clip_high)
    zero = torch.zeros((), dtype=adv.dtype, device=logp.device)
    # where() before exp: padding may hold -inf log-probs, and inf - inf would poison the gradient.
    log_ratio = torch.where(keep, logp.to(adv.dtype) - old_logp.detach().to(adv.dtype), zero)
    log_ratio = log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return clipped_surrogate(torch.exp(log_ratio), log_ratio, adv, keep, clip_low, clip_high, dual_clip, weights,
                             agg, norm_length, global_denom)


def policy_loss_inputs(fn: str, logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                       mask: torch.Tensor, clip_low: float, clip_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Shape / range checks shared by the clipped surrogates (`policy_loss`, `gspo_policy_loss`).
    -> (keep [B, T] bool, advantages [B, T] detached in the compute dtype, 0 on padding)."""
    check_same_shape("logp", logp, "old_logp", old_logp)
    check_same_shape("logp", logp, "mask", mask)
    if logp.dim() != 2:
        raise ValueError(f"{fn} expects [B, T] log-probs, got shape {tuple(logp.shape)}")
    if advantages.dim() == 1:
        if advantages.shape[0] != logp.shape[0]:
            raise ValueError(
                f"advantages has shape {tuple(advantages.shape)} but logp has {logp.shape[0]} rows; pass [B] or [B, T]"
            )
        advantages = advantages.unsqueeze(-1).expand_as(logp)
    else:
        check_same_shape("advantages", advantages, "logp", logp)
    if not (0.0 <= clip_low <= 1.0 and clip_high >= 0.0):
        raise ValueError(f"need 0 <= clip_low <= 1 and clip_high >= 0, got clip_low={clip_low}, clip_high={clip_high}")
    keep = as_bool_mask(mask)
    dtype = _compute_dtype(logp)
    adv = torch.where(keep, advantages.detach().to(dtype), torch.zeros((), dtype=dtype, device=logp.device))
    return keep, adv


def clipped_surrogate(ratio: torch.Tensor, log_ratio: torch.Tensor, adv: torch.Tensor, keep: torch.Tensor,
                      clip_low: float, clip_high: float, dual_clip: float | None, weights: torch.Tensor | None,
                      agg: str, norm_length: float | None,
                      global_denom: float | torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate of a per-token ratio [B, T] (token ratio for PPO, GSPO's s_i,t): per token
    L = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)), dual clip for A < 0, optional weights, then
    `aggregate`. `log_ratio` [B, T] (detached use only) feeds approx_kl. See `policy_loss` for the metrics."""
    dtype = adv.dtype
    zero = torch.zeros((), dtype=dtype, device=adv.device)
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(pg_unclipped, pg_clipped)
    clip_active = pg_clipped > pg_unclipped
    if dual_clip is not None:
        pg_dual = -adv * dual_clip
        dual_active = (adv < 0) & (per_token > pg_dual)
        per_token = torch.where(adv < 0, torch.minimum(per_token, pg_dual), per_token)
    else:
        dual_active = torch.zeros_like(keep)
    if weights is not None:
        per_token = per_token * check_loss_weights(weights, ratio, keep).to(dtype)

    loss = aggregate(per_token, keep, agg, norm_length, global_denom=global_denom)

    with torch.no_grad():
        ratio_d = ratio.detach()
        n_tokens = keep.sum()
        ratio_max = torch.where(keep, ratio_d, torch.full_like(ratio_d, -torch.inf)).max() if ratio_d.numel() else zero
        ratio_max = torch.where(n_tokens > 0, ratio_max, zero)
        metrics = {
            "clipfrac": masked_mean(clip_active.to(dtype), keep),
            "clipfrac_high": masked_mean((clip_active & (adv > 0)).to(dtype), keep),
            "clipfrac_low": masked_mean((clip_active & (adv < 0)).to(dtype), keep),
            "dual_clip_frac": masked_mean(dual_active.to(dtype), keep),
            "approx_kl": masked_mean(0.5 * log_ratio.detach().square(), keep),
            "ratio_mean": masked_mean(ratio_d, keep),
            "ratio_max": ratio_max,
        }
    return loss, {k: v.detach() for k, v in metrics.items()}


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None = 0.2,
    agg: str = "token-mean",
    norm_length: float | None = None,
    *,
    global_denom: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss.

    values, old_values, returns, mask: [B, T] -> (loss 0-dim, metrics).
    Per token: 0.5 max((v - R)^2, (old + clip(v - old, -c, c) - R)^2)   (PPO2 value clipping as in
    OpenAI baselines ppo2 / verl core_algos.compute_value_loss); clip=None: 0.5 (v - R)^2.
    Aggregated by `aggregate` (default token-mean). Padding positions are never read.
    Computed in float32 (float64 for float64 inputs).
    metrics (0-dim detached tensors): vf_clipfrac (tokens where the clipped term is strictly larger),
      value_mean, returns_mean, explained_variance = 1 - Var(R - v) / Var(R) (0 when Var(R) = 0).
    """
    check_same_shape("values", values, "old_values", old_values)
    check_same_shape("values", values, "returns", returns)
    check_same_shape("values", values, "mask", mask)
    if clip is not None and not clip >= 0.0:
        raise ValueError(f"value clip must be >= 0 (or None to disable), got {clip}")
    keep = as_bool_mask(mask)
    dtype = _compute_dtype(values)
    zero = torch.zeros((), dtype=dtype, device=values.device)
    v = torch.where(keep, values.to(dtype), zero)
    ret = torch.where(keep, returns.detach().to(dtype), zero)
    loss_unclipped = (v - ret).square()
    if clip is None:
        per_token = 0.5 * loss_unclipped
        clip_active = torch.zeros_like(keep)
    else:
        old = torch.where(keep, old_values.detach().to(dtype), zero)
        v_clipped = old + (v - old).clamp(-clip, clip)
        loss_clipped = (v_clipped - ret).square()
        per_token = 0.5 * torch.maximum(loss_unclipped, loss_clipped)
        clip_active = loss_clipped > loss_unclipped

    loss = aggregate(per_token, keep, agg, norm_length, global_denom=global_denom)

    with torch.no_grad():
        v_d = v.detach()
        var_r = masked_var(ret, keep, unbiased=False)
        var_err = masked_var(ret - v_d, keep, unbiased=False)
        explained = torch.where(var_r > 0, 1 - var_err / torch.where(var_r > 0, var_r, 1.0), zero)
        metrics = {
            "vf_clipfrac": masked_mean(clip_active.to(dtype), keep),
            "value_mean": masked_mean(v_d, keep),
            "returns_mean": masked_mean(ret, keep),
            "explained_variance": explained,
        }
    return loss, {k: v.detach() for k, v in metrics.items()}
