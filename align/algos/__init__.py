"""Pure RL math over tensors (imports only torch). Shapes are in each function's docstring.

Batches are prompt-major (the G samples of one prompt are contiguous); `mask` marks response tokens (1)
and padding (0). See DESIGN.md "Public contracts".
"""
from align.algos.advantages import (
    ADVANTAGE_ESTIMATORS,
    dr_grpo_advantages,
    gae,
    group_advantages,
    grpo_advantages,
    is_token_level,
    reinforce_pp_advantages,
    reinforce_pp_token_advantages,
    reinforce_pp_token_estimator,
    rloo_advantages,
    token_level,
)
from align.algos.corrections import (
    CORRECTION_MODES,
    rollout_correction,
    rollout_log_ratio,
    seq_mis_weights,
    token_tis_weights,
)
from align.algos.groups import nonzero_variance_groups
from align.algos.gspo import gspo_policy_loss, sequence_log_ratio
from align.algos.kl import KL_KINDS, AdaptiveKLController, FixedKLController, kl_penalty
from align.algos.losses import AGG_MODES, aggregate, policy_loss, value_loss
from align.algos.masked import masked_mean, masked_sum, masked_var, masked_whiten
from align.algos.positions import position_ids_from_mask
from align.algos.schedule import LR_SCHEDULES, lambda_lr, lr_multiplier
from align.algos.shaping import overlong_penalty, shaped_token_rewards

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGG_MODES",
    "CORRECTION_MODES",
    "KL_KINDS",
    "LR_SCHEDULES",
    "AdaptiveKLController",
    "FixedKLController",
    "aggregate",
    "dr_grpo_advantages",
    "gae",
    "group_advantages",
    "gspo_policy_loss",
    "grpo_advantages",
    "is_token_level",
    "kl_penalty",
    "lambda_lr",
    "lr_multiplier",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "nonzero_variance_groups",
    "overlong_penalty",
    "policy_loss",
    "position_ids_from_mask",
    "reinforce_pp_advantages",
    "reinforce_pp_token_advantages",
    "reinforce_pp_token_estimator",
    "rloo_advantages",
    "rollout_correction",
    "rollout_log_ratio",
    "seq_mis_weights",
    "sequence_log_ratio",
    "shaped_token_rewards",
    "token_tis_weights",
    "token_level",
    "value_loss",
]
