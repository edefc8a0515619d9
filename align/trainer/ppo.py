"""PPO's pieces: per-token rewards (KL in reward, curiosity), GAE advantages, and the actor-critic loss."""
from __future__ import annotations

import torch

from align import algos
from align.config import PPOAlgoConfig
from align.trainer.forward import ForwardOutput
from align.trainer.state import StepData


class PPOAlgorithm:
    name = "ppo"
    group_size = 1
    uses_critic = True

    def __init__(self, cfg: PPOAlgoConfig):
        self.cfg = cfg
        self.kl_ctl = (algos.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target
                       else algos.FixedKLController(cfg.kl_coef))

    @property
    def needs_reference(self) -> bool:
        return self.cfg.kl_coef > 0

    @property
    def entropy_coef(self) -> float:
        return self.cfg.entropy_coef

    def shaped_rewards(self, step: StepData, intrinsic: torch.Tensor | None = None, eta: float = 0.0,
                       score_clip: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """token_rewards [N, T]: -kl_coef * kl_t (when KL is in the reward) + eta * intrinsic_t, plus the
        (clipped) sequence score on each row's last response token (`algos.shaped_token_rewards`)."""
        mask = step.mask.bool()
        metrics: dict[str, float] = {}
        kl = None
        if step.ref_logprobs is not None:
            kl = algos.kl_penalty(step.old_logprobs, step.ref_logprobs, self.cfg.kl_estimator)
            kl = torch.where(mask, kl, torch.zeros_like(kl))
            metrics["kl/mean_seq"] = float(kl.sum(-1).mean())
        clip = self.cfg.score_clip if self.cfg.score_clip is not None else score_clip
        rewards = algos.shaped_token_rewards(step.scores, mask, kl=kl if self.cfg.kl_in == "reward" else None,
                                             kl_coef=self.kl_ctl.value, intrinsic=intrinsic, eta=eta, score_clip=clip)
        return rewards.float(), metrics

    def compute_advantages(self, step: StepData) -> dict[str, float]:
        mask = step.mask
        adv, returns = algos.gae(step.token_rewards, step.values, mask, self.cfg.gamma, self.cfg.lam)
        rows = step.train_rows
        if self.cfg.whiten_advantages and rows.numel():
            adv_rows = algos.masked_whiten(adv[rows], mask[rows])
            adv = adv.clone()
            adv[rows] = adv_rows.to(adv.dtype)
        step.advantages, step.returns = adv, returns
        return {"advantages/mean": float(algos.masked_mean(adv[rows], mask[rows])) if rows.numel() else 0.0,
                "returns/mean": float(algos.masked_mean(returns[rows], mask[rows])) if rows.numel() else 0.0}

    def after_step(self, kl_per_seq: float, n_samples: int) -> None:
        self.kl_ctl.update(kl_per_seq, n_samples)

    def loss(self, fwd: ForwardOutput, step: StepData, rows: torch.Tensor, old_logprobs: torch.Tensor,
             denom: float, vf_denom: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.cfg
        mask = step.mask[rows]
        pg, metrics = algos.policy_loss(fwd.logprobs, old_logprobs, step.advantages[rows], mask, cfg.clip_low,
                                        cfg.clip_high, cfg.dual_clip, cfg.loss_agg, global_denom=denom)
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
            kl_loss = algos.aggregate(kl, mask, cfg.loss_agg, global_denom=denom)
            total = total + self.kl_ctl.value * kl_loss
            metrics["loss/kl"] = kl_loss.detach()
        if cfg.entropy_coef and fwd.entropy is not None:
            ent = algos.aggregate(fwd.entropy, mask, cfg.loss_agg, global_denom=denom)
            total = total - cfg.entropy_coef * ent
        return total, metrics

    def state_dict(self) -> dict:
        return {"kl_ctl": self.kl_ctl.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.kl_ctl.load_state_dict(state["kl_ctl"])
