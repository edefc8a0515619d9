"""Position ids from an attention mask: the one helper the trainer, the rollout engine and the reward models use."""
from __future__ import annotations

import torch

__all__ = ["position_ids_from_mask"]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[N, L] -> [N, L] int64: 0, 1, 2, ... over real tokens (left padding gets 0), as Hugging Face generate does.

    A row's positions depend only on its own tokens, so its logits and scores do not change with how much
    left padding the batch gave it. Any 0/1 mask dtype (bool, int, float) gives the same result.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
