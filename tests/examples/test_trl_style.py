"""examples/trl_style.py: a TRL-style script (a Dataset of chat prompts, TRL reward functions reading
c[0]["content"] and trainer_state, LoRA) runs with align.train."""
from __future__ import annotations

import trl_style  # examples/ (tests/conftest.py puts it on sys.path)


def test_trl_reward_functions_by_hand():
    done = [[{"role": "assistant", "content": "7 is it"}], [{"role": "assistant", "content": "8"}]]
    assert trl_style.correctness_reward(done, answer=["7", "9"]) == [1.0, 0.0]

    class State:  # transformers' TrainerState fields the function reads
        global_step, max_steps = 5, 10

    # weight 5 / 10 = 0.5; lengths 7 and 1: -0.01 * 0.5 * 7 = -0.035, -0.005
    assert trl_style.brevity_reward(done, trainer_state=State()) == [-0.035, -0.005]


def test_the_script_runs_with_align_train(tmp_path, monkeypatch):
    calls = []

    def record(fn):
        def wrapped(prompts, completions, **kwargs):
            calls.append({"fn": fn.__name__, "prompts": prompts, "completions": completions, **kwargs})
            return fn(prompts=prompts, completions=completions, **kwargs)  # by keyword, as TRL calls them
        wrapped.__name__ = fn.__name__
        return wrapped

    for name in ("correctness_reward", "brevity_reward"):
        monkeypatch.setattr(trl_style, name, record(getattr(trl_style, name)))
    result = trl_style.main(["--tiny", "--out", str(tmp_path / "run"), "--steps", "2"])
    assert len(result.history) == 2
    assert sorted(c["fn"] for c in calls) == ["brevity_reward"] * 2 + ["correctness_reward"] * 2
    for c in calls:
        assert all(p[0]["role"] == "system" and p[1]["role"] == "user" for p in c["prompts"])  # the messages
        assert all(m[0]["role"] == "assistant" and isinstance(m[0]["content"], str) for m in c["completions"])
        assert c["trainer_state"].max_steps == 2 and len(c["answer"]) == len(c["completions"]) == 4
    assert [c["trainer_state"].global_step for c in calls if c["fn"] == "brevity_reward"] == [0, 1]
    # TRL's peft_config: the final checkpoint is a peft adapter directory, not full weights
    assert (result.checkpoint / "adapter_config.json").is_file()
    assert not (result.checkpoint / "model.safetensors").exists()
