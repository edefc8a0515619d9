"""Overflow as data: a score that is finite as a Python float but not in float32 (the dtype scores train in)
is a per-sample error: excluded from the update and counted in `reward/errors`, never a crash, never a number."""
from __future__ import annotations

import math

import pytest

import align
from align.rewards.base import RewardOutput
from align.rewards.mixture import RewardMixture
from align.testing import tiny_run_config

HUGE = 1e39  # a finite Python float; inf in float32 (max ~3.4e38)


class OverflowEveryFourth:
    """Scores 1e39 for every fourth sample, 1.0 / 2.0 for the rest (picklable, so any backend can ship it)."""

    __name__ = "overflow_every_fourth"

    def __call__(self, prompts, completions, **kwargs):
        return [HUGE if i % 4 == 0 else 1.0 + (i % 2) for i in range(len(completions))]


def config(algorithm, model, data, run_dir, **algo):
    return tiny_run_config(algorithm, model, data, run_dir, OverflowEveryFourth(), train={"prompts_per_step": 4},
                           algo=algo)


def test_reward_output_refuses_float32_overflow():
    out = RewardOutput(scores=[HUGE, -HUGE, 3.0e38, 1.0])
    assert out.scores == [None, None, 3.0e38, 1.0]
    assert "float32" in out.errors[0] and "float32" in out.errors[1]
    assert out.errors[2] is None and out.errors[3] is None


def test_mixture_sum_that_overflows_float32_is_an_error():
    """Two in-range components whose weighted sum leaves float32 make the sample an error, not inf."""
    class Big:
        __name__ = "big"

        def __call__(self, prompts, completions, **kwargs):
            return [3.0e38] * len(completions)

    mix = RewardMixture([(Big(), 1.0), (Big(), 1.0)])
    out = mix.score(["p"], ["c"])
    assert out.scores == [None] and out.errors[0] is not None and "float32" in out.errors[0]


@pytest.mark.parametrize("algorithm, algo", [("grpo", {"group_size": 4}), ("ppo", {})])
def test_float32_overflow_reward_is_excluded_and_counted(algorithm, algo, tiny_model_path, arithmetic_data, tmp_path):
    m = align.train(config(algorithm, tiny_model_path, arithmetic_data["prompts"], tmp_path / "run", **algo)).metrics
    n = 16 if algorithm == "grpo" else 4
    assert m["reward/errors"] == n / 4
    assert m["train/samples"] == n - n / 4
    assert m["reward/max"] == 2.0 and m["reward/min"] == 1.0  # the overflowed samples are not a number here
    assert all(math.isfinite(v) for v in m.values() if isinstance(v, float))
