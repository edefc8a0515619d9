"""Tool episodes on Ray rollout workers (`cluster.backend: ray`) against the local backend: one GRPO step each,
same seed, the calculator tool (GRPO on one rollout worker, PPO on two); the trained batch's response ids, tool mask and trajectory are identical and
the reward (scored on a reward actor) received the trajectory.

The policy is forced (as in tests/rollouts/test_episodes.py): a forward hook on the rollout model makes every
row write a calculator call first and the answer after one tool response, whatever the random weights say.
"""
from __future__ import annotations

import json
import sys

import pytest
import torch

import align

ray = pytest.importorskip("ray")
from _ray_local import local_ray  # noqa: E402
from ray import cloudpickle  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(120)]
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the hook and reward ship to the actors by value

CALL = "<tool_call>" + json.dumps({"name": "calculator", "arguments": {"input": "12*34"}}) + "</tool_call>"
TURNS = [CALL, " 408"]


class Forced:
    """Forward hook: a row whose input holds k tool responses is forced to write TURNS[k] (then EOS)."""

    def __init__(self, tok):
        self.tok, self.targets = tok, []

    def __call__(self, module, args, kwargs, output):
        ids = kwargs.get("input_ids")
        if ids is None:
            return output
        if ids.shape[1] > 1:  # prefill: one target per row, then one token per forward
            pad = self.tok.pad_token_id
            real = [r[(r != pad).nonzero()[0, 0]:].tolist() if (r != pad).any() else [] for r in ids]
            targets = []
            for r in real:
                k = self.tok.decode(r, skip_special_tokens=False).count("</tool_response>")
                turn = self.tok(TURNS[k], add_special_tokens=False).input_ids if k < len(TURNS) else []
                targets.append([*turn, self.tok.eos_token_id][::-1])
            self.targets = targets
        if len(self.targets) != ids.shape[0]:  # a teacher-forced training pass: leave it alone
            return output
        nxt = [t.pop() if len(t) > 1 else t[0] for t in self.targets]
        logits = torch.full_like(output.logits[:, -1], -1e9)
        logits[torch.arange(len(nxt)), torch.tensor(nxt)] = 0.0
        output.logits[:, -1] = logits
        return output


def install(worker):  # runs inside the rollout actor (`__ray_call__`)
    worker.model.register_forward_hook(Forced(worker.tokenizer), with_kwargs=True)
    return True


def traj_score(trajectory) -> float:
    """Written out: messages + 1/100 per character of tool output."""
    return len(trajectory) + sum(len(m["content"]) for m in trajectory if m["role"] == "tool") / 100


class TrajReward:
    __name__ = "traj_reward"

    def __call__(self, prompts, completions, **kwargs):
        return [traj_score(t) for t in kwargs["trajectory"]]


@pytest.fixture(scope="module")
def ray_local():
    yield from local_ray(num_cpus=3)


def one_step(model, data, run_dir, backend, algorithm="grpo", workers=1):
    cfg = {
        "algorithm": algorithm, "model": {"path": str(model)}, "data": {"path": str(data)},
        "reward": {"functions": [TrajReward()]},
        "rollout": {"max_new_tokens": 160, "temperature": 1.0, "micro_batch_size": 2, "tools": ["calculator"],
                    "tool_chat_template": "tiny", "max_turns": 3},
        "train": {"steps": 1, "prompts_per_step": 2, "micro_batch_size": 4, "lr": 1e-2, "seed": 3},
        "algo": {"group_size": 2} if algorithm == "grpo" else {"epochs": 1},
        "cluster": {"backend": backend, "num_rollout_workers": workers, "num_reward_workers": 1,
                    "rollout_num_cpus": 1, "reward_num_cpus": 0.5},
        "logging": {"run_dir": str(run_dir), "progress": False, "print_every": 0},
        "checkpoint": {"save_final": False},
    }
    t = align.Trainer(cfg)
    seen = {}
    try:
        if backend == "ray":
            assert t.backend.remote_reward  # scored on the reward actor, from the worker's payload
            assert ray.get([a.__ray_call__.remote(install) for a in t.backend.rollout_actors]) == [True] * workers
        else:
            t.models.policy.register_forward_hook(Forced(t.engine.tokenizer), with_kwargs=True)
        score = t.phase_score

        def spy(step):
            out = score(step)
            seen["batch"], seen["scores"] = step.batch, step.scores.tolist()
            return out

        t.phase_score = spy
        metrics = t.train_step()
        assert all(v == v for v in metrics.values() if isinstance(v, float))  # the step completed, no NaN
    finally:
        t.close()
    return seen


@pytest.mark.parametrize("algorithm,workers", [("grpo", 1), pytest.param("ppo", 2, marks=pytest.mark.slow)])
def test_ray_tool_episodes_match_local(ray_local, tiny_model_path, arithmetic_data, tmp_path, algorithm, workers):
    """GRPO on one rollout worker; PPO (value head, GAE over the observation holes) with the rows split over two."""
    data = arithmetic_data["prompts"]
    local = one_step(tiny_model_path, data, tmp_path / "local", "local", algorithm)
    remote = one_step(tiny_model_path, data, tmp_path / "ray", "ray", algorithm, workers)
    a, b = local["batch"], remote["batch"]
    assert a.tool_mask is not None and b.tool_mask is not None
    assert a.tool_mask.any(dim=1).all()  # every row made the call and got an observation
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.mask, b.mask)
    assert torch.equal(a.tool_mask, b.tool_mask)
    assert a.columns["trajectory"] == b.columns["trajectory"]
    for traj in b.columns["trajectory"]:  # the calculator really ran on the worker
        assert [m["role"] for m in traj] == ["assistant", "tool", "assistant"] and "408" in traj[1]["content"]
    # the reward received each row's trajectory (brute force from the trained batch)
    expect = [traj_score(t) for t in b.columns["trajectory"]]
    assert remote["scores"] == pytest.approx(expect) and local["scores"] == pytest.approx(expect)
