"""The rollout half of a training step: generate, score, refill (DAPO's dynamic sampling).

A mixin of `align.trainer.loop.Trainer`: the methods read the trainer's set-up (config, backend, sampler, algorithm)
and fill a `StepData`; the loop calls them as named phases.
"""
from __future__ import annotations

import math

import torch

from align import algos
from align.data import columns_of
from align.distributed.batches import local_share
from align.distributed.fsdp import gathered, gathered_if_scoring_uses
from align.errors import UserError
from align.rewards.trl_kwargs import PROMPT_MESSAGES, TRAINER_STATE, RewardTrainerState
from align.rollouts.batch import RolloutBatch
from align.trainer.reporting import reward_function_metrics
from align.trainer.reward_metrics import sandbox_tier_counts
from align.trainer.state import StepData
from align.trainer.tool_episodes import tool_token_metrics


class RolloutPhases:
    def phase_generate(self) -> tuple[StepData, dict[str, float]]:
        """Draw prompts, expand each G times (prompt-major), sample one response per row."""
        g = self.algo.group_size
        # every rank draws the same global prompts (the data cursor is global) and keeps its share of whole groups
        records, first = local_share(self.dist, self.sampler.next(self.cfg.train.prompts_per_step))
        prompts = [self.dataset.prompt_text(r) for r in records for _ in range(g)]
        columns = {k: [v for v in vals for _ in range(g)] for k, vals in columns_of(records, self.cfg.data.prompt_key).items()}
        raw = [r[self.cfg.data.prompt_key] for r in records]
        if any(isinstance(m, list) for m in raw):  # conversations: TRL-style rewards get the message lists back
            columns[PROMPT_MESSAGES] = [m if isinstance(m, list) else None for m in raw for _ in range(g)]
        # Per-sample random streams keyed by a global sample index: sharding never changes what is drawn.
        sample_ids = torch.arange(self.samples_seen + first * g, self.samples_seen + first * g + len(prompts))
        self.samples_seen += len(prompts) * self.dist.world_size
        with gathered(self.models.policy):  # sharded weights: whole layers for decoding (no per-token collectives)
            batch = self.backend.generate(prompts, columns, sample_ids, self.params).to(self.device)
        if batch.stop_reason is None or batch.stop_reason.shape != (len(prompts),):
            raise RuntimeError("the rollout backend returned a batch without a stop reason for every row")
        lengths = batch.mask.sum(-1).float()
        return StepData(batch=batch), {"rollout/response_length": float(lengths.mean()),
                                       "rollout/tokens": float(lengths.sum()),
                                       "rollout/truncated": float(batch.truncated.float().mean()),
                                       **tool_token_metrics(batch)}

    def phase_score(self, step: StepData) -> dict[str, float]:
        """Reward every sample; errored or non-applicable samples are excluded, never scored 0."""
        n = len(step.batch)
        step.batch.columns[TRAINER_STATE] = [self._reward_trainer_state()] * n  # TRL's trainer_state keyword
        with gathered_if_scoring_uses(self.models.policy, self.reward):  # a reward may run the (sharded) policy
            out = self.backend.score(step.batch)
        if len(out.scores) != n:
            raise RuntimeError(f"the reward returned {len(out.scores)} scores for {n} samples")
        scores = torch.tensor([s if s is not None else 0.0 for s in out.scores], dtype=torch.float32, device=self.device)
        for i in (~torch.isfinite(scores)).nonzero().flatten().tolist():  # RewardOutput refuses these already;
            out.errors[i] = out.errors[i] or f"score {out.scores[i]!r} is not finite in float32"  # a backend
            out.scores[i] = None  # that bypassed it still gets a per-sample error, never an inf in the update
        valid = torch.tensor([s is not None for s in out.scores], device=self.device)
        if not bool(valid.any()):
            first = next((e for e in out.errors if e), "every reward returned None (not applicable)")
            raise RuntimeError(f"no sample of this step could be scored ({n} samples); first error: {first}")
        step.scores = torch.where(valid, scores, torch.zeros_like(scores))
        step.valid = valid
        overlong = self._overlong_penalty(step)
        step.train_rows = valid.nonzero().squeeze(-1)
        step.reward_info = out.info
        if out.token_rewards is not None:
            step.reward_token_rewards = self._token_reward_tensor(out.token_rewards, step.batch.mask)
        good = self.dist.all_gather_rows(step.scores)[self.dist.all_gather_rows(valid.to(torch.uint8)).bool()]
        return {**out.metrics, "reward/mean": float(good.mean()), "reward/std": float(good.std()) if good.numel() > 1 else 0.0,
                "reward/max": float(good.max()), "reward/min": float(good.min()),
                "reward/errors": float(sum(e is not None for e in out.errors)),
                "reward/not_applicable": float(sum(s is None and e is None for s, e in zip(out.scores, out.errors))),
                **sandbox_tier_counts(out.info), **reward_function_metrics(out.info), **overlong}

    def _reward_trainer_state(self) -> RewardTrainerState:
        """TRL TrainerState's fields for reward shaping, with TRL's meaning at scoring time: optimizer steps done
        so far, and the fractional epochs they make (steps x prompts_per_step / number of prompts; a streamed
        dataset has no length, so there epoch / num_train_epochs stay 0)."""
        per_step = self.cfg.train.prompts_per_step
        try:
            n = len(self.dataset)
        except TypeError:
            return RewardTrainerState(global_step=self.step, max_steps=self.cfg.train.steps)
        return RewardTrainerState(global_step=self.step, max_steps=self.cfg.train.steps,
                                  epoch=self.step * per_step / n,
                                  num_train_epochs=math.ceil(self.cfg.train.steps * per_step / n))

    def _overlong_penalty(self, step: StepData) -> dict[str, float]:
        """reward.overlong_buffer: DAPO's soft over-long punishment added to the valid samples' scores."""
        ob = self.cfg.reward.overlong_buffer
        if not ob.enable:
            return {}
        # the length budget counts every response token, tool observations included (as rollout.max_new_tokens)
        penalty = algos.overlong_penalty(step.batch.mask.sum(-1), self.params.max_new_tokens, ob.len, ob.penalty_factor)
        penalty = torch.where(step.valid, penalty.to(step.scores.dtype), torch.zeros_like(step.scores))
        step.scores = step.scores + penalty
        return {"reward/overlong_penalty": float(penalty[step.valid].mean())}

    def _token_reward_tensor(self, rows: list[list[float]], mask: torch.Tensor) -> torch.Tensor:
        """[N, T] from per-response-token lists (one value per response token of each sample)."""
        if not self.algo.accepts_token_rewards:
            raise UserError("a reward returned token-level rewards, which need per-token values: use algorithm: ppo "
                            "(GRPO uses one score per sample)")
        out = torch.zeros(mask.shape, dtype=torch.float32, device=self.device)
        lengths = mask.sum(-1).tolist()
        for i, row in enumerate(rows):
            if len(row) != lengths[i]:
                raise RuntimeError(f"sample {i}: {len(row)} token rewards for {int(lengths[i])} response tokens")
            out[i, :len(row)] = torch.tensor(row, dtype=torch.float32)
        return out

    def phase_refill(self, step: StepData) -> tuple[StepData, dict[str, float]]:
        """The algorithm's `select_groups` picks the groups worth training on; while fewer than
        train.prompts_per_step are picked and rounds are left (`sampling_rounds`), generate and score the next
        prompts' groups. The step keeps exactly prompts_per_step picked groups (in generation order; surplus
        dropped). Short: what was picked, flagged in rollout/dynamic_short; none picked: the first round's batch,
        whose groups the algorithm's advantages phase drops (the update is skipped)."""
        want, g = self.cfg.train.prompts_per_step, self.algo.group_size
        parts = [(step, self.algo.select_groups(step))]
        picked = int(parts[0][1].sum())
        while picked < want and len(parts) < self.algo.sampling_rounds:
            more, _ = self.phase_generate()
            self.phase_score(more)
            keep = self.algo.select_groups(more)
            parts.append((more, keep))
            picked += int(keep.sum())
        generated = sum(int(k.numel()) for _, k in parts)
        chosen: list[tuple[StepData, torch.Tensor]] = []
        left = want
        for part, keep in parts:
            groups = keep.nonzero().flatten()[:left]
            left -= int(groups.numel())
            if groups.numel():
                rows = (groups[:, None] * g + torch.arange(g, device=groups.device)).flatten()
                chosen.append((part, rows))
        kept = want - left
        metrics = {"rollout/dynamic_rounds": float(len(parts)), "rollout/dynamic_groups_kept": float(kept),
                   "rollout/dynamic_groups_dropped": float(generated - kept),  # zero-variance + surplus
                   "rollout/dynamic_groups_zero_variance": float(generated - picked),
                   "rollout/dynamic_short": float(kept < want), "rollout/dynamic_groups_missing": float(want - kept)}
        if not chosen:
            return step, metrics
        return self._join_rows(chosen), metrics

    def _join_rows(self, chosen: list[tuple[StepData, torch.Tensor]]) -> StepData:
        """One scored StepData from rows of several scored ones (batches re-padded to a common width)."""
        pad = self.engine.pad_id
        batch = RolloutBatch.concat([part.batch.select(rows.cpu()) for part, rows in chosen], pad_token_id=pad)
        out = StepData(batch=batch.to(self.device))
        out.scores = torch.cat([part.scores[rows] for part, rows in chosen])
        out.valid = torch.cat([part.valid[rows] for part, rows in chosen])
        out.train_rows = out.valid.nonzero().squeeze(-1)
        out.reward_info = [part.reward_info[i] for part, rows in chosen if part.reward_info for i in rows.tolist()]
        if all(part.reward_token_rewards is not None for part, _ in chosen):
            width = out.mask.shape[1]
            out.reward_token_rewards = torch.cat([torch.nn.functional.pad(part.reward_token_rewards[rows],
                                                                          (0, width - part.mask.shape[1]))
                                                  for part, rows in chosen])
        return out

