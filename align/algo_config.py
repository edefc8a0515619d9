"""The algorithm sections of a run config (`algo:` of PPO and GRPO runs): the clipped surrogate, its KL and
entropy terms, rollout corrections and DAPO's dynamic sampling. Validated like every section
(`align.config_schema`); `align.config` re-exports them."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Union

from align.config_schema import Section
from align.errors import ConfigError

LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
KLEstimator = Literal["k1", "k2", "k3", "abs", "low_var_kl"]


@dataclass
class RolloutCorrectionConfig(Section):
    """Importance-sampling corrections between the rollout engine's log-probs and the trainer's old log-probs
    (`align.algos.rollout_correction`; rho_t = exp(old_logp_t - rollout_logp_t)). The weights multiply the
    policy-gradient term only (not the KL or entropy terms); a masked sequence still counts in the loss
    denominators. Needs rollout.temperature 1 and rollout.use_rollout_logprobs false; costs one forward pass
    for the trainer's old log-probs."""

    # none | token_tis: w_t = min(rho_t, cap) | seq_mis: w_i = prod_t rho_t if it lies in [lo, hi], else 0 |
    # seq_mis_geo: w_i = 1 if exp(mean_t log rho_t) lies in [lo, hi], else 0
    mode: Literal["none", "token_tis", "seq_mis", "seq_mis_geo"] = "none"
    cap: Union[float, None] = None  # token_tis only; >= 1; null = 2.0
    lo: Union[float, None] = None  # seq_mis / seq_mis_geo only; in [0, 1]; null = 1 / hi
    hi: Union[float, None] = None  # seq_mis / seq_mis_geo only; >= 1; null = 3.0 (seq_mis, TRL's cap) or 1.001 (seq_mis_geo)

    def validate(self) -> None:
        if self.mode == "none":
            return
        if self.mode == "token_tis":
            for key in ("lo", "hi"):
                self.check(getattr(self, key) is None, key, "applies to the seq_mis modes; token_tis uses cap: drop it")
            if self.cap is not None:
                self.check(self.cap >= 1.0 and math.isfinite(self.cap), "cap",
                           "must be a finite number >= 1 (a cap below 1 down-weights tokens both engines agree on)")
            return
        self.check(self.cap is None, "cap", f"applies to mode token_tis; {self.mode} uses lo / hi: drop it")
        if self.hi is not None:
            self.check(self.hi >= 1.0 and math.isfinite(self.hi), "hi", "must be a finite number >= 1")
        if self.lo is not None:
            self.check(0.0 <= self.lo <= 1.0, "lo", "must be in [0, 1] (a sequence both engines agree on is kept)")

    def bounds(self) -> dict[str, float]:
        """The keyword arguments of `align.algos.rollout_correction` with the defaults filled in."""
        hi = self.hi if self.hi is not None else (1.001 if self.mode == "seq_mis_geo" else 3.0)
        return {"cap": self.cap if self.cap is not None else 2.0, "lo": self.lo if self.lo is not None else 1.0 / hi,
                "hi": hi}


@dataclass
class DynamicSamplingConfig(Section):
    """DAPO's dynamic sampling (arXiv 2503.14476 eq. 11; verl's `filter_groups` / `max_num_gen_batches`): each
    step keeps generating and scoring the next train.prompts_per_step prompts' groups, at most max_rounds
    rounds, until it has train.prompts_per_step groups whose scores are not all equal; it trains on exactly
    those (surplus groups are dropped). Short after max_rounds: trains on what it has (rollout/dynamic_short);
    none at all: the update is skipped (train/skipped). Zero-variance groups never enter the update."""

    enable: bool = False  # off by default
    max_rounds: int = 4  # generation rounds per step at most (1 = no refill, only the filter)

    def validate(self) -> None:
        self.check(self.max_rounds >= 1, "max_rounds", "must be >= 1 (generation rounds per step)")


