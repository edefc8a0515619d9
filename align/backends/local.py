"""Everything in one process: the rollout engine shares the trainer's model, so sync is free."""
from __future__ import annotations

from typing import Any, Callable

import torch

from align.rewards.base import RewardFunction, RewardOutput
from align.rollouts.batch import RolloutBatch
from align.rollouts.engine import RolloutEngine
from align.rollouts.params import SamplingParams


def score_batch(reward: RewardFunction, batch: RolloutBatch) -> RewardOutput:
    """Dataset columns, completion_ids and stop_reason reach the reward as keyword arguments."""
    return reward.score(batch.prompts, batch.completions, **batch.reward_columns())


class LocalBackend:
    def __init__(self, engine: RolloutEngine, reward: RewardFunction, refresh: Callable[[], None] | None = None,
                 episodes=None):
        self.engine = engine
        self.episodes = episodes  # align.tool_env.EpisodeDriver: multi-turn tool episodes instead of one generate
        self.reward = reward
        self.version = 0
        # copies the trained weights into the engine's bf16 decode copy, if it has one (align.precision); run
        # before every generate, so resumed or updated weights always reach it (an in-place copy: ~ms)
        self.refresh = refresh

    def generate(self, prompts: list[str], columns: dict[str, list[Any]], sample_ids: torch.Tensor,
                 params: SamplingParams) -> RolloutBatch:
        if self.refresh is not None:
            self.refresh()
        if self.episodes is not None:
            batch = self.episodes(self.engine, prompts, params, sample_ids=sample_ids, columns=columns)
        else:
            batch = self.engine.generate(prompts, params, sample_ids=sample_ids, columns=columns)
        batch.weights_version = self.version
        return batch

    def score(self, batch: RolloutBatch) -> RewardOutput:
        return score_batch(self.reward, batch)

    def sync(self, version: int) -> None:
        self.version = version  # same model object: nothing to copy

    def close(self) -> None:
        if self.episodes is not None:
            self.episodes.close()
        self.reward.close()
