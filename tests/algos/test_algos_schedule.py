"""The one LR schedule (align.algos.schedule) against its formulas written out, and against the four schedules
it replaced, to the last bit (the demo's reward numbers depend on it)."""
from __future__ import annotations

import math

import pytest
import torch

from align.algos.schedule import lambda_lr, lr_multiplier


def test_formulas_written_out():
    # constant: 1 after the warm-up; shifted ramp (s + 1) / (w + 1)
    assert [lr_multiplier(s, 10, 3, "constant") for s in range(5)] == [1 / 4, 2 / 4, 3 / 4, 1.0, 1.0]
    # linear: 1 - (s - w) / (T - w), floored at 0 past the end
    assert [lr_multiplier(s, 6, 2, "linear") for s in (2, 3, 4, 5, 6, 9)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    # cosine: 0.5 * (1 + cos(pi * p))
    assert lr_multiplier(0, 4, 0, "cosine") == 1.0
    assert lr_multiplier(2, 4, 0, "cosine") == pytest.approx(0.5, abs=1e-15)
    assert lr_multiplier(4, 4, 0, "cosine") == 0.0
    assert lr_multiplier(3, 5, 1, "cosine") == 0.5 * (1 + math.cos(math.pi * 2 / 4))
    # zero ramp: s / w (lr 0 at the first step)
    assert [lr_multiplier(s, 10, 4, "cosine", ramp="zero") for s in range(4)] == [0.0, 0.25, 0.5, 0.75]
    # overlap: the ramp multiplies a decay that runs over all T steps
    assert lr_multiplier(1, 8, 3, "cosine", overlap=True) == (2 / 4) * 0.5 * (1 + math.cos(math.pi * 1 / 8))
    assert lr_multiplier(5, 8, 3, "cosine", overlap=True) == 0.5 * (1 + math.cos(math.pi * 5 / 8))


def test_unknown_kind_or_ramp_is_rejected():
    with pytest.raises(ValueError, match="constant, linear, cosine"):
        lr_multiplier(0, 10, 0, "exponential")
    with pytest.raises(ValueError, match="shifted, zero"):
        lr_multiplier(0, 10, 0, "cosine", ramp="step")


def _old_trainer(i, total, warmup, kind):  # align/trainer/loop.py and align/supervised.py before issue 12
    if i < warmup:
        return (i + 1) / (warmup + 1)
    progress = (i - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 1.0


def _old_hf_cosine(step, warmup, total):  # transformers.get_cosine_schedule_with_warmup (rewards/training.py)
    if step < warmup:
        return float(step) / float(max(1, warmup))
    progress = float(step - warmup) / float(max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(0.5) * 2.0 * progress)))


def _old_toy(s, steps):  # align/toyworld.py pretrain before issue 12
    warm = max(1, steps // 20)
    return min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("total,warmup", [(1, 0), (10, 0), (10, 3), (250, 10), (7, 7)])
def test_same_numbers_as_the_trainer_and_sft_schedules(kind, total, warmup):
    for i in range(total + 3):
        assert lr_multiplier(i, total, warmup, kind) == _old_trainer(i, total, warmup, kind)


@pytest.mark.parametrize("total,ratio", [(1, 0.0), (8, 0.0), (10, 0.1), (37, 0.03), (100, 0.5), (1, 0.9)])
def test_same_numbers_as_hugging_face_cosine_with_warmup(total, ratio):
    from transformers import get_cosine_schedule_with_warmup

    warmup = max(0, round(ratio * total))
    ours = lambda_lr(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), total, warmup, "cosine", ramp="zero")
    theirs = get_cosine_schedule_with_warmup(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), warmup, total)
    for step in range(total + 1):
        assert ours.get_last_lr() == theirs.get_last_lr() and lr_multiplier(step, total, warmup, "cosine", ramp="zero") == \
            _old_hf_cosine(step, warmup, total), step
        ours.optimizer.step(), theirs.optimizer.step()
        ours.step(), theirs.step()


@pytest.mark.parametrize("steps", [1, 19, 20, 41, 1500])
def test_same_numbers_as_the_toy_pretraining_schedule(steps):
    warm = max(1, steps // 20)
    for s in range(steps + 1):
        assert lr_multiplier(s, steps, warm - 1, "cosine", overlap=True) == _old_toy(s, steps)
