"""Importance-sampling corrections between the rollout engine's log-probs and the trainer's old log-probs.

The engine that sampled (rollout_logp, `RolloutBatch.logprobs`) and the trainer's teacher-forced pass over the
same weights (old_logp) disagree by kernel / precision / batching differences, and by whole weight versions
once generation runs ahead of training. With rho_t = pi_old(y_t) / pi_rollout(y_t) = exp(old_logp_t -
rollout_logp_t) the corrections give per-token loss weights that multiply the clipped surrogate (the
behaviour-policy weight of decoupled PPO, Hilton et al. 2021, arXiv 2110.00641, eq. 3; verl's
rollout_is_weights, TRL's importance_sampling_ratio). Weights are detached; padding gets 0.

Metrics are 0-dim detached tensors (no host sync); callers float() them.
"""
from __future__ import annotations

import torch

from align.algos.masked import as_bool_mask, check_same_shape, masked_mean

__all__ = [
    "CORRECTION_MODES",
    "rollout_correction",
    "rollout_log_ratio",
    "seq_mis_weights",
    "token_tis_weights",
]

# none: no correction; token_tis: truncated IS per token; seq_mis: masked IS on the sequence ratio (product of
# the token ratios); seq_mis_geo: masking on the geometric mean of the token ratios (rejection only).
CORRECTION_MODES = ("none", "token_tis", "seq_mis", "seq_mis_geo")

# exp() of log-ratios beyond +-20 (ratio ~ 5e8) only arises from broken inputs; clamp as the losses do.
_MAX_LOG_RATIO = 20.0


