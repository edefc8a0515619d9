"""Supervised fine-tuning on (prompt, completion) pairs: the usual first stage before RLHF.

Cross-entropy on the completion tokens only (prompt tokens are context), EOS appended to each completion
so the policy learns to stop. Uses the trainer's teacher-forced forward (fused linear + log-prob), so no
[N, T, V] logits are held.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from align.algos.schedule import lambda_lr
from align.config import LoggingConfig, ModelConfig, Section, apply_overrides, build, read_config_file
from align.data import read_records
from align.errors import ConfigError, UserError
from align.metrics import MetricsLogger
from align.models import load_models, resolve_device
from align.trainer.forward import response_forward
from align.trainer.loop import seed_everything


@dataclass
class SFTDataConfig(Section):
    path: str = ""
    prompt_key: str = "prompt"
    completion_key: str = "completion"
    max_length: int = 256

    def validate(self) -> None:
        self.check(bool(self.path), "path", "set data.path to a JSONL file of {prompt, completion} records")
        self.check(self.max_length >= 2, "max_length", "must be >= 2")


@dataclass
class SFTTrainConfig(Section):
    epochs: int = 1
    max_steps: int = 0  # 0 = run all epochs
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_scheduler: str = "cosine"
    max_grad_norm: float = 1.0
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        self.check(self.epochs >= 1, "epochs", "must be >= 1")
        self.check(self.batch_size >= 1, "batch_size", "must be >= 1")
        self.check(self.lr > 0, "lr", "must be > 0")
        self.check(self.lr_scheduler in ("constant", "cosine", "linear"), "lr_scheduler", "use constant, cosine or linear")


@dataclass
class SFTConfig(Section):
    model: ModelConfig = field(default_factory=lambda: ModelConfig(path="<unset>"))
    data: SFTDataConfig = field(default_factory=lambda: SFTDataConfig(path="<unset>"))
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)
    output_dir: str = ""
    logging: LoggingConfig = field(default_factory=lambda: LoggingConfig(name="sft"))

    def validate(self) -> None:
        if self.model.path == "<unset>" or self.data.path == "<unset>":
            raise ConfigError("sft needs model.path and data.path")
        self.check(bool(self.output_dir), "output_dir", "set output_dir: where the fine-tuned model is saved")


def load_sft_config(config: Any, overrides: list[str] | None = None) -> SFTConfig:
    if isinstance(config, SFTConfig):
        return config if not overrides else build(SFTConfig, apply_overrides(config.to_dict(), overrides))
    data = dict(config) if isinstance(config, dict) else read_config_file(config)
    return build(SFTConfig, apply_overrides(data, overrides))


def _batches(records, batch_size, seed, epochs):
    order = list(range(len(records)))
    rng = random.Random(seed)
    for _ in range(epochs):
        rng.shuffle(order)
        for lo in range(0, len(order), batch_size):
            yield [records[i] for i in order[lo:lo + batch_size]]


def _collate(tokenizer, batch, cfg: SFTDataConfig, device):
    prompts = [tokenizer(str(r[cfg.prompt_key])).input_ids for r in batch]
    eos = tokenizer.eos_token_id
    completions = [tokenizer(str(r[cfg.completion_key]), add_special_tokens=False).input_ids + [eos] for r in batch]
    for i, (p, c) in enumerate(zip(prompts, completions)):
        if len(p) + len(c) > cfg.max_length:
            keep_p = max(1, cfg.max_length - len(c))
            prompts[i], completions[i] = p[-keep_p:], c[:cfg.max_length - keep_p]
    pw, cw, pad = max(map(len, prompts)), max(map(len, completions)), tokenizer.pad_token_id
    ids = torch.full((len(batch), pw + cw), pad, dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, pw - len(p):pw] = torch.tensor(p)
        att[i, pw - len(p):pw] = 1
        ids[i, pw:pw + len(c)] = torch.tensor(c)
        att[i, pw:pw + len(c)] = 1
    return ids.to(device), att.to(device), cw


def sft(config: Any, overrides: list[str] | None = None) -> dict[str, Any]:
    """Fine-tune `model.path` on the completions of `data.path`; saves to `output_dir`; returns final metrics."""
    cfg = load_sft_config(config, overrides)
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    models = load_models(cfg.model, device, need_reference=False, critic=None)
    model, tok = models.policy, models.tokenizer
    records = read_records(cfg.data.path)
    bad = [r for r in records if cfg.data.prompt_key not in r or cfg.data.completion_key not in r]
    if bad:
        raise UserError(f"{cfg.data.path}: a record lacks {cfg.data.prompt_key!r} or {cfg.data.completion_key!r} "
                        f"(columns: {sorted(bad[0])}); set data.prompt_key / data.completion_key")
    steps_per_epoch = math.ceil(len(records) / cfg.train.batch_size)
    total = cfg.train.max_steps or steps_per_epoch * cfg.train.epochs
    params = models.trainable_parameters()
    optim = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sched = lambda_lr(optim, total, cfg.train.warmup_steps, cfg.train.lr_scheduler)
    out_dir = Path(cfg.output_dir)
    logger = MetricsLogger.for_run(out_dir, cfg.logging, cfg.to_dict())
    model.train()
    step, loss_value, t0 = 0, float("nan"), time.perf_counter()
    epochs = math.ceil(total / steps_per_epoch)
    for batch in _batches(records, cfg.train.batch_size, cfg.train.seed, epochs):
        if step >= total:
            break
        ids, att, width = _collate(tok, batch, cfg.data, device)
        logp = response_forward(model, ids, att, width).logprobs
        mask = att[:, -width:].float()
        loss = -(logp * mask).sum() / mask.sum()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"sft step {step}: loss is {float(loss)}; stopping before the optimizer step")
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        optim.step()
        sched.step()
        step += 1
        loss_value = float(loss.detach())
        logger.log(step, {"sft/loss": loss_value, "train/lr": sched.get_last_lr()[0]})
        if cfg.logging.print_every and step % max(cfg.logging.print_every, 1) == 0:
            print(f"sft step {step:5d}/{total}  loss {loss_value:.4f}", flush=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    logger.close()
    return {"sft/loss": loss_value, "steps": step, "seconds": time.perf_counter() - t0, "output_dir": str(out_dir)}
