"""What the training loop asks of an algorithm, with no-op defaults; the registry of algorithms by config.

The loop (`align.trainer.loop`) never branches on which algorithm runs: everything that differs between PPO
and GRPO (reward shaping and curiosity updates, advantages, the loss, KL control) sits behind these hooks.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from align import algos
from align.distributed.context import DistContext
from align.trainer.forward import ForwardOutput
from align.trainer.state import StepData


class Algorithm(ABC):
    """Base of the per-algorithm pieces. Subclasses set `name` and implement `compute_advantages` and `loss`.

    uses_critic:           the loop computes critic values in the logprobs phase
    accepts_token_rewards: token-level rewards returned by reward functions can be used (per-token values)
    group_size:            samples per prompt (prompt-major batches)
    """

    name: str = ""
    group_size: int = 1
    uses_critic: bool = False
    accepts_token_rewards: bool = False
    dist: DistContext = DistContext()  # the trainer sets its rank context: batch statistics are global over ranks

    def __init__(self, cfg: Any):
        self.cfg = cfg
        # the clipped surrogate of the configured importance level (GSPO for "sequence"); same signature
        self.surrogate = algos.gspo_policy_loss if cfg.importance_level == "sequence" else algos.policy_loss

    @property
    def needs_reference(self) -> bool:
        return self.cfg.kl_coef > 0

    @property
    def norm_length(self) -> int | None:
        """Dr. GRPO's constant L for every seq-mean-token-sum-norm reduction of the loss (policy, KL, entropy):
        `algo.loss_norm_length` (a run config resolves it to rollout.max_new_tokens); None for other aggregations
        (and for a bare algo section with no L set, where `aggregate` falls back to the tensor width)."""
        return self.cfg.loss_norm_length if self.cfg.loss_agg == "seq-mean-token-sum-norm" else None

    def shape_rewards(self, step: StepData, curiosity: Any = None,
                      action_embeddings: nn.Module | None = None) -> dict[str, float]:
        """Hook of the advantages phase, before `compute_advantages`: per-token rewards and intrinsic-reward
        updates (PPO; `curiosity` is the CD-RLHF module or None, `action_embeddings` the policy's input
        embedding). Default: nothing (one score per sample is all the algorithm reads)."""
        return {}

    @property
    def sampling_rounds(self) -> int:
        """Generation rounds a step may use to fill its batch (the loop's refill phase). Default: 1."""
        return 1

    def select_groups(self, step: StepData) -> torch.Tensor | None:
        """Hook of the refill phase, after scoring: [B // G] bool, the prompt groups of `step` worth training on;
        the loop refills (up to `sampling_rounds` rounds) until train.prompts_per_step groups are selected.
        Default: None, the batch is complete as generated (no refill phase)."""
        return None

    @abstractmethod
    def compute_advantages(self, step: StepData) -> dict[str, float]:
        """Advantages (and returns) of `step` in place; -> metrics."""

    def after_step(self, kl_per_seq: float, n_samples: int) -> None:
        """Hook after the update phase (e.g. an adaptive KL controller). Default: nothing."""

    def loss(self, fwd: ForwardOutput, step: StepData, rows: torch.Tensor, old_logprobs: torch.Tensor,
             denom: float, vf_denom: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of micro-batch `rows` (global denominators `denom` / `vf_denom`); -> (loss, metrics)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Default: no state."""


def make_algorithm(cfg: Any) -> Algorithm:
    """The algorithm object for run config `cfg` (PPOConfig | GRPOConfig), chosen by `cfg.algorithm`."""
    from align.trainer.grpo import GRPOAlgorithm
    from align.trainer.ppo import PPOAlgorithm

    algorithms: dict[str, type[Algorithm]] = {PPOAlgorithm.name: PPOAlgorithm, GRPOAlgorithm.name: GRPOAlgorithm}
    return algorithms[cfg.algorithm](cfg.algo)
