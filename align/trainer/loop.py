"""The training loop: one step in six named phases (DESIGN.md "Data flow of one training step").

generate -> score -> logprobs -> advantages -> update -> sync, with a refill phase after score when the
algorithm selects groups (`Algorithm.select_groups`, DAPO's dynamic sampling). PPO and GRPO share the loop, which never asks
which algorithm runs: what differs (reward shaping and curiosity updates, advantages, the loss) sits behind the
hooks of `align.trainer.algorithm.Algorithm` (`PPOAlgorithm`, `GRPOAlgorithm`). The RL math is in `align.algos`.
"""
from __future__ import annotations

import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from align import algos
from align import checkpoint as ckpt_io
from align.algos.schedule import lambda_lr
from align.config import as_config
from align.data import PromptDataset, columns_of, make_sampler, resolve_data_config
from align.errors import CheckpointError, UserError
from align.metrics import MetricsLogger
from align.models import hidden_size_of, load_models, needs_full_logits, resolve_device
from align.reward_setup import bind_policy, build_reward, check_reward_columns
from align.rewards.trl_kwargs import PROMPT_MESSAGES, TRAINER_STATE, RewardTrainerState
from align.rollouts.batch import RolloutBatch
from align.rollouts.engine import RolloutEngine
from align.rollouts.params import SamplingParams
from align.trainer.algorithm import make_algorithm
from align.trainer.forward import chunked, position_ids_from_mask, response_forward
from align.trainer.reporting import log_completions, reward_function_metrics
from align.trainer.reward_metrics import sandbox_tier_counts
from align.trainer.state import StepData


