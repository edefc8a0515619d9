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
        return self.batch.mask
