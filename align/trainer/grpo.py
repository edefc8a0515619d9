"""GRPO's pieces: group-relative advantages (GRPO / Dr. GRPO / RLOO / REINFORCE++; [B], or [B, T] from a
token-level estimator), zero-variance group filtering, and the clipped loss with an optional KL term in the loss
(Shao et al. 2024, arXiv 2402.03300)."""
from __future__ import annotations

import torch

from align import algos
from align.config import GRPOAlgoConfig
from align.distributed.batches import gather_padded, local_rows_of
from align.registry import ADVANTAGES
from align.trainer.algorithm import Algorithm
from align.trainer.forward import ForwardOutput
from align.trainer.state import StepData


class GRPOAlgorithm(Algorithm):
    name = "grpo"
    uses_critic = False

    def __init__(self, cfg: GRPOAlgoConfig):
        super().__init__(cfg)
        self.group_size = cfg.group_size

    @property
    def sampling_rounds(self) -> int:
        ds = self.cfg.dynamic_sampling
        return ds.max_rounds if ds.enable else 1

    def select_groups(self, step: StepData) -> torch.Tensor | None:
        """DAPO's dynamic sampling: the groups whose scores have non-zero variance (None when it is off)."""
        if not self.cfg.dynamic_sampling.enable:
            return None
        return algos.nonzero_variance_groups(step.scores, self.group_size, step.valid)

    def compute_advantages(self, step: StepData) -> dict[str, float]:
        """Advantages over the global batch: with several ranks every rank gathers the scores (and masks) of all
        ranks, computes what one process would (batch std, zero-variance counts) and keeps its own rows."""
        d, n, width = self.dist, len(step.scores), step.mask.shape[1]
        adv, keep, metrics = self._global_advantages(gather_padded(d, step.scores), gather_padded(d, step.valid),
                                                     gather_padded(d, step.mask))
        step.advantages = local_rows_of(d, adv, n, width)
        step.train_rows = local_rows_of(d, keep, n).nonzero().squeeze(-1)
        return metrics

    def _global_advantages(self, scores: torch.Tensor, valid: torch.Tensor,
                           mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        cfg, g = self.cfg, self.group_size
        if cfg.advantage == "grpo":
            adv = algos.group_advantages(scores, g, scale=cfg.scale, eps=cfg.adv_eps, valid=valid)
        else:
            estimator = ADVANTAGES.get(cfg.advantage)  # [B], or [B, T] for a token-level one (reinforce_pp)
            extra = {"mask": mask} if algos.is_token_level(estimator) else {}
            adv = estimator(scores, g, valid=valid, **extra)
        keep = valid.clone()
        metrics: dict[str, float] = {}
        # A group whose valid scores are all equal (or with < 2 valid samples) has zero advantages: no signal.
        flat = ~algos.nonzero_variance_groups(scores, g, valid)
        metrics["grpo/zero_variance_groups"] = float(flat.float().mean())
        # dynamic sampling selected non-zero-variance groups; a short step of none keeps the first round's
        # (all flat) batch, dropped here, so the update is skipped
        if cfg.filter_zero_variance or cfg.dynamic_sampling.enable:
            keep &= ~flat.repeat_interleave(g)
        if not keep.any():
            metrics["advantages/abs_mean"] = 0.0
        elif adv.dim() == 2:  # token-level: the mean over the response tokens of the kept rows
            metrics["advantages/abs_mean"] = float(algos.masked_mean(adv[keep].abs(), mask[keep]))
        else:
            metrics["advantages/abs_mean"] = float(adv[keep].abs().mean())
        return adv.float(), keep, metrics

    def loss(self, fwd: ForwardOutput, step: StepData, rows: torch.Tensor, old_logprobs: torch.Tensor,
             denom: float, vf_denom: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.cfg
        mask = step.mask[rows]
        weights = step.rollout_weights[rows] if step.rollout_weights is not None else None
        total, metrics = self.surrogate(fwd.logprobs, old_logprobs, step.advantages[rows], mask, cfg.clip_low,
                                        cfg.clip_high, cfg.dual_clip, cfg.loss_agg, self.norm_length,
                                        global_denom=denom, weights=weights)
        metrics = {f"policy/{k}": v for k, v in metrics.items()}
        metrics["loss/policy"] = total.detach()
        if cfg.kl_coef > 0:
            kl = algos.kl_penalty(fwd.logprobs, step.ref_logprobs[rows], cfg.kl_estimator)
            kl_loss = algos.aggregate(kl, mask, cfg.loss_agg, self.norm_length, global_denom=denom)
            total = total + cfg.kl_coef * kl_loss
            metrics["loss/kl"] = kl_loss.detach()
        if cfg.entropy_coef and fwd.entropy is not None:
            ent = algos.aggregate(fwd.entropy, mask, cfg.loss_agg, self.norm_length, global_denom=denom)
            total = total - cfg.entropy_coef * ent
        return total, metrics
