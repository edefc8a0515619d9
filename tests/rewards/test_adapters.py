"""TRL and verl adapters, both directions."""
from __future__ import annotations

import pickle

import pytest

from align.rewards.adapters import TRLRewardFunc, VerlComputeScore, VerlReward, from_trl, from_verl, to_trl, to_verl
from align.rewards.base import RewardFunction, RewardOutput


def count_a(prompts, completions, **kwargs):
    return [float(c.count("a")) for c in completions]


class Flaky(RewardFunction):
    """Score = len(completion); an error where the completion is 'bad'; label echoed in info."""

    name = "flaky"

    def score(self, prompts, completions, **columns):
        labels = columns.get("label", [None] * len(completions))
        return RewardOutput(scores=[None if c == "bad" else float(len(c)) for c in completions],
                            errors=["bad sample" if c == "bad" else None for c in completions],
                            info=[{"label": y, "prompt": p} for p, y in zip(prompts, labels)])


def verl_exact(data_source, solution_str, ground_truth, extra_info=None):
    if data_source == "boom":
        raise RuntimeError("grader crashed")
    if data_source == "dict":
        return {"score": 0.25, "acc": True}
    if data_source == "nan":
        return float("nan")
    if data_source == "str":
        return "yes"
    return 1.0 if solution_str.strip() == str(ground_truth) else 0.0


def test_from_trl_wraps_a_callable():
    r = from_trl(count_a)
    assert r.name == "count_a"
    assert r.score(["", ""], ["banana", "xyz"]).scores == [3.0, 0.0]


def test_to_trl_handles_conversational_inputs_and_drops_trl_extras():
    f = to_trl(Flaky())
    assert f.__name__ == "flaky"
    prompts = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "yo"}]]
    completions = [[{"role": "assistant", "content": "abc"}], [{"role": "assistant", "content": "abcdef"}]]
    assert f(prompts=prompts, completions=completions, completion_ids=[[1], [2]], trainer_state=object(),
             label=["x", "y"]) == [3.0, 6.0]


def test_to_trl_errors_become_none_or_raise():
    assert to_trl(Flaky())(prompts=["", ""], completions=["bad", "ok"]) == [None, 2.0]
    with pytest.raises(RuntimeError, match="bad sample"):
        to_trl(Flaky(), on_error="raise")(prompts=["", ""], completions=["bad", "ok"])


def test_from_verl_scores_per_sample_with_explicit_errors():
    r = from_verl(verl_exact)
    out = r.score([""] * 6, ["42", "41", "x", "x", "x", "x"], ground_truth=["42"] * 6,
                  data_source=["gsm8k", "gsm8k", "boom", "dict", "nan", "str"])
    assert out.scores[:2] == [1.0, 0.0]
    assert out.scores[2] is None and "grader crashed" in out.errors[2]
    assert out.scores[3] == 0.25 and out.info[3] == {"acc": True}
    assert out.scores[4] is None and "non-finite" in out.errors[4]
    assert out.scores[5] is None and "str" in out.errors[5]


def test_from_verl_reads_verl_parquet_layout_and_needs_ground_truth():
    r = from_verl(verl_exact)
    out = r.score(["", ""], ["7", "8"], reward_model=[{"ground_truth": "7"}, {"ground_truth": "7"}])
    assert out.scores == [1.0, 0.0]
    assert r.score([""], ["7"], label=["7"]).scores == [1.0]
    with pytest.raises(ValueError, match="ground_truth"):
        r.score([""], ["7"])


def test_to_verl_compute_score():
    cs = to_verl(Flaky())
    result = cs("gsm8k", "abcd", "gold", extra_info={"prompt": "P"})
    assert result == {"score": 4.0, "label": "gold", "prompt": "P"}
    with pytest.raises(RuntimeError, match="bad sample"):
        cs("gsm8k", "bad", "gold")


def test_adapters_pickle():
    for obj in (to_trl(Flaky()), to_verl(Flaky()), from_verl(verl_exact), from_trl(count_a)):
        clone = pickle.loads(pickle.dumps(obj))
        assert type(clone) is type(obj)
    assert isinstance(to_trl(count_a), TRLRewardFunc) and isinstance(to_verl(count_a), VerlComputeScore)
    assert isinstance(from_verl(verl_exact), VerlReward)
