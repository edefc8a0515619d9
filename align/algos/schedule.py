"""The one learning-rate schedule: a pure multiplier of the base lr per optimizer step, and its LambdaLR.

Every trainer (PPO / GRPO, SFT, reward-model training, the toy UMM pre-training) uses this, so a schedule is
written, and tested against its formula, once. With w = warmup, T = total, s = step (0-based):

    warmup ramp, s < w:   "shifted": (s + 1) / (w + 1)   never 0 (the PPO / GRPO and SFT trainers)
                          "zero":    s / w               the first step has lr 0 (Hugging Face's
                                                         get_cosine_schedule_with_warmup; reward-model training)
    decay progress:       p = min(1, (s - w) / max(1, T - w))          after the warm-up (default)
                          p = min(1, s / max(1, T)), times the ramp    overlap=True: the ramp and the decay overlap
    kind:                 constant 1 | linear 1 - p | cosine 0.5 * (1 + cos(pi * p))
"""
from __future__ import annotations

import math

LR_SCHEDULES = ("constant", "linear", "cosine")
WARMUP_RAMPS = ("shifted", "zero")


def _decay(kind: str, progress: float) -> float:
    if kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if kind == "linear":
        return 1.0 - progress
    return 1.0


def lr_multiplier(step: int, total: int, warmup: int = 0, kind: str = "constant", *, ramp: str = "shifted",
                  overlap: bool = False) -> float:
    """The factor the base lr is multiplied by at optimizer step `step` of `total` (formulas in the module doc)."""
    if kind not in LR_SCHEDULES:
        raise ValueError(f"lr schedule {kind!r}: use one of {', '.join(LR_SCHEDULES)}")
    if ramp not in WARMUP_RAMPS:
        raise ValueError(f"warm-up ramp {ramp!r}: use one of {', '.join(WARMUP_RAMPS)}")
    ramp_value = 1.0
    if step < warmup:
        ramp_value = (step + 1) / (warmup + 1) if ramp == "shifted" else step / warmup
        if not overlap:
            return ramp_value
    if overlap:
        return ramp_value * _decay(kind, min(1.0, step / max(1, total)))
    return _decay(kind, min(1.0, (step - warmup) / max(1, total - warmup)))


def lambda_lr(optimizer, total: int, warmup: int = 0, kind: str = "constant", *, ramp: str = "shifted",
              overlap: bool = False):
    """torch's LambdaLR over `lr_multiplier` (call `.step()` after each optimizer step)."""
    import torch

    def factor(step: int) -> float:  # a plain function: LambdaLR's state_dict stores none (as before), so
        return lr_multiplier(step, total, warmup, kind, ramp=ramp, overlap=overlap)  # checkpoints keep their form

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
