"""Training on tool episodes: what the trainer reports about a batch whose responses hold tool observations.

A row of a tool episode interleaves policy segments (sampled) with observation segments (appended by a tool,
`RolloutBatch.tool_mask` 1). The loss side needs nothing here: `StepData.mask` is the loss mask (policy tokens
only) that every loss, statistic and advantage reads. This module only reports the split of the tokens.
"""
from __future__ import annotations

from align.rollouts.batch import RolloutBatch


def tool_token_metrics(batch: RolloutBatch) -> dict[str, float]:
    """rollout/policy_tokens and rollout/tool_tokens (totals over the batch), rollout/policy_length (mean
    policy tokens per row) and rollout/tool_rows (share of rows with an observation); {} without tools, so
    a tool-free run logs exactly what it logged before."""
    if batch.tool_mask is None:
        return {}
    present = batch.mask.bool()
    obs = batch.tool_mask.bool() & present
    policy = present & ~obs
    return {"rollout/policy_tokens": float(policy.sum()), "rollout/tool_tokens": float(obs.sum()),
            "rollout/policy_length": float(policy.sum(-1).float().mean()),
            "rollout/tool_rows": float(obs.any(-1).float().mean())}
