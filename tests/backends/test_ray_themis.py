"""A Themis checkpoint on Ray reward workers (issue 20, item 2): the reward a run's config names
(`reward.functions: [{name: themis, kwargs: {model_path}}]`) is built in the driver, shipped to RewardWorker
actors as the Ray backend ships it, and each actor loads the checkpoint itself and scores its shard with the
real Calendar tool (the checkpoint: the `calendar_themis` fixture, tests/conftest.py)."""
from __future__ import annotations

from datetime import date, timedelta

import pytest

ray = pytest.importorskip("ray")
from _ray_local import local_ray  # noqa: E402
from ray import cloudpickle  # noqa: E402

from align.backends.ray import concat_outputs, reward_runs_remotely, shard_bounds  # noqa: E402
from align.config import RewardConfig, build  # noqa: E402
from align.reward_setup import build_reward  # noqa: E402
from align.rewards.worker import RewardWorker  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

def true_date(day: str, n: int) -> str:
    """The reference, written out with datetime (not the Calendar tool's code)."""
    return (date.fromisoformat(day) + timedelta(days=n)).isoformat()


@pytest.fixture(scope="module")
def ray_local():
    yield from local_ray(num_cpus=2)


def test_reward_workers_score_with_a_themis_checkpoint(ray_local, calendar_themis):
    path, cases = calendar_themis["path"], calendar_themis["cases"]
    cfg = build(RewardConfig, {"functions": [{"name": "themis", "kwargs": {"model_path": str(path), "device": "cpu",
                                                                           "tool_timeout_s": 10}}]}, "reward")
    reward = build_reward(cfg)
    remote, why = reward_runs_remotely(reward)
    assert remote, why
    # the driver's copy has scored (so its model is loaded), yet what ships to the actors holds no weights
    day, n = cases[0]
    reward.score([f"What date is {n} days after {day}?"], [true_date(day, n)])
    weights = sum(t.numel() * t.element_size() for t in reward.rewards[0].reward_model().model.state_dict().values())
    assert len(cloudpickle.dumps(reward)) < weights / 10

    prompts = [f"What date is {n} days after {day}?" for day, n in cases for _ in (0, 1)]
    completions = [true_date(day, n + k) for day, n in cases for k in (0, 1)]  # the true date, then one day later
    actors = [ray.remote(RewardWorker).options(num_cpus=1).remote(reward) for _ in range(2)]
    bounds = shard_bounds(len(prompts), len(actors))
    refs = [a.score.remote({"prompts": prompts[lo:hi], "completions": completions[lo:hi], "sample_ids": list(range(lo, hi))})
            for a, (lo, hi) in zip(actors, bounds)]
    out = concat_outputs(ray.get(refs, timeout=240))
    assert out.errors == [None] * len(prompts)
    for k, (day, n) in enumerate(cases):
        assert out.scores[2 * k] > out.scores[2 * k + 1]
        for j in (2 * k, 2 * k + 1):
            info = out.info[j]["component_info"]["themis"]
            assert f"<start_observation> Observation: {true_date(day, n)}\n" in info["trace"]
            assert info["rationale"] == ("The answer matches the tool." if j == 2 * k else "The answer differs from the tool.")
            (call,) = info["tool_calls"]
            observed = call["observation"] if "observation" in call else call["output"]  # main's loop: "output"
            assert (call["action"], call["input"], call["ok"], observed) == ("Calendar.target_day", f"{day}, {n}", True,
                                                                             true_date(day, n))
    healths = ray.get([a.health.remote() for a in actors], timeout=60)
    assert [h["samples_scored"] for h in healths] == [hi - lo for lo, hi in bounds]
    assert len({h["pid"] for h in healths}) == 2  # two processes, each with its own copy of the checkpoint
