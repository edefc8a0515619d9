"""Advantage estimators: GAE for PPO, group-relative estimators for GRPO-style training.

Layout: batches are prompt-major, the `group_size` samples of one prompt are contiguous
([p0s0, p0s1, ..., p1s0, ...]). Advantages carry no gradient (inputs are detached).

`ADVANTAGE_ESTIMATORS` maps a name to an estimator. An outcome-level estimator has the common signature

    fn(scores: Tensor[B], group_size: int, *, valid: Tensor[B] | None = None) -> Tensor[B]

and a token-level estimator (marked with `@token_level`; `is_token_level(fn)` tells them apart) also takes the
response mask and returns one advantage per response token, 0 on padding:

    fn(scores: Tensor[B], group_size: int, *, mask: Tensor[B, T], valid: Tensor[B] | None = None) -> Tensor[B, T]

Registered: grpo, dr_grpo, rloo, reinforce_pp_seq (outcome level) and reinforce_pp (token level).

`valid` (bool, optional) marks samples whose reward is usable; excluded samples (e.g. the reward errored)
get advantage 0 and enter no mean or std, and their scores are never read (NaN there is fine). A group with
fewer than 2 valid samples gets all zeros. A non-finite score on a valid sample is a ValueError: NaN never
reaches advantages.
"""
from __future__ import annotations

from typing import Callable

import torch

from align.algos.masked import as_bool_mask, check_same_shape, masked_whiten

