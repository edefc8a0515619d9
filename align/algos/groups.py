"""Which prompt groups carry a learning signal (DAPO's dynamic sampling, Yu et al. 2025, arXiv 2503.14476 eq. 11;
verl's `filter_groups`)."""
from __future__ import annotations

import torch


def nonzero_variance_groups(scores: torch.Tensor, group_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """[B // G] bool: the group's valid scores are not all equal (at least 2 valid samples, max > min).

    scores: [B] prompt-major (the G samples of a prompt contiguous); valid: [B] bool (None = all valid). A group
    of equal scores, or with fewer than 2 valid samples, has zero group-relative advantages: no signal.
    """
    if scores.dim() != 1 or scores.numel() % group_size:
        raise ValueError(f"scores must be [B] with B a multiple of group_size {group_size}, got {tuple(scores.shape)}")
    if valid is None:
        valid = torch.ones_like(scores, dtype=torch.bool)
    groups = valid.view(-1, group_size)
    s = torch.where(valid, scores, torch.zeros_like(scores)).view(-1, group_size)
    s_max = torch.where(groups, s, torch.full_like(s, -torch.inf)).max(-1).values
    s_min = torch.where(groups, s, torch.full_like(s, torch.inf)).min(-1).values
    return (groups.sum(-1) >= 2) & (s_max > s_min)
