"""TRL's reward convention: async rewards, TRL's call keywords, and RemoteReward as one of TRL GRPOTrainer's
reward_funcs, scored through TRL's own `GRPOTrainer._calculate_rewards` (the installed trl's code, not a copy)."""
from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from align.rewards.base import CallableReward, RewardFunction, RewardOutput
from align.rewards.client import RemoteReward
from align.rewards.mixture import RewardMixture
from align.rewards.service import ServerThread, create_app

TOKEN = "trl-token"


class Length(RewardFunction):
    name = "length"

    def score(self, prompts, completions, **columns):
        labels = columns.get("label") or [0] * len(completions)
        return RewardOutput(scores=[len(p) + 10 * len(c) + y for p, c, y in zip(prompts, completions, labels)],
                            info=[{"columns": sorted(columns)} for _ in completions])


async def async_len(prompts, completions, **kwargs):
    await asyncio.sleep(0.3)
    return [float(len(c)) for c in completions]


async def async_twice(prompts, completions, **kwargs):
    await asyncio.sleep(0.3)
    return [2.0 * len(c) for c in completions]


def test_async_reward_is_awaited():
    assert CallableReward(async_len).score(["p", "q"], ["abc", "de"]).scores == [3.0, 2.0]


def test_several_async_rewards_run_concurrently():
    mix = RewardMixture([(async_len, 1.0), (async_twice, 1.0)])
    t0 = time.perf_counter()
    out = mix.score(["p"], ["abcd"])
    elapsed = time.perf_counter() - t0
    assert out.scores == [4.0 + 8.0]
    assert elapsed < 0.55, f"two 0.3 s rewards took {elapsed:.2f}s: run one after the other, not gathered"


def test_async_reward_inside_a_running_event_loop():
    async def main():
        return CallableReward(async_len).score(["p"], ["xy"]).scores

    assert asyncio.run(main()) == [2.0]


def test_log_metric_and_log_extra_reach_the_output():
    def fn(prompts, completions, log_metric, log_extra, **kwargs):
        log_metric("mean_len", sum(len(c) for c in completions) / len(completions))
        log_extra("judge", [c.upper() for c in completions])
        return [1.0] * len(completions)

    out = CallableReward(fn).score(["p", "q"], ["ab", "abcd"])
    assert out.metrics == {"mean_len": 3.0}
    assert [i["judge"] for i in out.info] == ["AB", "ABCD"]


def test_function_without_trl_keywords_is_not_handed_them():
    def fn(prompts, completions, completion_ids=None):
        return [float(len(c)) for c in completions]

    assert CallableReward(fn).score(["p"], ["abc"], completion_ids=[[1, 2, 3]]).scores == [3.0]


@pytest.fixture(scope="module")
def service():
    with ServerThread(create_app(Length(), token=TOKEN, max_batch_size=8, max_wait_ms=1)) as url:
        yield url


def test_remote_reward_inside_trl_grpo_trainer(service):
    """TRL's _calculate_rewards runs with a stand-in `self` holding only what that method reads."""
    from transformers import TrainerState
    from trl import GRPOTrainer

    remote = RemoteReward(service, token=TOKEN)
    logged = []
    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(device="cpu", is_main_process=True), args=SimpleNamespace(report_to=[]),
        reward_funcs=[remote], reward_processing_classes=[None], reward_func_names=["remote"],
        state=TrainerState(global_step=3, max_steps=10), environments=None,
        _log_completion_extra=lambda c, v: logged.append((c, v)), _log_metric=lambda n, v: logged.append((n, v)))
    inputs = [{"prompt": [{"role": "user", "content": "ab"}], "label": 1},
              {"prompt": [{"role": "user", "content": "xyz"}], "label": 2}]
    prompts = [x["prompt"] for x in inputs]
    completions = [[{"role": "assistant", "content": "c"}], [{"role": "assistant", "content": "dd"}]]
    rewards = GRPOTrainer._calculate_rewards(trainer, inputs, prompts, completions, [[5], [6, 7]])
    # score = len(prompt text) + 10 * len(completion text) + label; trainer_state / log_* never sent as columns
    assert rewards[:, 0].tolist() == [2 + 10 * 1 + 1, 3 + 10 * 2 + 2]
    assert remote.__name__ == "remote"  # what TRL's GRPOTrainer.__init__ reads to name (and log) the function


class LogsLength:
    """A picklable TRL-style reward that logs the batch's mean completion length and the global step."""

    __name__ = "logs_length"

    def __call__(self, prompts, completions, trainer_state, log_metric, **kwargs):
        log_metric("mean_len", sum(len(c) for c in completions) / len(completions))
        log_metric("step", float(trainer_state.global_step))
        return [1.0] * len(completions)


def test_logged_metrics_survive_the_reward_worker_and_shard_merge():
    """The Ray path: RewardWorker (with its sample-id cache) keeps them; shards average as TRL's processes do."""
    from align.backends.ray.dispatch import concat_outputs
    from align.rewards.trl_kwargs import RewardTrainerState
    from align.rewards.worker import RewardWorker

    worker = RewardWorker(LogsLength())
    state = RewardTrainerState(global_step=7)
    shards = [worker.score({"prompts": ["p"] * 2, "completions": ["ab", "abcd"], "sample_ids": [0, 1],
                            "columns": {"trainer_state": [state] * 2}}),
              worker.score({"prompts": ["p"], "completions": ["abcdef"], "sample_ids": [2],
                            "columns": {"trainer_state": [state]}})]
    assert [s.metrics for s in shards] == [{"mean_len": 3.0, "step": 7.0}, {"mean_len": 6.0, "step": 7.0}]
    assert concat_outputs(shards).metrics == {"mean_len": (3.0 + 6.0) / 2, "step": 7.0}


def chat_reward(prompts, completions, **kwargs):
    """A TRL-style reward hosted by the service: it reads message lists, as TRL hands them."""
    return [float(len(p[-1]["content"]) + 10 * len(c[0]["content"])) for p, c in zip(prompts, completions)]


def test_conversational_prompts_reach_a_served_trl_reward_as_messages():
    with ServerThread(create_app(chat_reward, token=TOKEN, max_batch_size=8, max_wait_ms=1)) as url:
        remote = RemoteReward(url, token=TOKEN)
        prompts = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}],
                   [{"role": "user", "content": "xyz"}]]
        completions = [[{"role": "assistant", "content": "c"}], [{"role": "assistant", "content": "dd"}]]
        # as TRL calls it: message-list prompts and completions; last user turn + 10 x completion length
        assert remote(prompts=prompts, completions=completions) == [2 + 10 * 1, 3 + 10 * 2]
        # as align's trainer calls it: rendered prompt text plus the messages as the context column
        out = remote.score(["system: be brief\nuser: ab\n", "user: xyz\n"], ["c", "dd"], prompt_messages=prompts)
        assert out.scores == [12.0, 23.0] and out.errors == [None, None]