def _dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def rollout_log_ratio(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log rho_t = old_logp_t - rollout_logp_t on response tokens, 0 at padding.

    old_logp, rollout_logp, mask: [B, T] -> [B, T], detached, float32 (float64 for float64 inputs)."""
    check_same_shape("old_logp", old_logp, "rollout_logp", rollout_logp)
    check_same_shape("old_logp", old_logp, "mask", mask)
    if old_logp.dim() != 2:
        raise ValueError(f"rollout corrections expect [B, T] log-probs, got shape {tuple(old_logp.shape)}")
    keep = as_bool_mask(mask)
    dtype = _dtype(old_logp)
    zero = torch.zeros((), dtype=dtype, device=old_logp.device)
    return torch.where(keep, old_logp.detach().to(dtype) - rollout_logp.detach().to(dtype), zero)


def token_tis_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                      cap: float = 2.0) -> torch.Tensor:
    """Truncated importance sampling per token: w_t = min(exp(old_logp_t - rollout_logp_t), cap).

    old_logp, rollout_logp, mask: [B, T] -> weights [B, T] (0 at padding). cap > 0.
    (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training", TIS;
    verl rollout_is="token", TRL vllm_importance_sampling_mode="token_truncate".)"""
    if not cap > 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    keep = as_bool_mask(mask)
    log_rho = rollout_log_ratio(old_logp, rollout_logp, keep).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    w = torch.exp(log_rho).clamp(max=cap)
    return torch.where(keep, w, torch.zeros_like(w))


def _sequence_log_ratio(log_rho: torch.Tensor, keep: torch.Tensor, form: str) -> torch.Tensor:
    if form == "arithmetic":
        return log_rho.sum(-1)
    if form == "geometric":
        return log_rho.sum(-1) / keep.sum(-1).clamp(min=1).to(log_rho.dtype)
    raise ValueError(f"unknown sequence ratio form {form!r}; choose 'arithmetic' or 'geometric'")


def seq_mis_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, lo: float, hi: float,
                    form: str = "arithmetic") -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence-level masked importance sampling: whole sequences whose ratio leaves [lo, hi] get weight 0.

    old_logp, rollout_logp, mask: [B, T] -> (weights [B], ratio [B]); needs 0 <= lo <= 1 <= hi.
    form="arithmetic": rho_i = prod_t rho_t = exp(sum_t log rho_t); w_i = rho_i if lo <= rho_i <= hi else 0
      (masked IS: Liu, Li et al. 2025, "When Speed Kills Stability", seq-MIS; TRL's "sequence_mask" with
      lo = 0; like verl's rollout_is="sequence" plus rollout_rs="sequence").
    form="geometric": rho_i = exp((1/|y_i|) sum_t log rho_t); w_i = 1 if lo <= rho_i <= hi else 0 (rejection
      only: the geometric mean is a per-token mismatch measure, not an importance weight; verl
      rollout_rs="geometric"; its bounds must be tight, e.g. [0.999, 1.001]).
    A row without response tokens has ratio 1. The bounds are tested on the unclamped log-ratio; ratios are
    clamped to exp(+-20) before exp."""
    if not (0.0 <= lo <= 1.0 <= hi):
        raise ValueError(f"need 0 <= lo <= 1 <= hi (a sequence both engines agree on must be kept), got lo={lo}, hi={hi}")
    keep = as_bool_mask(mask)
    log_rho = rollout_log_ratio(old_logp, rollout_logp, keep)
    seq = _sequence_log_ratio(log_rho, keep, form)
    log_lo = torch.log(torch.tensor(lo, dtype=seq.dtype, device=seq.device))
    log_hi = torch.log(torch.tensor(hi, dtype=seq.dtype, device=seq.device))
    inside = (seq >= log_lo) & (seq <= log_hi)
    ratio = torch.exp(seq.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    kept_weight = ratio if form == "arithmetic" else torch.ones_like(ratio)
    return torch.where(inside, kept_weight, torch.zeros_like(ratio)), ratio


def _quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolation quantile of a 1-D tensor (numpy's default); 0 for an empty tensor."""
    if values.numel() == 0:
        return torch.zeros((), dtype=values.dtype, device=values.device)
    v = values.sort().values
    pos = q * (v.numel() - 1)
    lo, hi = int(pos), min(int(pos) + 1, v.numel() - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def rollout_correction(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, mode: str,
                       cap: float = 2.0, lo: float = 1.0 / 3.0, hi: float = 3.0,
                       ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """Loss weights for `mode` and the mismatch metrics. old_logp, rollout_logp, mask: [B, T].
    The defaults are those of `algo.rollout_correction` for token_tis and seq_mis (seq_mis_geo needs tight
    bounds, e.g. lo = 1 / 1.001, hi = 1.001).

    -> (weights [B, T] detached, 0 at padding; None for mode "none", metrics).
    mode: "none" | "token_tis" (`token_tis_weights`, cap) | "seq_mis" (`seq_mis_weights`, arithmetic, [lo, hi])
          | "seq_mis_geo" (`seq_mis_weights`, geometric, [lo, hi]).
    metrics (0-dim detached):
      kl_k3         mean over response tokens of rho_t - 1 - log rho_t, the k3 estimate of
                    KL(pi_rollout || pi_old) from the rollout's samples (Schulman 2020, "Approximating KL")
      ratio_p50, ratio_p95, ratio_max, ratio_min
                    percentiles of the ratio the mode thresholds, before truncation or masking: token ratios
                    over response tokens (none, token_tis) or sequence ratios over rows with response tokens
      weight_mean   mean loss weight over response tokens (1 for none)
      capped_share  token_tis: share of response tokens whose ratio exceeded the cap
      masked_share  seq_mis*: share of rows with response tokens whose weight is 0
    """
    if mode not in CORRECTION_MODES:
        raise ValueError(f"unknown rollout correction mode {mode!r}; choose one of {', '.join(CORRECTION_MODES)}")
    keep = as_bool_mask(mask)
    log_rho = rollout_log_ratio(old_logp, rollout_logp, keep)
    rho = torch.exp(log_rho.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    nonempty = keep.any(-1)
    metrics: dict[str, torch.Tensor] = {"kl_k3": masked_mean(rho - 1 - log_rho, keep)}
    if mode in ("none", "token_tis"):
        thresholded = rho[keep]
    else:
        form = "arithmetic" if mode == "seq_mis" else "geometric"
        seq_w, seq_ratio = seq_mis_weights(old_logp, rollout_logp, keep, lo, hi, form)
        thresholded = seq_ratio[nonempty]
    weights: torch.Tensor | None = None
    if mode == "token_tis":
        weights = token_tis_weights(old_logp, rollout_logp, keep, cap)
        metrics["capped_share"] = masked_mean((rho > cap).to(rho.dtype), keep)
    elif mode != "none":
        weights = torch.where(keep, seq_w.unsqueeze(-1).expand_as(rho), torch.zeros_like(rho))
        metrics["masked_share"] = masked_mean((seq_w == 0).to(rho.dtype), nonempty)
    metrics["weight_mean"] = masked_mean(weights, keep) if weights is not None else torch.ones((), dtype=rho.dtype, device=rho.device)
    for name, q in (("ratio_p50", 0.5), ("ratio_p95", 0.95), ("ratio_max", 1.0), ("ratio_min", 0.0)):
        metrics[name] = _quantile(thresholded, q)
    return weights, {k: v.detach() for k, v in metrics.items()}
