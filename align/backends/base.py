"""The small interface the training loop drives; a step's math never depends on where it ran."""
from __future__ import annotations

from typing import Any, Protocol

import torch

from align.rewards.base import RewardOutput
from align.rollouts.batch import RolloutBatch
from align.rollouts.params import SamplingParams


class Backend(Protocol):
    def generate(self, prompts: list[str], columns: dict[str, list[Any]], sample_ids: torch.Tensor,
                 params: SamplingParams) -> RolloutBatch:
        """Sample one response per prompt (prompts already expanded G times, prompt-major)."""

    def score(self, batch: RolloutBatch) -> RewardOutput:
        """Score every sample of `batch` (dataset columns and completion_ids reach the rewards as kwargs)."""

    def sync(self, version: int) -> None:
        """Make the rollout side sample with the trainer's current weights (tagged `version`)."""

    def close(self) -> None:
        ...
