"""RewardWorker in-process (idempotent by sample id) and as a Ray actor."""
from __future__ import annotations

import pytest

from align.rewards.base import RewardFunction, RewardOutput
from align.rewards.worker import RewardWorker


class Counting(RewardFunction):
    """len(completion) + label; counts the samples it was asked to score; 'bad' is an error."""

    name = "counting"

    def __init__(self):
        self.calls = 0

    def score(self, prompts, completions, **columns):
        self.calls += len(completions)
        labels = columns.get("label", [0.0] * len(completions))
        return RewardOutput(scores=[None if c == "bad" else len(c) + float(y) for c, y in zip(completions, labels)],
                            errors=["bad" if c == "bad" else None for c in completions],
                            token_rewards=[[1.0] * len(c) for c in completions])


def test_in_process_scoring_by_name():
    w = RewardWorker("format", {"pattern": "^ok", "mode": "match"})
    out = w.score({"prompts": ["", ""], "completions": ["ok!", "no"]})
    assert out.scores == [1.0, 0.0]


def test_idempotent_by_sample_id_and_errors_are_retried():
    reward = Counting()
    w = RewardWorker(reward)
    batch = {"prompts": ["", "", ""], "completions": ["ab", "abc", "bad"], "sample_ids": ["s0", "s1", "s2"],
             "label": [1.0, 2.0, 0.0]}
    first = w.score(batch)
    assert first.scores == [3.0, 5.0, None] and first.errors == [None, None, "bad"]
    assert reward.calls == 3
    again = w.score(batch)  # a retried task: cached samples are not scored again, the error is
    assert again.scores == first.scores and again.token_rewards == first.token_rewards
    assert reward.calls == 4
    mixed = w.score({"completions": ["abc", "abcd"], "sample_ids": ["s1", "s9"], "columns": {"label": [2.0, 0.5]}})
    assert mixed.scores == [5.0, 4.5] and reward.calls == 5
    assert w.health()["cached"] == 3


def test_batch_shape_errors():
    w = RewardWorker(Counting())
    with pytest.raises(ValueError, match="completions"):
        w.score({"prompts": ["a"]})
    with pytest.raises(ValueError, match="label"):
        w.score({"completions": ["a", "b"], "label": [1.0]})


@pytest.mark.ray
def test_ray_actor_scores_like_in_process():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        actor = RewardWorker.as_actor("format", {"pattern": r"^\S+$", "flags": ""}, num_cpus=1)
        batch = {"prompts": ["", ""], "completions": ["one", "two words"], "sample_ids": [0, 1]}
        out = ray.get(actor.score.remote(batch), timeout=120)
        assert out.scores == [1.0, 0.0] and out.errors == [None, None]
        assert ray.get(actor.score.remote(batch), timeout=60).scores == [1.0, 0.0]
        assert ray.get(actor.health.remote())["samples_scored"] == 2  # the repeat came from the cache
    finally:
        ray.shutdown()