__all__ = [
    "gae",
    "group_advantages",
    "rloo_advantages",
    "reinforce_pp_advantages",
    "reinforce_pp_token_advantages",
    "grpo_advantages",
    "dr_grpo_advantages",
    "reinforce_pp_token_estimator",
    "token_level",
    "is_token_level",
    "ADVANTAGE_ESTIMATORS",
]


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    # Low-precision inputs are accumulated in float32; float64 stays float64.
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def gae(
    token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens.

    token_rewards, values, mask: [B, T] -> (advantages [B, T], returns [B, T]).
    delta_t = r_t + gamma * V_next - V_t;  A_t = delta_t + gamma * lam * A_next  (Schulman et al. 2016,
    arXiv 1506.02438, eq. 16; the backward loop of verl core_algos.compute_gae_advantage_return).
    The value after the last response token is 0. Padding positions (mask 0), including padding in the
    middle of a row, are skipped: "next" means the next response token of the same row, so the recursion
    bridges them; rewards/values there are ignored, and advantages and returns are 0 there.
    returns = advantages + values on response tokens.
    """
    check_same_shape("token_rewards", token_rewards, "values", values)
    check_same_shape("token_rewards", token_rewards, "mask", mask)
    if token_rewards.dim() != 2:
        raise ValueError(f"gae expects [B, T] tensors, got {token_rewards.dim()} dims; add a batch dim")
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gae needs gamma and lam in [0, 1], got gamma={gamma}, lam={lam}")
    out_dtype = torch.promote_types(token_rewards.dtype, values.dtype)
    if not out_dtype.is_floating_point:
        out_dtype = torch.float32
    dtype = _work_dtype(torch.empty((), dtype=out_dtype))
    keep = as_bool_mask(mask)
    zero = torch.zeros((), dtype=dtype, device=values.device)
    rewards = torch.where(keep, token_rewards.detach().to(dtype), zero)
    vals = torch.where(keep, values.detach().to(dtype), zero)

    batch, length = rewards.shape
    next_value = torch.zeros(batch, dtype=dtype, device=vals.device)
    next_adv = torch.zeros(batch, dtype=dtype, device=vals.device)
    adv_columns = [None] * length
    for t in range(length - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - vals[:, t]
        adv_t = delta + gamma * lam * next_adv
        m = keep[:, t]
        adv_columns[t] = torch.where(m, adv_t, zero)
        # Only response tokens advance the recursion; padding leaves "next" untouched (bridging).
        next_value = torch.where(m, vals[:, t], next_value)
        next_adv = torch.where(m, adv_t, next_adv)
    if length == 0:
        advantages = torch.zeros_like(rewards)
    else:
        advantages = torch.stack(adv_columns, dim=1)
    returns = torch.where(keep, advantages + vals, zero)
    return advantages.to(out_dtype), returns.to(out_dtype)


def _check_group_inputs(
    scores: torch.Tensor, group_size: int, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate and return (scores as [n_groups, G] float64 with invalid entries zeroed, valid as [n_groups, G])."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D [B], got shape {tuple(scores.shape)}; flatten it prompt-major")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    batch = scores.shape[0]
    if batch % group_size != 0:
        raise ValueError(f"group_size={group_size} must divide the batch size {batch} (prompt-major groups)")
    if valid is None:
        keep = torch.ones(batch, dtype=torch.bool, device=scores.device)
    else:
        check_same_shape("valid", valid, "scores", scores)
        keep = as_bool_mask(valid)
    s = scores.detach().to(torch.float64)
    if not bool(torch.isfinite(s[keep]).all()):
        raise ValueError("scores contain NaN/inf on valid samples; mark those samples invalid with `valid`")
    s = torch.where(keep, s, torch.zeros((), dtype=s.dtype, device=s.device))
    return s.view(-1, group_size), keep.view(-1, group_size)


def _out_dtype(scores: torch.Tensor) -> torch.dtype:
    return scores.dtype if scores.dtype.is_floating_point else torch.float32


def _shift_by_first_valid(s: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """s, keep: [n_groups, G] -> s minus the group's first valid score (0 on invalid entries).

    Equal scores then become exact zeros, so a group of equal scores gives exactly 0 advantages even with
    eps=0 (a mean computed from the raw values can be off by one ulp). Shifts cancel in every estimator.
    """
    first = keep.to(torch.int64).argmax(dim=1, keepdim=True)
    return torch.where(keep, s - s.gather(1, first), torch.zeros((), dtype=s.dtype, device=s.device))


def _group_mean(s: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """s, keep: [n_groups, G] -> (mean over valid [n_groups, 1], valid count [n_groups, 1])."""
    count = keep.sum(dim=1, keepdim=True).to(s.dtype)
    mean = s.sum(dim=1, keepdim=True) / count.clamp(min=1)
    return mean, count


def group_advantages(
    scores: torch.Tensor,
    group_size: int,
    scale: str = "group",
    eps: float = 1e-6,
    *,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Group-relative outcome advantages (GRPO).

    scores: [B] (prompt-major), valid: optional [B] bool -> advantages [B].
    scale="group": (s - group_mean) / (group_std + eps), unbiased std within the group
      (Shao et al. 2024, DeepSeekMath arXiv 2402.03300, sec. 4.1.2; TRL scale_rewards="group").
    scale="batch": (s - group_mean) / (batch_std + eps), unbiased std of all valid scores in the batch
      (TRL scale_rewards="batch").
    scale="none": s - group_mean, no division (Dr. GRPO, Liu et al. 2025, arXiv 2503.20783, eq. 3).
    A group of equal scores gives 0. A group with < 2 valid samples gives 0. Computed in float64.
    """
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    s, keep = _check_group_inputs(scores, group_size, valid)
    raw = s
    s = _shift_by_first_valid(s, keep)
    mean, count = _group_mean(s, keep)
    centered = torch.where(keep, s - mean, torch.zeros((), dtype=s.dtype, device=s.device))
    if scale == "group":
        std = (centered.pow(2).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()
    elif scale == "batch":
        flat = _shift_by_first_valid(raw.reshape(1, -1), keep.reshape(1, -1))
        n = keep.sum().to(s.dtype)
        batch_mean = flat.sum() / n.clamp(min=1)
        dev = torch.where(keep.reshape(1, -1), flat - batch_mean, torch.zeros((), dtype=s.dtype, device=s.device))
        std = (dev.pow(2).sum() / (n - 1).clamp(min=1)).sqrt()
    else:
        std = None
    if std is None:
        adv = centered
    else:
        denom = std + eps
        # eps=0 with a zero std: the centred scores are 0 too; define 0/0 as 0.
        adv = torch.where(denom > 0, centered / torch.where(denom > 0, denom, torch.ones_like(denom)), 0.0)
    adv = torch.where(count >= 2, adv, torch.zeros((), dtype=s.dtype, device=s.device))
    return adv.reshape(-1).to(_out_dtype(scores))


def rloo_advantages(
    scores: torch.Tensor, group_size: int, *, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """REINFORCE leave-one-out advantages.

    scores: [B] (prompt-major), valid: optional [B] bool -> advantages [B].
    A_i = s_i - mean_{j != i} s_j over the valid samples of the group (Ahmadian et al. 2024, arXiv 2402.14740,
    eq. 8; Kool et al. 2019). Groups with < 2 valid samples give 0, so group_size must be >= 2.
    """
    if isinstance(group_size, int) and not isinstance(group_size, bool) and group_size < 2:
        raise ValueError(f"rloo_advantages needs group_size >= 2 (leave-one-out baseline), got {group_size}")
    s, keep = _check_group_inputs(scores, group_size, valid)
    s = _shift_by_first_valid(s, keep)
    total = s.sum(dim=1, keepdim=True)
    count = keep.sum(dim=1, keepdim=True).to(s.dtype)
    baseline = (total - s) / (count - 1).clamp(min=1)
    adv = torch.where(keep & (count >= 2), s - baseline, torch.zeros((), dtype=s.dtype, device=s.device))
    return adv.reshape(-1).to(_out_dtype(scores))


def reinforce_pp_advantages(
    scores: torch.Tensor, group_size: int, eps: float = 1e-8, *, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """REINFORCE++-baseline outcome advantages, one per sample.

    scores: [B] (prompt-major), valid: optional [B] bool -> advantages [B].
    Subtract the group mean, then whiten over the valid samples of the whole batch (unbiased variance,
    (x - mean) / sqrt(var + eps)) (Hu 2025, REINFORCE++, arXiv 2501.03262, "REINFORCE++-baseline").
    Each sample counts once in the batch statistics. Registered as `reinforce_pp_seq` (it was `reinforce_pp`
    before 0.2.0). Hu 2025 / verl / OpenRLHF whiten token-level advantages instead (each sample weighted by
    its length): that is `reinforce_pp_token_advantages`, registered as `reinforce_pp`.
    Groups with < 2 valid samples and invalid samples give 0 and are left out of the batch statistics.
    """
    s, keep = _check_group_inputs(scores, group_size, valid)
    s = _shift_by_first_valid(s, keep)
    mean, count = _group_mean(s, keep)
    used = keep & (count >= 2)
    centered = torch.where(used, s - mean, torch.zeros((), dtype=s.dtype, device=s.device))
    adv = masked_whiten(centered, used, shift_mean=True, eps=eps)
    return adv.reshape(-1).to(_out_dtype(scores))


def reinforce_pp_token_advantages(
    scores: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
    token_rewards: torch.Tensor | None = None,
    gamma: float = 1.0,
    eps: float = 1e-8,
    *,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++-baseline token-level advantages (OpenRLHF's layout).

    scores: [B], mask: [B, T], token_rewards: optional [B, T] (e.g. -kl_coef * kl), valid: optional [B]
    -> (advantages [B, T], returns [B, T]).
    1. centred = s - group_mean (valid samples; groups with < 2 valid samples and invalid samples -> 0 and
       their rows are dropped from step 3);
    2. the centred score is added to the row's last response token, plus `token_rewards` on every response
       token, and returns are the discounted sums to go over response tokens (padding skipped, as in `gae`
       with values 0 and lam 1);
    3. advantages = the returns whitened over all response tokens of the batch (masked_whiten, unbiased).
    (Hu 2025, arXiv 2501.03262, sec. 3; OpenRLHF `reinforce_baseline` + get_cumulative_returns.)
    With token_rewards=None and gamma=1 every token of a row carries the row's centred score, so this
    weights samples by length; `reinforce_pp_advantages` weights each sample once.
    Rows with no response token (or invalid) are 0.
    """
    if mask.dim() != 2 or mask.shape[0] != scores.shape[0]:
        raise ValueError(f"mask must be [B, T] with B = len(scores) = {scores.shape[0]}, got {tuple(mask.shape)}")
    if token_rewards is not None:
        check_same_shape("token_rewards", token_rewards, "mask", mask)
    s, keep = _check_group_inputs(scores, group_size, valid)
    s = _shift_by_first_valid(s, keep)
    mean, count = _group_mean(s, keep)
    used = (keep & (count >= 2)).reshape(-1)
    centered = torch.where(used, (s - mean).reshape(-1), torch.zeros((), dtype=s.dtype, device=s.device))

    tok_mask = as_bool_mask(mask) & used[:, None]
    length = mask.shape[1]
    positions = torch.arange(length, device=mask.device).expand_as(tok_mask)
    last = torch.where(tok_mask, positions, torch.full_like(positions, -1)).max(dim=1, keepdim=True).values
    rewards = torch.zeros(tok_mask.shape, dtype=torch.float64, device=mask.device)
    rewards = torch.where((positions == last) & tok_mask, centered[:, None], rewards)
    if token_rewards is not None:
        if not bool(torch.isfinite(token_rewards.detach()[tok_mask]).all()):
            raise ValueError("token_rewards contain NaN/inf on response tokens of valid samples")
        rewards = rewards + torch.where(tok_mask, token_rewards.detach().to(torch.float64), 0.0)
    _, returns = gae(rewards, torch.zeros_like(rewards), tok_mask, gamma=gamma, lam=1.0)
    advantages = masked_whiten(returns, tok_mask, shift_mean=True, eps=eps)
    out = _out_dtype(scores) if token_rewards is None else torch.promote_types(_out_dtype(scores), token_rewards.dtype)
    return advantages.to(out), returns.to(out)


def grpo_advantages(scores: torch.Tensor, group_size: int, *, valid: torch.Tensor | None = None) -> torch.Tensor:
    """GRPO: `group_advantages(..., scale="group", eps=1e-6)`. scores: [B] -> [B]."""
    return group_advantages(scores, group_size, scale="group", valid=valid)


def dr_grpo_advantages(scores: torch.Tensor, group_size: int, *, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Dr. GRPO: `group_advantages(..., scale="none")`, no std division (arXiv 2503.20783). scores: [B] -> [B]."""
    return group_advantages(scores, group_size, scale="none", valid=valid)


def token_level(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Mark `fn` as a token-level advantage estimator (usable as a decorator):
    fn(scores [B], group_size, *, mask [B, T], valid=None) -> advantages [B, T]."""
    fn.token_level = True  # type: ignore[attr-defined]
    return fn


def is_token_level(fn: Callable[..., torch.Tensor]) -> bool:
    """Whether estimator `fn` returns [B, T] advantages and takes `mask=` (see `token_level`)."""
    return bool(getattr(fn, "token_level", False))


@token_level
def reinforce_pp_token_estimator(
    scores: torch.Tensor,
    group_size: int,
    *,
    mask: torch.Tensor,
    valid: torch.Tensor | None = None,
    token_rewards: torch.Tensor | None = None,
    gamma: float = 1.0,
) -> torch.Tensor:
    """REINFORCE++(-baseline) in its token-level form, the registered `reinforce_pp` estimator.

    scores: [B] (prompt-major), mask: [B, T], valid: optional [B] bool, token_rewards: optional [B, T]
    -> advantages [B, T] (0 on padding).
    Token rewards r_t (the group-centred score on the last response token, plus `token_rewards`), returns
    G_t = sum_{k >= t} gamma^(k - t) r_k over the row's response tokens, then G whitened over all valid
    response tokens of the batch (Hu 2025, arXiv 2501.03262, sec. 3; verl compute_reinforce_plus_plus_*;
    OpenRLHF get_cumulative_returns + token whitening). `reinforce_pp_token_advantages` with returns dropped.
    """
    advantages, _ = reinforce_pp_token_advantages(scores, mask, group_size, token_rewards=token_rewards,
                                                  gamma=gamma, valid=valid)
    return advantages


# name -> estimator (outcome level: [B]; token level, `is_token_level`: [B, T]); align.registry wraps it.
# `reinforce_pp` is the token-level form since 0.2.0; the per-sample form stays as `reinforce_pp_seq`.
ADVANTAGE_ESTIMATORS: dict[str, Callable[..., torch.Tensor]] = {
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
    "reinforce_pp": reinforce_pp_token_estimator,
    "reinforce_pp_seq": reinforce_pp_advantages,
}
