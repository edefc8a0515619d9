"""The learning half of a training step: log-probs, advantages, the update.

A mixin of `align.trainer.loop.Trainer`. Micro-batches accumulate gradients with the minibatch's denominators, so
the result equals one pass over the whole minibatch; the RL math itself is in `align.algos` and the algorithm's hooks.
"""
from __future__ import annotations

import torch

from align import algos
from align.distributed.batches import (
    global_mean,
    global_ratio,
    global_sums,
    global_train_rows,
    missing_passes,
    owned_rows,
)
from align.distributed.fsdp import clip_grad_norm
from align.distributed.setup import idle_logprob_pass, zero_weight_pass
from align.trainer.forward import response_forward
from align.trainer.micro_batches import in_row_order, metric_weight, micro_batches
from align.trainer.packing import critic_values, maybe_packed
from align.trainer.state import StepData


class LearnPhases:
    @torch.no_grad()
    def phase_logprobs(self, step: StepData) -> dict[str, float]:
        """Old-policy log-probs (unless the rollout's are used or one update makes them free), reference
        log-probs when a KL term needs them, critic values (PPO), reference states (curiosity)."""
        b, mb, tc = step.batch, self.cfg.train.micro_batch_size, self.cfg.train
        n, t = b.response_ids.shape
        pack = tc.pack_sequences
        plan = micro_batches(torch.arange(n, device=b.input_ids.device), b.attention_mask, mb,
                             tc.max_tokens_per_micro_batch, pack)
        want_old = self._needs_old_logprobs() and not self.cfg.rollout.use_rollout_logprobs
        old, ref, values, hidden = [], [], [], []
        self.models.policy.eval()
        for rows in plan:
            ids, att = b.input_ids[rows], b.attention_mask[rows]
            if want_old or self.algo.uses_critic:
                fwd = response_forward(maybe_packed(self.models.policy, pack), ids, att, t,
                                       value_head=self.models.value_head, temperature=self.logprob_temperature)
                old.append(fwd.logprobs)
                values.append(fwd.values)
            if self.models.critic is not None:
                values[-1] = critic_values(self.models.critic, ids, att, t, pack)
            if self.algo.needs_reference or self.curiosity is not None:
                with self.models.reference_mode() as ref_model:
                    fwd = response_forward(maybe_packed(ref_model, pack), ids, att, t, return_hidden=self.curiosity is not None,
                                           temperature=self.logprob_temperature)
                ref.append(fwd.logprobs)
                hidden.append(fwd.hidden)
        for _ in range(missing_passes(self.dist, len(plan))):  # several ranks: FSDP's all-gathers line up
            idle_logprob_pass(self, step, want_old)
        self.models.policy.train()
        step.old_logprobs = in_row_order(old, plan) if want_old else (b.logprobs if self.cfg.rollout.use_rollout_logprobs else None)
        step.ref_logprobs = in_row_order(ref, plan) if ref else None
        step.values = in_row_order(values, plan) if self.algo.uses_critic else None
        step.ref_hidden = in_row_order(hidden, plan) if self.curiosity is not None else None
        metrics: dict[str, float] = {}
        if step.ref_logprobs is not None:
            base = step.old_logprobs if step.old_logprobs is not None else b.logprobs
            kl = torch.where(step.mask.bool(), base - step.ref_logprobs, torch.zeros_like(base))  # policy tokens
            metrics["kl/mean"] = global_ratio(self.dist, kl.sum(), step.mask.sum())
        if want_old and self.logprob_temperature == 1.0:  # rollout log-probs are at temperature 1
            diff = (step.old_logprobs - b.logprobs).abs()[step.mask.bool()]  # observations have no rollout log-prob
            metrics["rollout/logprob_diff_max"] = float(diff.max()) if diff.numel() else 0.0
        correction = self.cfg.algo.rollout_correction
        if correction.mode != "none":  # the config guarantees temperature 1 and trainer-computed old log-probs
            step.rollout_weights, m = algos.rollout_correction(step.old_logprobs, b.logprobs, step.mask, correction.mode,
                                                               **correction.bounds())
            metrics |= {f"rollout_corr/{k}": float(v) for k, v in m.items()}
        return metrics

    def _needs_old_logprobs(self) -> bool:
        # With a single optimizer step per batch the policy is unchanged when the loss runs, so the old
        # log-probs equal the current ones (detached): TRL skips the extra forward the same way. A rollout
        # correction compares them with the rollout's before the update, so it always computes them (TRL too).
        return (self._updates_per_step() > 1 or self.algo.uses_critic
                or self.cfg.algo.rollout_correction.mode != "none")

    def phase_advantages(self, step: StepData) -> dict[str, float]:
        """The algorithm's reward shaping hook (PPO: token rewards, curiosity update), then its advantages."""
        metrics = self.algo.shape_rewards(step, self.curiosity, self.models.policy.get_input_embeddings())
        metrics |= self.algo.compute_advantages(step)
        if self.cfg.algo.mask_truncated_completions:  # zero loss weight for rows that hit max_new_tokens
            step.train_rows = step.train_rows[~step.batch.truncated[step.train_rows]]
        metrics["train/samples"] = float(step.train_rows.numel())
        return metrics

    def phase_update(self, step: StepData) -> dict[str, float]:
        """Epochs of shuffled minibatches; micro-batches accumulate gradients with the minibatch's
        denominators, so the result equals one pass over the whole minibatch."""
        # several ranks: the global rows and minibatch order; each rank trains the rows of a minibatch it holds
        cfg, rows_all, n_local = self.cfg, global_train_rows(self.dist, step.train_rows, len(step.batch)), len(step.batch)
        sums: dict[str, float] = {}
        count = 0
        if rows_all.numel() == 0:
            return {"train/skipped": 1.0}
        for _ in range(cfg.algo.epochs):
            order = rows_all[torch.randperm(rows_all.numel(), generator=self.update_generator).to(rows_all.device)]
            for mini in order.split(self._mini_batch_size()):
                metrics = self._optimizer_step(step, owned_rows(self.dist, mini, n_local))
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
        self.algo.after_step(self._kl_per_seq(step), len(step.batch) * self.dist.world_size)
        out = {k: v / count for k, v in sums.items()}
        out["train/lr"] = self.scheduler.get_last_lr()[0]
        return out

    def _optimizer_step(self, step: StepData, mini: torch.Tensor) -> dict[str, float]:
        cfg = self.cfg
        mask = step.mask[mini]
        t = mask.shape[1]
        denom, vf_denom = global_sums(self.dist, self._denominator(mask), float(mask.sum()))  # global counts
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        pack = cfg.train.pack_sequences
        micros = [m for m in micro_batches(mini, step.batch.attention_mask, cfg.train.micro_batch_size,
                                           cfg.train.max_tokens_per_micro_batch, pack) if m.numel()]  # a rank may own no rows
        # several ranks: each runs as many forward/backward passes as the busiest (FSDP's collectives line up)
        extra = missing_passes(self.dist, len(micros))
        for micro in micros:
            b = step.batch
            fwd = response_forward(maybe_packed(self.models.policy, pack), b.input_ids[micro], b.attention_mask[micro], t,
                                   value_head=self.models.value_head, with_entropy=True,
                                   temperature=self.logprob_temperature)
            if self.models.critic is not None:
                fwd.values = critic_values(self.models.critic, b.input_ids[micro], b.attention_mask[micro], t, pack)
            old = step.old_logprobs[micro] if step.old_logprobs is not None else fwd.logprobs.detach()
            loss, metrics = self.algo.loss(fwd, step, micro, old, denom, vf_denom)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"step {self.step}: the loss is {float(loss)}; no optimizer step was taken")
            loss.backward()
            share = metric_weight(step.mask[micro], mask)  # token means: the micro-batch's share of the tokens
            metrics["policy/entropy"] = (fwd.entropy * step.mask[micro]).sum() / step.mask[micro].sum().clamp(min=1)
            for k, v in metrics.items():
                # loss/* already use the minibatch's denominators (partial sums); other metrics are means
                weight = 1.0 if k.startswith("loss/") else share
                if weight == 0.0:  # a micro-batch without response tokens has no token means (0 / 0)
                    continue
                sums[k] = sums.get(k, 0.0) + float(v.detach() if isinstance(v, torch.Tensor) else v) * weight
        for _ in range(extra):
            zero_weight_pass(self, step, t)
        params = self.models.trainable_parameters() + self.models.critic_parameters()
        grad_norm = clip_grad_norm(params, cfg.train.max_grad_norm, self.dist)  # over every rank's gradients
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"step {self.step}: non-finite gradient norm; no optimizer step was taken")
        self.optimizer.step()
        self.scheduler.step()
        sums["train/grad_norm"] = float(grad_norm)
        return sums

    def _denominator(self, mask: torch.Tensor) -> float:
        agg = self.cfg.algo.loss_agg
        if agg == "token-mean":
            return float(mask.sum())
        if agg == "seq-mean-token-mean":
            return float((mask.sum(-1) > 0).sum())
        return float(mask.shape[0])

    def _kl_per_seq(self, step: StepData) -> float:
        if step.ref_logprobs is None or step.old_logprobs is None:
            return 0.0
        kl = torch.where(step.mask.bool(), step.old_logprobs - step.ref_logprobs, torch.zeros_like(step.ref_logprobs))
        return global_mean(self.dist, kl.sum(-1))
