"""What one training step carries between its phases."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from align.rollouts.batch import RolloutBatch


@dataclass
class StepData:
    """N samples of one step. Shapes: [N] per sample, [N, T] per response token.

    scores:        [N] mixed reward per sample (0 where invalid; never read there)
    valid:         [N] bool, the sample has a finite score (errored samples are excluded from the update)
    old_logprobs:  [N, T] log-probs of the policy that sampled (None: taken from the first update pass)
    ref_logprobs:  [N, T] reference policy log-probs (None when no KL term needs them)
    values:        [N, T] critic values (PPO)
    token_rewards: [N, T] per-token rewards after KL and intrinsic terms (PPO)
    advantages:    [N] (GRPO family) or [N, T] (PPO, token-level estimators such as reinforce_pp)
    returns:       [N, T] value targets (PPO)
    ref_hidden:    [N, T + 1, H] reference last-layer states (CD-RLHF curiosity)
    rollout_weights: [N, T] rollout importance-sampling weights (algo.rollout_correction; None when off)
    train_rows:    indices of the samples that enter the update
    """

    batch: RolloutBatch
    scores: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    token_rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    ref_hidden: torch.Tensor | None = None
    reward_token_rewards: torch.Tensor | None = None  # [N, T] token-level rewards returned by reward functions
    train_rows: torch.Tensor | None = None
    rollout_weights: torch.Tensor | None = None
    reward_info: list[dict] = field(default_factory=list)

    @property
    def mask(self) -> torch.Tensor:
        """[N, T] the loss mask: the response tokens the policy sampled. Tool-observation tokens (the batch's
        tool_mask) are 0 here, so the policy loss, entropy, KL, denominators, token-mean metrics, reward shaping
        and GAE (which bridges holes) never count them; the forward still attends to them (batch.attention_mask
        holds the full response mask). Without tools it is batch.mask itself. Computed once per batch."""
        b = self.batch
        tool_mask = getattr(b, "tool_mask", None)  # duck-typed batches (tests, plug-ins) may not have the field
        if tool_mask is None:
            return b.mask
        # a plain attribute, not a dataclass field: saved step states (align.trainer.async_rollouts) hold fields only
        cached = self.__dict__.get("_loss_mask_cache")  # (batch.mask, batch.tool_mask, loss mask)
        if cached is None or cached[0] is not b.mask or cached[1] is not tool_mask:
            cached = self.__dict__["_loss_mask_cache"] = (b.mask, tool_mask, loss_mask(b.mask, tool_mask))
        return cached[2]


def loss_mask(mask: torch.Tensor, tool_mask: torch.Tensor | None) -> torch.Tensor:
    """mask and not tool_mask, in mask's dtype (None: mask)."""
    if tool_mask is None:
        return mask
    return torch.where(tool_mask.bool(), torch.zeros_like(mask), mask)