@dataclass
class TrainResult:
    metrics: dict[str, float]  # the last step's metrics
    history: list[dict[str, float]] = field(default_factory=list)  # one dict per step run in this call
    checkpoint: Path | None = None  # the final checkpoint, when saved
    run_dir: Path | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, config: Any, overrides: list[str] | None = None, resume_from: str | Path | None = None,
                 dataset: Any = None):
        self.cfg = cfg = resolve_data_config(as_config(config, overrides), dataset)
        # before anything is loaded or written: a new run never silently lands on an old one
        ckpt_io.prepare_run_dir(cfg.run_dir, bool(resume_from or cfg.checkpoint.resume_from), cfg.checkpoint.overwrite)
        seed_everything(cfg.train.seed)
        self.device = resolve_device(cfg.train.device)
        self.algo = make_algorithm(cfg)
        curiosity_cfg = cfg.reward.curiosity  # the config allows it only with algorithms that take token rewards
        self.curiosity_cfg = curiosity_cfg if curiosity_cfg is not None and curiosity_cfg.eta > 0 else None
        critic = cfg.model.critic if self.algo.uses_critic else None
        self.models = load_models(cfg.model, self.device, critic=critic,
                                  need_reference=self.algo.needs_reference or self.curiosity_cfg is not None)
        self.tokenizer = self.models.tokenizer
        self.reward = build_reward(cfg.reward)
        bind_policy(self.reward, self.models.policy, self.tokenizer,
                    disable_adapters=self.models.policy.disable_adapter if self.models.lora else None)
        self.dataset = PromptDataset(cfg.data, self.tokenizer, source=dataset)
        check_reward_columns(self.reward, self.dataset.columns, cfg.data.prompt_key)  # at start-up, not at step 1
        self.sampler = make_sampler(self.dataset, cfg.train.seed, cfg.data.shuffle)
        self.params = self._sampling_params()
        # the policy being optimised is the one that samples: softmax(logits / T) (greedy rollouts: T = 1)
        self.logprob_temperature = cfg.rollout.temperature if cfg.rollout.temperature > 0 else 1.0
        self.engine = RolloutEngine(self.models.policy, self.tokenizer, sampler_backend=cfg.rollout.sampler_backend,
                                    micro_batch_size=cfg.rollout.micro_batch_size, max_prompt_length=cfg.data.max_prompt_length,
                                    gate_top_k=self.curiosity_cfg.top_k if self.curiosity_cfg else 1)
        self.backend = self._make_backend()
        self.curiosity = self._make_curiosity()
        self.optimizer, self.scheduler = self._make_optimizer()
        self.update_generator = torch.Generator().manual_seed(cfg.train.seed + 1)  # minibatch order
        self.step = 0
        self.samples_seen = 0
        self.run_dir = cfg.run_dir
        resume = resume_from or cfg.checkpoint.resume_from
        self.logger = MetricsLogger.for_run(self.run_dir, cfg.logging, cfg.to_dict(), resume=bool(resume))
        if resume:
            self._resume(resume)

    # ------------------------------------------------------------------------------------------ set-up
    def _sampling_params(self) -> SamplingParams:
        r = self.cfg.rollout
        stop_ids = [i for s in r.stop for i in [self._single_token(s)] if i is not None]
        extra: dict[str, Any] = {"min_new_tokens": r.min_new_tokens, "ignore_eos": r.ignore_eos}
        if self.cfg.model.kind == "umm":
            from align.rollouts.umm import umm_generation_spec

            spec = umm_generation_spec(self.cfg.model.path, self.tokenizer)
            if r.guidance_scale != 1.0:  # CFG runs inside the policy's cached forward (align.rollouts.janus)
                set_guidance = getattr(self.models.policy, "set_guidance_scale", None)
                if set_guidance is None:
                    raise UserError("rollout.guidance_scale needs a native Janus checkpoint (model_type: janus); "
                                    "set rollout.guidance_scale: 1 for this model")
                set_guidance(r.guidance_scale)
            extra |= dict(allowed_token_ids=spec["allowed_token_ids"], min_new_tokens=spec["num_image_tokens"],
                          ignore_eos=True)
            r_max = spec["num_image_tokens"]
        else:
            r_max = r.max_new_tokens
        return SamplingParams(max_new_tokens=r_max, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                              min_p=r.min_p, stop_token_ids=stop_ids,
                              stop=[s for s in r.stop if self._single_token(s) is None],
                              seed=self.cfg.train.seed, **extra)

    def _single_token(self, text: str) -> int | None:
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        return ids[0] if len(ids) == 1 else None

    def _make_backend(self):
        if self.cfg.cluster.backend == "ray":
            from align.backends.ray import RayBackend

            return RayBackend(self.cfg, self.models, self.reward, self.engine)
        from align.backends.local import LocalBackend

        return LocalBackend(self.engine, self.reward)

    def _make_curiosity(self):
        if self.curiosity_cfg is None:
            return None
        from align.rewards.curiosity import CuriosityModule

        policy = self.models.policy
        h = hidden_size_of(policy)
        inter = getattr(policy.config, "intermediate_size", None) or 4 * h
        action = policy.get_input_embeddings().embedding_dim
        if needs_full_logits(policy):
            raise UserError("reward.curiosity needs the reference model's hidden states, which this model "
                            "(logit soft-capping / scaling) does not expose; set reward.curiosity.eta = 0")
        c = self.curiosity_cfg
        return CuriosityModule(h, action, inter, lr=c.lr, top_k=c.top_k, eta=c.eta, seed=self.cfg.train.seed,
                               squared=c.squared, whiten_include_padding=c.whiten_include_padding, device=self.device)

    def _make_optimizer(self):
        t = self.cfg.train
        groups = [{"params": self.models.trainable_parameters(), "lr": t.lr}]
        if self.models.critic is not None:
            groups.append({"params": self.models.critic_parameters(), "lr": t.critic_lr or t.lr})
        optimizer = torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)
        total = t.steps * max(1, self._updates_per_step())
        return optimizer, lambda_lr(optimizer, total, t.warmup_steps, t.lr_scheduler)

    @property
    def samples_per_step(self) -> int:
        return self.cfg.train.prompts_per_step * self.algo.group_size

    def _mini_batch_size(self) -> int:
        return self.cfg.train.mini_batch_size or self.samples_per_step

    def _updates_per_step(self) -> int:
        return self.cfg.algo.epochs * math.ceil(self.samples_per_step / self._mini_batch_size())

    # ------------------------------------------------------------------------------------------ the step
    def train_step(self) -> dict[str, float]:
        timings: dict[str, float] = {}

        def timed(name, fn, *args):
            t0 = time.perf_counter()
            out = fn(*args)
            timings[f"time/{name}"] = time.perf_counter() - t0
            return out

        step, metrics = timed("generate", self.phase_generate)
        metrics |= timed("score", self.phase_score, step)
        if self.algo.select_groups(step) is not None:
            step, refill = timed("refill", self.phase_refill, step)
            metrics |= refill
        log_completions(self.logger, self.cfg.logging, self.step + 1, step)  # self.step counts finished steps
        metrics |= timed("logprobs", self.phase_logprobs, step)
        metrics |= timed("advantages", self.phase_advantages, step)
        metrics |= timed("update", self.phase_update, step)
        metrics |= timed("sync", self.phase_sync)
        metrics |= timings
        metrics |= {f"backend/{k}": float(v) for k, v in getattr(self.backend, "stats", {}).items()}
        metrics["time/step"] = sum(timings.values())
        metrics["rollout/tokens_per_s"] = metrics["rollout/tokens"] / max(timings["time/generate"], 1e-9)
        return metrics

    def phase_generate(self) -> tuple[StepData, dict[str, float]]:
        """Draw prompts, expand each G times (prompt-major), sample one response per row."""
        g = self.algo.group_size
        records = self.sampler.next(self.cfg.train.prompts_per_step)
        prompts = [self.dataset.prompt_text(r) for r in records for _ in range(g)]
        columns = {k: [v for v in vals for _ in range(g)] for k, vals in columns_of(records, self.cfg.data.prompt_key).items()}
        raw = [r[self.cfg.data.prompt_key] for r in records]
        if any(isinstance(m, list) for m in raw):  # conversations: TRL-style rewards get the message lists back
            columns[PROMPT_MESSAGES] = [m if isinstance(m, list) else None for m in raw for _ in range(g)]
        # Per-sample random streams keyed by a global sample index: sharding never changes what is drawn.
        sample_ids = torch.arange(self.samples_seen, self.samples_seen + len(prompts))
        self.samples_seen += len(prompts)
        batch = self.backend.generate(prompts, columns, sample_ids, self.params).to(self.device)
        if batch.stop_reason is None or batch.stop_reason.shape != (len(prompts),):
            raise RuntimeError("the rollout backend returned a batch without a stop reason for every row")
        lengths = batch.mask.sum(-1).float()
        return StepData(batch=batch), {"rollout/response_length": float(lengths.mean()),
                                       "rollout/tokens": float(lengths.sum()),
                                       "rollout/truncated": float(batch.truncated.float().mean())}

    def phase_score(self, step: StepData) -> dict[str, float]:
        """Reward every sample; errored or non-applicable samples are excluded, never scored 0."""
        n = len(step.batch)
        step.batch.columns[TRAINER_STATE] = [self._reward_trainer_state()] * n  # TRL's trainer_state keyword
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
        good = step.scores[valid]
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
        penalty = algos.overlong_penalty(step.mask.sum(-1), self.params.max_new_tokens, ob.len, ob.penalty_factor)
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

    @torch.no_grad()
    def phase_logprobs(self, step: StepData) -> dict[str, float]:
        """Old-policy log-probs (unless the rollout's are used or one update makes them free), reference
        log-probs when a KL term needs them, critic values (PPO), reference states (curiosity)."""
        b, mb = step.batch, self.cfg.train.micro_batch_size
        n, t = b.response_ids.shape
        want_old = self._needs_old_logprobs() and not self.cfg.rollout.use_rollout_logprobs
        old, ref, values, hidden = [], [], [], []
        self.models.policy.eval()
        for rows in chunked(n, mb):
            ids, att = b.input_ids[rows], b.attention_mask[rows]
            if want_old or self.algo.uses_critic:
                fwd = response_forward(self.models.policy, ids, att, t, value_head=self.models.value_head,
                                       temperature=self.logprob_temperature)
                old.append(fwd.logprobs)
                values.append(fwd.values)
            if self.models.critic is not None:
                values[-1] = self.models.critic(ids, att, position_ids_from_mask(att))[:, -t - 1:-1]
            if self.algo.needs_reference or self.curiosity is not None:
                with self.models.reference_mode() as ref_model:
                    fwd = response_forward(ref_model, ids, att, t, return_hidden=self.curiosity is not None,
                                           temperature=self.logprob_temperature)
                ref.append(fwd.logprobs)
                hidden.append(fwd.hidden)
        self.models.policy.train()
        step.old_logprobs = torch.cat(old) if want_old else (b.logprobs if self.cfg.rollout.use_rollout_logprobs else None)
        step.ref_logprobs = torch.cat(ref) if ref else None
        step.values = torch.cat(values) if self.algo.uses_critic else None
        step.ref_hidden = torch.cat(hidden) if self.curiosity is not None else None
        metrics: dict[str, float] = {}
        if step.ref_logprobs is not None:
            base = step.old_logprobs if step.old_logprobs is not None else b.logprobs
            kl = torch.where(b.mask.bool(), base - step.ref_logprobs, torch.zeros_like(base))
            metrics["kl/mean"] = float(kl.sum() / b.mask.sum().clamp(min=1))
        if want_old and self.logprob_temperature == 1.0:  # rollout log-probs are at temperature 1
            diff = (step.old_logprobs - b.logprobs).abs()[b.mask.bool()]
            metrics["rollout/logprob_diff_max"] = float(diff.max()) if diff.numel() else 0.0
        correction = self.cfg.algo.rollout_correction
        if correction.mode != "none":  # the config guarantees temperature 1 and trainer-computed old log-probs
            step.rollout_weights, m = algos.rollout_correction(step.old_logprobs, b.logprobs, b.mask, correction.mode,
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
        cfg, rows_all = self.cfg, step.train_rows
        sums: dict[str, float] = {}
        count = 0
        if rows_all.numel() == 0:
            return {"train/skipped": 1.0}
        for _ in range(cfg.algo.epochs):
            order = rows_all[torch.randperm(rows_all.numel(), generator=self.update_generator).to(rows_all.device)]
            for mini in order.split(self._mini_batch_size()):
                metrics = self._optimizer_step(step, mini)
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
        self.algo.after_step(self._kl_per_seq(step), len(step.batch))
        out = {k: v / count for k, v in sums.items()}
        out["train/lr"] = self.scheduler.get_last_lr()[0]
        return out

    def _optimizer_step(self, step: StepData, mini: torch.Tensor) -> dict[str, float]:
        cfg = self.cfg
        mask = step.mask[mini]
        t = mask.shape[1]
        denom = self._denominator(mask)
        vf_denom = float(mask.sum())
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for micro in mini.split(cfg.train.micro_batch_size):
            b = step.batch
            fwd = response_forward(self.models.policy, b.input_ids[micro], b.attention_mask[micro], t,
                                   value_head=self.models.value_head, with_entropy=True,
                                   temperature=self.logprob_temperature)
            if self.models.critic is not None:
                att = b.attention_mask[micro]
                fwd.values = self.models.critic(b.input_ids[micro], att, position_ids_from_mask(att))[:, -t - 1:-1]
            old = step.old_logprobs[micro] if step.old_logprobs is not None else fwd.logprobs.detach()
            loss, metrics = self.algo.loss(fwd, step, micro, old, denom, vf_denom)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"step {self.step}: the loss is {float(loss)}; no optimizer step was taken")
            loss.backward()
            share = micro.numel() / mini.numel()
            metrics["policy/entropy"] = (fwd.entropy * step.mask[micro]).sum() / step.mask[micro].sum().clamp(min=1)
            for k, v in metrics.items():
                # loss/* already use the minibatch's denominators (partial sums); other metrics are means
                weight = 1.0 if k.startswith("loss/") else share
                sums[k] = sums.get(k, 0.0) + float(v.detach() if isinstance(v, torch.Tensor) else v) * weight
        params = self.models.trainable_parameters() + self.models.critic_parameters()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
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
        return float(kl.sum(-1).mean())

    def phase_sync(self) -> dict[str, float]:
        self.step += 1
        self.backend.sync(self.step)
        return {}

    # ------------------------------------------------------------------------------------------ running
    def train(self, max_steps: int | None = None) -> TrainResult:
        """Run until `train.steps` (or `max_steps` more steps in this call, for time-boxed jobs); checkpoints
        as configured, and at the end when `checkpoint.save_final`."""
        cfg = self.cfg
        stop_at = cfg.train.steps if max_steps is None else min(cfg.train.steps, self.step + max_steps)
        history: list[dict[str, float]] = []
        progress = _progress(cfg.train.steps, self.step, cfg.logging.progress)
        final_ckpt = None
        try:
            while self.step < stop_at:
                metrics = self.train_step()
                self.logger.log(self.step, metrics)
                history.append({"step": self.step, **metrics})
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(reward=f"{metrics['reward/mean']:.3f}", refresh=False)
                if cfg.logging.print_every and self.step % cfg.logging.print_every == 0 and progress is None:
                    print(f"step {self.step:4d}  reward {metrics['reward/mean']:+.4f}  "
                          f"len {metrics['rollout/response_length']:.1f}  {metrics['time/step']:.2f}s", flush=True)
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                    final_ckpt = self.save_checkpoint()
            if cfg.checkpoint.save_final and (final_ckpt is None or not final_ckpt.name.endswith(f"{self.step:06d}")):
                final_ckpt = self.save_checkpoint()
        finally:
            if progress is not None:
                progress.close()
            self.logger.close()
        last = history[-1] if history else {}
        return TrainResult(metrics={k: v for k, v in last.items() if k != "step"}, history=history,
                           checkpoint=final_ckpt, run_dir=self.run_dir)

    def close(self) -> None:
        self.backend.close()
        self.logger.close()  # a Trainer never trained still ends its wandb run

    # ------------------------------------------------------------------------------------------ checkpoints
    def trainer_state(self) -> dict[str, Any]:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "sampler": self.sampler.state_dict(), "samples_seen": self.samples_seen,
                 "update_generator": self.update_generator.get_state(), "algo": self.algo.state_dict(),
                 "algorithm": self.algo.name}
        if not self.cfg.checkpoint.save_optimizer:
            del state["optimizer"]
        if self.models.value_head is not None:
            state["value_head"] = self.models.value_head.state_dict()
        if self.models.critic is not None:
            state["critic"] = self.models.critic.state_dict()
        if self.curiosity is not None:
            state["curiosity"] = self.curiosity.state_dict()
        if hasattr(self.reward, "state_dict"):
            state["reward"] = self.reward.state_dict()
        return state

    def save_checkpoint(self) -> Path:
        return ckpt_io.save_checkpoint(self.run_dir, self.step, self.models.policy, self.tokenizer,
                                       self.trainer_state(), self.cfg.to_dict(), self.cfg.checkpoint.keep_last)

    def _resume(self, where: str | Path) -> None:
        ckpt = ckpt_io.find_checkpoint(where)
        state = ckpt_io.load_trainer_state(ckpt)
        if state.get("algorithm") != self.algo.name:
            raise UserError(f"checkpoint {ckpt} was written by a {state.get('algorithm')} run, this config is {self.algo.name}")
        ckpt_io.load_policy_weights(self.models.policy, ckpt, self.models.lora)
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        else:  # checkpoint.save_optimizer: false; the rest (step, data order, RNG, lr schedule) is exact
            warnings.warn(f"checkpoint {ckpt} holds no optimizer state (checkpoint.save_optimizer: false): the "
                          "optimizer's moments restart from zero, so this resume is not an exact continuation",
                          UserWarning, stacklevel=2)
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.samples_seen = state["samples_seen"]
        self.update_generator.set_state(state["update_generator"])
        self.algo.load_state_dict(state["algo"])
        if "value_head" in state:
            self.models.value_head.load_state_dict(state["value_head"])
        if "critic" in state:
            self.models.critic.load_state_dict(state["critic"])
        if self.curiosity is not None:
            if "curiosity" not in state:
                raise CheckpointError(f"checkpoint {ckpt} has no curiosity state (it was trained with "
                                      "reward.curiosity.eta = 0); resume with eta = 0 or start a new run")
            self.curiosity.load_state_dict(state["curiosity"])
        if "reward" in state and hasattr(self.reward, "load_state_dict"):
            self.reward.load_state_dict(state["reward"])
        ckpt_io.set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.logger.truncate_after(self.step)
        self.backend.sync(self.step)


def _progress(total: int, start: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)


def train(config: Any, overrides: list[str] | None = None, resume_from: str | Path | None = None, *,
          dataset: Any = None) -> TrainResult:
    """Run PPO or GRPO as configured; returns the final metrics, the history and the checkpoint path.
    dataset: a `datasets.Dataset` / `IterableDataset` / `DatasetDict` (data.split) instead of data.path."""
    trainer = Trainer(config, overrides, resume_from, dataset=dataset)
    try:
        return trainer.train()
    finally:
        trainer.close()

