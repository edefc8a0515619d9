"""Everything in one process: the rollout engine shares the trainer's model, so sync is free."""
from __future__ import annotations

from typing import Any

import torch

from align.rewards.base import RewardFunction, RewardOutput
from align.rollouts.batch import RolloutBatch
from align.rollouts.engine import RolloutEngine
from align.rollouts.params import SamplingParams


def score_batch(reward: RewardFunction, batch: RolloutBatch) -> RewardOutput:
    """Dataset columns, completion_ids and stop_reason reach the reward as keyword arguments."""
    return reward.score(batch.prompts, batch.completions, **batch.reward_columns())


class LocalBackend:
    def __init__(self, engine: RolloutEngine, reward: RewardFunction):
        self.engine = engine
        self.reward = reward
        self.version = 0

    def generate(self, prompts: list[str], columns: dict[str, list[Any]], sample_ids: torch.Tensor,
                 params: SamplingParams) -> RolloutBatch:
        batch = self.engine.generate(prompts, params, sample_ids=sample_ids, columns=columns)
        batch.weights_version = self.version
        return batch

    def score(self, batch: RolloutBatch) -> RewardOutput:
        return score_batch(self.reward, batch)

    def sync(self, version: int) -> None:
        self.version = version  # same model object: nothing to copy

    def close(self) -> None:
        self.reward.close()
