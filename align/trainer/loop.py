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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from align import checkpoint as ckpt_io
from align.algos.schedule import lambda_lr
from align.config import as_config
from align.data import PromptDataset, make_sampler, resolve_data_config
from align.distributed import init_from_env
from align.distributed.batches import reduce_metrics
from align.distributed.fsdp import shard_models
from align.distributed.setup import NullLogger, check_world, collective_errors
from align.errors import UserError
from align.metrics import MetricsLogger
from align.models import hidden_size_of, load_models, needs_full_logits, resolve_device
from align.reward_setup import bind_policy, build_reward, check_reward_columns
from align.rollouts.engine import RolloutEngine
from align.rollouts.params import SamplingParams
from align.trainer.algorithm import make_algorithm
from align.trainer.learn_phases import LearnPhases
from align.trainer.reporting import log_completions
from align.trainer.resume import CheckpointPhases
from align.trainer.rollout_phases import RolloutPhases


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


class Trainer(RolloutPhases, LearnPhases, CheckpointPhases):
    def __init__(self, config: Any, overrides: list[str] | None = None, resume_from: str | Path | None = None,
                 dataset: Any = None):
        self.cfg = cfg = resolve_data_config(as_config(config, overrides), dataset)
        d = cfg.distributed  # one rank unless torchrun / Ray trainer actors set WORLD_SIZE > 1 (docs/distributed.md)
        self.dist = init_from_env(d.timeout_s, d.backend, d.threads_per_rank)
        check_world(cfg, self.dist)
        # before anything is loaded or written: a new run never silently lands on an old one
        if self.dist.is_main:
            ckpt_io.prepare_run_dir(cfg.run_dir, bool(resume_from or cfg.checkpoint.resume_from), cfg.checkpoint.overwrite)
        self.dist.barrier()
        seed_everything(cfg.train.seed)
        self.device = resolve_device(cfg.train.device)
        self.algo = make_algorithm(cfg)
        curiosity_cfg = cfg.reward.curiosity  # the config allows it only with algorithms that take token rewards
        self.curiosity_cfg = curiosity_cfg if curiosity_cfg is not None and curiosity_cfg.eta > 0 else None
        critic = cfg.model.critic if self.algo.uses_critic else None
        self.models = load_models(cfg.model, self.device, critic=critic,
                                  need_reference=self.algo.needs_reference or self.curiosity_cfg is not None)
        shard_models(self.models, cfg.distributed, self.dist)  # FSDP2 at world size > 1, before the optimizer
        self.algo.dist = self.dist
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
        self.engine = RolloutEngine(self.models.decode_model, self.tokenizer, sampler_backend=cfg.rollout.sampler_backend,
                                    micro_batch_size=cfg.rollout.micro_batch_size, max_prompt_length=cfg.data.max_prompt_length,
                                    gate_top_k=self.curiosity_cfg.top_k if self.curiosity_cfg else 0)
        self.backend = self._make_backend()
        self.curiosity = self._make_curiosity()
        self.optimizer, self.scheduler = self._make_optimizer()
        self.update_generator = torch.Generator().manual_seed(cfg.train.seed + 1)  # minibatch order
        self.step = 0
        self.samples_seen = 0
        self.run_dir = cfg.run_dir
        self._async = self._make_async()  # train.max_staleness >= 1: generation runs ahead (before a resume fills it)
        resume = resume_from or cfg.checkpoint.resume_from
        self.logger = (MetricsLogger.for_run(self.run_dir, cfg.logging, cfg.to_dict(), resume=bool(resume))
                       if self.dist.is_main else NullLogger())
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
        from align.distributed.ray_trainers import rollouts_colocated

        if self.cfg.cluster.backend == "ray" and not rollouts_colocated(self.cfg):  # a Ray trainer rank: local
            from align.backends.ray import RayBackend

            return RayBackend(self.cfg, self.models, self.reward, self.engine)
        from align.backends.local import LocalBackend
        from align.tool_env import make_episodes

        return LocalBackend(self.engine, self.reward, refresh=self.models.refresh_decode,
                            episodes=make_episodes(self.cfg.rollout, self.engine.tokenizer))

    def _make_async(self):
        if self.cfg.train.max_staleness == 0:
            return None
        from align.trainer.async_rollouts import AsyncRollouts

        return AsyncRollouts(self)

    def _make_curiosity(self):
        if self.curiosity_cfg is None:
            return None
        from align.rewards.curiosity import CuriosityModule

        policy = self.models.policy
        h = hidden_size_of(policy)
        inter = getattr(policy.config, "intermediate_size", None) or 4 * h
        action = policy.get_input_embeddings().embedding_dim
        if needs_full_logits(policy):
            raise UserError("reward.curiosity needs the reference model's hidden states, and this model's logits are "
                            "not lm_head(hidden) (align.models.check_head_path); set reward.curiosity.eta = 0")
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

        if self._async is not None:  # generated and scored ahead (align.trainer.async_rollouts); time = the wait
            step, metrics = timed("generate", self._async.take)
        else:
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
        metrics["rollout/tokens_per_s"] = metrics["rollout/tokens"] / max(metrics.get("async/generate_s", timings["time/generate"]), 1e-9)
        return metrics

    def phase_sync(self) -> dict[str, float]:
        self.step += 1
        if self._async is not None:  # bounded staleness: the version boundary (align.trainer.async_rollouts)
            return self._async.sync(self.step)
        self.backend.sync(self.step)
        return {}

    # ------------------------------------------------------------------------------------------ running
    def train(self, max_steps: int | None = None) -> TrainResult:
        """Run until `train.steps` (or `max_steps` more steps in this call, for time-boxed jobs); checkpoints
        as configured, and at the end when `checkpoint.save_final`."""
        cfg = self.cfg
        stop_at = cfg.train.steps if max_steps is None else min(cfg.train.steps, self.step + max_steps)
        history: list[dict[str, float]] = []
        progress = _progress(cfg.train.steps, self.step, cfg.logging.progress and self.dist.is_main)
        final_ckpt = None
        try:
            while self.step < stop_at:
                with collective_errors(self.dist):
                    metrics = reduce_metrics(self.dist, self.train_step())
                self.logger.log(self.step, metrics)
                history.append({"step": self.step, **metrics})
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(reward=f"{metrics['reward/mean']:.3f}", refresh=False)
                if (cfg.logging.print_every and self.step % cfg.logging.print_every == 0 and progress is None
                        and self.dist.is_main):
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
        if self._async is not None:
            self._async.close()
        self.backend.close()
        self.logger.close()  # a Trainer never trained still ends its wandb run



def _progress(total: int, start: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)


def train(config: Any, overrides: list[str] | None = None, resume_from: str | Path | None = None, *,
          dataset: Any = None) -> TrainResult:
    """Run PPO or GRPO as configured; returns the final metrics, the history and the checkpoint path.
    dataset: a `datasets.Dataset` / `IterableDataset` / `DatasetDict` (data.split) instead of data.path."""
    from align.distributed.ray_trainers import train_on_actors, wants_trainer_actors

    cfg = as_config(config, overrides)
    if wants_trainer_actors(cfg):  # cluster.num_trainer_workers > 1: SPMD ranks on Ray actors (docs/ray.md)
        return train_on_actors(cfg, resume_from, dataset)
    trainer = Trainer(cfg, None, resume_from, dataset=dataset)
    try:
        return trainer.train()
    finally:
        trainer.close()

