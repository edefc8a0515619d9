"""Reward shaping: per-token rewards for PPO (KL penalty, optional intrinsic bonus, the sequence score on the last
token) and DAPO's soft over-long punishment of sequence scores."""
from __future__ import annotations

import math

import torch

from align.algos.masked import as_bool_mask

__all__ = ["overlong_penalty", "shaped_token_rewards"]


def shaped_token_rewards(scores: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None = None, kl_coef: float = 0.0,
                         intrinsic: torch.Tensor | None = None, eta: float = 0.0,
                         score_clip: float | None = None) -> torch.Tensor:
    """token_rewards [B, T] from scores [B], mask [B, T], and optional kl / intrinsic [B, T].

    r_t = -kl_coef * kl_t + eta * intrinsic_t on response tokens, and the last response token of each row also
    gets clip(score, -score_clip, score_clip) (None: no clip). Padding is 0; a row with no response token gets
    no score. With eta == 0 or intrinsic None the intrinsic term is not computed at all, so the result is
    bitwise plain PPO. Sources: Ziegler et al. 2019 (arXiv 1909.08593) eq. 2; CD-RLHF (arXiv 2501.11463)
    eq. 7 and its released `compute_rewards` (DeepSpeed-Chat).
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got {tuple(mask.shape)}")
    if scores.dim() != 1 or scores.shape[0] != mask.shape[0]:
        raise ValueError(f"scores {tuple(scores.shape)} must be [B] with B = {mask.shape[0]}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores contain NaN/inf; drop or fix those samples before building token rewards")
    if eta < 0 or not math.isfinite(eta):
        raise ValueError(f"eta = {eta}: must be a finite number >= 0")
    keep = as_bool_mask(mask)
    dtype = scores.dtype if kl is None else torch.promote_types(scores.dtype, kl.dtype)
    if kl is not None:
        if tuple(kl.shape) != tuple(mask.shape):
            raise ValueError(f"kl {tuple(kl.shape)} must be [B, T] = {tuple(mask.shape)}")
        rewards = -kl_coef * kl.to(dtype)
    else:
        rewards = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    if intrinsic is not None and eta != 0.0:
        if tuple(intrinsic.shape) != tuple(mask.shape):
            raise ValueError(f"intrinsic {tuple(intrinsic.shape)} must be [B, T] = {tuple(mask.shape)}")
        rewards = rewards + eta * intrinsic.to(dtype)
    rewards = torch.where(keep, rewards, torch.zeros((), dtype=dtype, device=rewards.device))
    clipped = scores.to(dtype)
    if score_clip is not None:
        clipped = clipped.clamp(-score_clip, score_clip)
    positions = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
    last = torch.where(keep, positions, torch.full_like(positions, -1)).max(dim=1).values
    rows = torch.nonzero(last >= 0).squeeze(1)
    # index_put_ touches only the last positions: every other entry stays bitwise as computed above
    return rewards.index_put((rows, last[rows]), clipped[rows], accumulate=True)


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer_length: int,
                     penalty_factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft over-long punishment, added to each sequence's score: lengths [B] -> penalties [B].

    |y| = response length in tokens (the stop token included), L_max = max_length (rollout.max_new_tokens),
    L_cache = buffer_length, f = penalty_factor:
        0                                     |y| <= L_max - L_cache
        ((L_max - L_cache) - |y|) / L_cache * f    L_max - L_cache < |y| <= L_max
        -f                                    |y| > L_max   (cannot happen when responses are cut at L_max)
    Source: Yu et al. 2025, DAPO (arXiv 2503.14476) eq. 13 (there f = 1); the factor as verl's
    `overlong_buffer.penalty_factor` (recipe/dapo reward manager: min(-(|y| - (L_max - L_cache)) / L_cache * f, 0)).
    Float lengths keep their dtype; integer lengths give float32.
    """
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be [B], got {tuple(lengths.shape)}")
    if not 1 <= buffer_length <= max_length:
        raise ValueError(f"buffer_length = {buffer_length}: must be in [1, max_length = {max_length}]")
    if penalty_factor < 0 or not math.isfinite(penalty_factor):
        raise ValueError(f"penalty_factor = {penalty_factor}: must be a finite number >= 0")
    y = lengths if lengths.is_floating_point() else lengths.to(torch.float32)
    expected = max_length - buffer_length
    penalty = (expected - y) / buffer_length * penalty_factor
    return torch.clamp(penalty, min=-float(penalty_factor), max=0.0)  # the lower bound: |y| > L_max
