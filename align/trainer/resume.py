"""Checkpoints of a training run: what a resume needs to continue exactly, and the resume itself.

A mixin of `align.trainer.loop.Trainer`; the files (atomic writes, confinement, safe loading) are `align.checkpoint`.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from align import checkpoint as ckpt_io
from align.distributed import checkpoint as shards
from align.distributed import get_context
from align.errors import CheckpointError, UserError


class CheckpointPhases:
    def trainer_state(self) -> dict[str, Any]:
        queued = self._async.state_dict() if self._async is not None else None  # first: it drains the queue
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
        if queued is not None:
            state["async_queue"] = queued
        return state

    def save_checkpoint(self) -> Path:
        ctx = getattr(self, "dist", None) or get_context()
        if ctx.enabled:  # N ranks: DCP shards + a gathered export, one atomic folder (align.distributed.checkpoint)
            optimizer = self.optimizer if self.cfg.checkpoint.save_optimizer else None
            return shards.save_sharded_checkpoint(self.run_dir, self.step, self.models, self.tokenizer, optimizer,
                                                  self.trainer_state(), self.cfg.to_dict(),
                                                  self.cfg.checkpoint.keep_last, ctx)
        return ckpt_io.save_checkpoint(self.run_dir, self.step, self.models.policy, self.tokenizer,
                                       self.trainer_state(), self.cfg.to_dict(), self.cfg.checkpoint.keep_last)

    def _resume(self, where: str | Path) -> None:
        ckpt = ckpt_io.find_checkpoint(where)
        state = ckpt_io.load_trainer_state(ckpt)
        if state.get("algorithm") != self.algo.name:
            raise UserError(f"checkpoint {ckpt} was written by a {state.get('algorithm')} run, this config is {self.algo.name}")
        restored = False  # DCP shards (saved at any world size), or a one-process checkpoint onto several ranks:
        if "sharded" in state or (getattr(self, "dist", None) or get_context()).enabled:
            state, restored = shards.load_into_run(ckpt, state, self.models, self.optimizer)
        else:
            ckpt_io.load_policy_weights(self.models.policy, ckpt, self.models.lora)
        configured = self._optimizer_settings()  # what this run's config asks for (train.lr, critic_lr, weight_decay)
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        elif not restored:  # checkpoint.save_optimizer: false; the rest (step, data order, RNG, lr schedule) is exact
            warnings.warn(f"checkpoint {ckpt} holds no optimizer state (checkpoint.save_optimizer: false): the "
                          "optimizer's moments restart from zero, so this resume is not an exact continuation",
                          UserWarning, stacklevel=2)
        self.scheduler.load_state_dict(state["scheduler"])
        self._apply_optimizer_settings(configured, ckpt)
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
        if self._async is not None:
            self._async.load_state_dict(state.get("async_queue"))
        self.step = int(state["step"])
        self.logger.truncate_after(self.step)
        self.backend.sync(self.step)

    def _optimizer_settings(self) -> list[tuple[float, float]]:
        """(base lr, weight decay) per parameter group, as this run's config set them."""
        return [(float(base), float(g["weight_decay"])) for base, g in zip(self.scheduler.base_lrs,
                                                                           self.optimizer.param_groups)]

    def _apply_optimizer_settings(self, configured: list[tuple[float, float]], ckpt: Path) -> None:
        """The optimizer and scheduler state of a checkpoint carry its run's lr and weight decay; a resume whose
        config sets other values uses the config's (the moments and the schedule's position are kept) and
        says so, instead of silently continuing with the old ones."""
        saved = self._optimizer_settings()
        if saved == configured:
            return
        changes = "; ".join(f"group {i}: lr {a[0]:g} -> {b[0]:g}, weight_decay {a[1]:g} -> {b[1]:g}"
                            for i, (a, b) in enumerate(zip(saved, configured)) if a != b)
        warnings.warn(f"resume from {ckpt}: the config's optimizer settings differ from the checkpoint's and are "
                      f"applied from step {int(self.scheduler.last_epoch)} ({changes})", UserWarning, stacklevel=3)
        step = self.scheduler.last_epoch
        self.scheduler.base_lrs = [lr for lr, _ in configured]
        for g, (lr, wd), factor in zip(self.optimizer.param_groups, configured, self.scheduler.lr_lambdas):
            g["initial_lr"], g["lr"], g["weight_decay"] = lr, lr * factor(step), wd
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