@dataclass
class _PolicyOptimConfig(Section):
    """What PPO and GRPO share: the clipped surrogate, its aggregation, KL and entropy terms, epochs."""

    clip_low: float = 0.2
    clip_high: float = 0.2  # > clip_low = DAPO's clip-higher
    dual_clip: Union[float, None] = None
    entropy_coef: float = 0.0
    epochs: int = 1
    loss_agg: LossAgg = "token-mean"
    # rows that hit rollout.max_new_tokens (stop reason "length") get zero loss weight: they still count in the
    # advantage statistics (group mean / std, PPO whitening) but leave the update (TRL's mask_truncated_completions)
    mask_truncated_completions: bool = False
    # Dr. GRPO's constant L of seq-mean-token-sum-norm, sum(loss * mask) / (B * L), for the policy loss, the KL
    # term and the entropy bonus alike (TRL max_completion_length, verl loss_scale_factor); null =
    # rollout.max_new_tokens (resolved when the run config is built), never the step's padded width
    loss_norm_length: Union[int, None] = None
    # token: r_t = pi(y_t) / pi_old(y_t) (PPO / GRPO); sequence: GSPO's length-normalised sequence ratio
    # s_i = exp(mean_t log r_t), in its GSPO-token form (Zheng et al. 2025, arXiv 2507.18071). sequence clips
    # with clip_low / clip_high, which must then be far smaller (the paper: 3e-4 / 4e-4; < 0.1 is enforced)
    importance_level: Literal["token", "sequence"] = "token"
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)

    def validate(self) -> None:
        if self.loss_norm_length is not None:
            self.check(self.loss_norm_length > 0, "loss_norm_length",
                       "must be > 0 (tokens; null = rollout.max_new_tokens)")
        self.check(0.0 <= self.clip_low < 1.0, "clip_low", "must be in [0, 1)")
        self.check(self.clip_high >= 0.0, "clip_high", "must be >= 0")
        if self.dual_clip is not None:
            self.check(self.dual_clip > 1.0, "dual_clip", "must be > 1 (or null)")
        self.check(self.kl_coef >= 0.0, "kl_coef", "must be >= 0")
        self.check(self.epochs >= 1, "epochs", "must be >= 1")
        self._validate_importance_level()

    def _validate_importance_level(self) -> None:
        if self.importance_level != "sequence":
            return
        self.check(self.dual_clip is None, "dual_clip", "bounds token-level ratios; set it to null with "
                   "importance_level 'sequence' (GSPO)")
        for key in ("clip_low", "clip_high"):
            self.check(getattr(self, key) < 0.1, key, "importance_level 'sequence' (GSPO) clips a length-normalised "
                       "ratio that stays near 1: use far smaller ranges, e.g. the paper's clip_low 3e-4, clip_high 4e-4")


@dataclass
class PPOAlgoConfig(_PolicyOptimConfig):
    removed_keys: ClassVar[dict[str, str]] = {
        "score_clip": "set reward.clip instead (one clip of the mixed score for every algorithm)"}
    gamma: float = 1.0
    lam: float = 0.95
    value_clip: Union[float, None] = 0.2
    vf_coef: float = 0.1
    kl_coef: float = 0.05
    kl_target: Union[float, None] = None  # set to use the adaptive KL controller
    kl_horizon: int = 10000
    kl_in: Literal["reward", "loss"] = "reward"
    kl_estimator: KLEstimator = "k1"  # k3 is Schulman's unclamped k3; verl's "k3" is our low_var_kl (clamped)
    whiten_advantages: bool = True

    def validate(self) -> None:
        super().validate()
        self.check(0.0 <= self.gamma <= 1.0, "gamma", "must be in [0, 1]")
        self.check(0.0 <= self.lam <= 1.0, "lam", "must be in [0, 1]")
        self.check(self.vf_coef >= 0.0, "vf_coef", "must be >= 0")
        if self.kl_target is not None:
            self.check(self.kl_target > 0, "kl_target", "must be > 0 (or null for a fixed KL coefficient)")
            self.check(self.kl_coef > 0, "kl_coef", "the adaptive controller (kl_target) needs an initial kl_coef > 0")


@dataclass
class GRPOAlgoConfig(_PolicyOptimConfig):
    group_size: int = 4
    # a registered estimator: grpo, dr_grpo, rloo, reinforce_pp (token-level REINFORCE++, per-token whitening),
    # reinforce_pp_seq (the per-sample form, what reinforce_pp meant before 0.2.0), or a plug-in
    advantage: str = "grpo"
    scale: Literal["group", "batch", "none"] = "group"
    kl_coef: float = 0.0  # beta; 0 = no reference model pass
    kl_estimator: KLEstimator = "k3"  # k3 is Schulman's unclamped k3; verl's "k3" is our low_var_kl (clamped)
    filter_zero_variance: bool = False  # drop groups whose scores are all equal (they carry no signal)
    adv_eps: float = 1e-6  # GRPO's eps in (s - mean) / (std + eps), advantage 'grpo' only (TRL uses 1e-4)
    # DAPO's refill: generate more groups until prompts_per_step have non-zero score variance (bounded rounds)
    dynamic_sampling: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)

    def validate(self) -> None:
        super().validate()
        self.check(self.group_size >= 2, "group_size", "GRPO needs at least 2 samples per prompt (set algo.group_size >= 2)")
        self.check(self.scale == "group" or self.advantage == "grpo", "scale",
                   f"scale applies to advantage 'grpo' only ({self.advantage!r} has its own normalisation); drop it")
        self.check(self.adv_eps >= 0.0 and math.isfinite(self.adv_eps), "adv_eps", "must be a finite number >= 0")
        self.check(self.adv_eps == 1e-6 or self.advantage == "grpo", "adv_eps",
                   f"adv_eps applies to advantage 'grpo' only ({self.advantage!r} has no std + eps); drop it")
        from align.registry import ADVANTAGES, UnknownNameError

        try:
            ADVANTAGES.resolve(self.advantage)
        except UnknownNameError as err:
            raise ConfigError(f"advantage = {self.advantage!r}: {err}") from None
