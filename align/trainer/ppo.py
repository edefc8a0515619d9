"""PPO's pieces: per-token rewards (KL in reward, curiosity), GAE advantages, and the actor-critic loss."""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from align import algos
from align.config import PPOAlgoConfig
from align.distributed.batches import global_mean, reduce_sum_fn
from align.trainer.algorithm import Algorithm
from align.trainer.forward import ForwardOutput
from align.trainer.state import StepData


class PPOAlgorithm(Algorithm):
    name = "ppo"
    group_size = 1
    uses_critic = True
    accepts_token_rewards = True

    def __init__(self, cfg: PPOAlgoConfig):
        super().__init__(cfg)
        self.kl_ctl = (algos.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target
                       else algos.FixedKLController(cfg.kl_coef))

    def shape_rewards(self, step: StepData, curiosity: Any = None,
                      action_embeddings: nn.Module | None = None) -> dict[str, float]:
        """step.token_rewards [N, T]: KL penalty, the CD-RLHF intrinsic bonus (the ICM's reward as it is before
        this step, then one ICM update on the same batch, as the released code), the score on the last token,
        plus any token rewards the reward functions returned."""
        metrics: dict[str, float] = {}
        intrinsic, eta = None, 0.0
        if curiosity is not None:
            actions = action_embeddings(step.batch.response_ids).detach()
            out = curiosity.compute(step.ref_hidden, actions, step.mask, step.batch.topk_hit)
            intrinsic, eta = out.intrinsic, curiosity.eta
            metrics |= out.metrics
            metrics |= curiosity.update(step.ref_hidden, actions, step.mask)
        if step.old_logprobs is None:
            step.old_logprobs = step.batch.logprobs  # only reached when KL is off; used for nothing else
        step.token_rewards, m = self.shaped_rewards(step, intrinsic, eta)
        if step.reward_token_rewards is not None:  # e.g. process rewards from a RewardFunction
            step.token_rewards = step.token_rewards + step.reward_token_rewards
        metrics |= m
        metrics["kl/coef"] = self.kl_ctl.value
        return metrics

    def shaped_rewards(self, step: StepData, intrinsic: torch.Tensor | None = None,
                       eta: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
        """token_rewards [N, T]: -kl_coef * kl_t (when KL is in the reward) + eta * intrinsic_t, plus the
        sequence score on each row's last response token (`algos.shaped_token_rewards`; the score was
        already clipped by `reward.clip` when set)."""
        mask = step.mask.bool()
        metrics: dict[str, float] = {}
        kl = None
        if step.ref_logprobs is not None:
            kl = algos.kl_penalty(step.old_logprobs, step.ref_logprobs, self.cfg.kl_estimator)
            kl = torch.where(mask, kl, torch.zeros_like(kl))
            metrics["kl/mean_seq"] = global_mean(self.dist, kl.sum(-1))
        rewards = algos.shaped_token_rewards(step.scores, mask, kl=kl if self.cfg.kl_in == "reward" else None,
                                             kl_coef=self.kl_ctl.value, intrinsic=intrinsic, eta=eta)
        return rewards.float(), metrics

    def compute_advantages(self, step: StepData) -> dict[str, float]:
        mask = step.mask
        adv, returns = algos.gae(step.token_rewards, step.values, mask, self.cfg.gamma, self.cfg.lam)
        rows = step.train_rows
        # several ranks: statistics over every rank's rows (each joins the reduction, with or without rows)
        reduce, anywhere = reduce_sum_fn(self.dist), rows.numel() or self.dist.enabled
        if self.cfg.whiten_advantages and anywhere:
            adv_rows = algos.masked_whiten(adv[rows], mask[rows], reduce=reduce)
            adv = adv.clone()
            adv[rows] = adv_rows.to(adv.dtype)
        step.advantages, step.returns = adv, returns
        return {"advantages/mean": float(algos.masked_mean(adv[rows], mask[rows], reduce=reduce)) if anywhere else 0.0,
                "returns/mean": float(algos.masked_mean(returns[rows], mask[rows], reduce=reduce)) if anywhere else 0.0}

    def after_step(self, kl_per_seq: float, n_samples: int) -> None:
        self.kl_ctl.update(kl_per_seq, n_samples)

    def loss(self, fwd: ForwardOutput, step: StepData, rows: torch.Tensor, old_logprobs: torch.Tensor,
             denom: float, vf_denom: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.cfg
        mask = step.mask[rows]
        weights = step.rollout_weights[rows] if step.rollout_weights is not None else None
        pg, metrics = self.surrogate(fwd.logprobs, old_logprobs, step.advantages[rows], mask, cfg.clip_low,
                                     cfg.clip_high, cfg.dual_clip, cfg.loss_agg, self.norm_length,
                                     global_denom=denom, weights=weights)
        total = pg
        metrics = {f"policy/{k}": v for k, v in metrics.items()}
        metrics["loss/policy"] = pg.detach()
        if fwd.values is not None:
            vf, vm = algos.value_loss(fwd.values, step.values[rows], step.returns[rows], mask, cfg.value_clip,
                                      "token-mean", global_denom=vf_denom)
            total = total + cfg.vf_coef * vf
            metrics["loss/value"] = vf.detach()
            metrics.update({f"value/{k}": v for k, v in vm.items()})
        if cfg.kl_in == "loss" and step.ref_logprobs is not None:
            kl = algos.kl_penalty(fwd.logprobs, step.ref_logprobs[rows], cfg.kl_estimator)
            kl_loss = algos.aggregate(kl, mask, cfg.loss_agg, self.norm_length, global_denom=denom)
            total = total + self.kl_ctl.value * kl_loss
            metrics["loss/kl"] = kl_loss.detach()
        if cfg.entropy_coef and fwd.entropy is not None:
            ent = algos.aggregate(fwd.entropy, mask, cfg.loss_agg, self.norm_length, global_denom=denom)
            total = total - cfg.entropy_coef * ent
        return total, metrics

    def state_dict(self) -> dict:
        return {"kl_ctl": self.kl_ctl.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        if self.cfg.kl_target is None and self.kl_ctl.value != self.cfg.kl_coef:
            # a fixed coefficient is configuration, not learned state: a resume with another algo.kl_coef uses it
            warnings.warn(f"resume: algo.kl_coef is {self.cfg.kl_coef:g}, the checkpoint's run used "
                          f"{self.kl_ctl.value:g}; the configured value applies from here", UserWarning, stacklevel=2)
            self.kl_ctl = algos.FixedKLController(self.cfg.kl_coef)
