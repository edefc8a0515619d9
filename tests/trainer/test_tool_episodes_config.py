"""Tool episodes reached from the config: rollout.tools / environment / tool_format keys, the local backend's
generate phase running episodes (tool_mask and the trajectory column reach the reward), and refusals."""
from __future__ import annotations

import pytest

import align
from align.errors import ConfigError
from align.testing import tiny_run_config


class SeesTrajectory:
    __name__ = "sees_trajectory"

    def __init__(self):
        self.seen = []

    def __call__(self, prompts, completions, **kwargs):
        # **kwargs, not a `trajectory` parameter: reward set-up checks named parameters against the data's
        # columns before any rollout (the trainer side declares the trajectory column)
        self.seen.append(kwargs["trajectory"])
        return [float(len(t)) for t in kwargs["trajectory"]]


def test_generate_phase_runs_episodes(tiny_model_path, arithmetic_data, tmp_path):
    reward = SeesTrajectory()
    cfg = tiny_run_config("grpo", tiny_model_path, arithmetic_data["prompts"], tmp_path / "a", reward,
                          rollout={"max_new_tokens": 6, "tools": ["calculator"], "tool_chat_template": "tiny",
                                   "max_turns": 2}, algo={"group_size": 2})
    t = align.Trainer(cfg)
    try:
        step, _ = t.phase_generate()
        b = step.batch
        assert b.tool_mask is not None and b.tool_mask.shape == b.mask.shape
        traj = b.columns["trajectory"]
        assert len(traj) == len(b) and all(m[0]["role"] == "assistant" for m in traj)
        # the first assistant message of a turn without a call is the completion's text
        for m, c, tm in zip(traj, b.completions, b.tool_mask):
            if not tm.any():
                assert len(m) == 1 and m[0]["content"] == c.strip()
        t.phase_score(step)
        assert reward.seen and reward.seen[-1] == traj
    finally:
        t.close()


@pytest.mark.parametrize("rollout, match", [
    ({"tools": ["calculator"], "environment": "m:C"}, "not both"),
    ({"environment": "nocolon"}, "module:Class"),
    ({"max_turns": 0}, "max_turns"),
    ({"tool_timeout_s": 0}, "tool_timeout_s"),
])
def test_config_refusals(tiny_model_path, arithmetic_data, tmp_path, rollout, match):
    cfg = tiny_run_config("grpo", tiny_model_path, arithmetic_data["prompts"], tmp_path / "a", SeesTrajectory(),
                          rollout=rollout)
    with pytest.raises(ConfigError, match=match):
        align.Trainer(cfg)


def test_environment_that_cannot_load_and_partial_refusal(tiny_model_path, arithmetic_data, tmp_path):
    cfg = tiny_run_config("grpo", tiny_model_path, arithmetic_data["prompts"], tmp_path / "a", SeesTrajectory(),
                          rollout={"environment": "align.no_such_module:Env"})
    with pytest.raises(ConfigError, match="cannot be loaded"):
        align.Trainer(cfg)
    cfg = tiny_run_config("grpo", tiny_model_path, arithmetic_data["prompts"], tmp_path / "b", SeesTrajectory(),
                          rollout={"tools": ["calculator"], "partial": True}, train={"max_staleness": 1})
    with pytest.raises(ConfigError, match="without rollout.partial"):
        align.Trainer(cfg)
