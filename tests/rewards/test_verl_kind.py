"""verl's compute_score(data_source, solution_str, ground_truth, extra_info) as a reward: listed directly in
reward.functions (recognised by its signature) or as the documented `verl` kind naming a file or module."""
from __future__ import annotations

import json

import pytest

import align
from align.errors import UserError
from align.rewards.registry import get_reward
from align.testing import tiny_run_config

CALLS: list[tuple] = []


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    CALLS.append((data_source, solution_str, ground_truth, extra_info))
    return {"score": float(solution_str.strip() == ground_truth), "source": data_source}


def test_plain_compute_score_is_scored_the_verl_way():
    reward = get_reward(compute_score)
    out = reward.score(["p", "q"], ["4", " 5"], data_source=["gsm8k", "math"],
                       reward_model=[{"ground_truth": "4", "style": "rule"}, {"ground_truth": "6", "style": "rule"}],
                       extra_info=[{"index": 0}, {"index": 1}])
    assert out.scores == [1.0, 0.0]
    assert [i["source"] for i in out.info] == ["gsm8k", "math"]


def test_verl_kind_loads_a_file(tmp_path):
    (tmp_path / "my_reward.py").write_text(
        "def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
        "    return 2.0 if solution_str == ground_truth else -1.0\n")
    reward = get_reward({"name": "verl", "kwargs": {"compute_score": f"{tmp_path / 'my_reward.py'}:compute_score"}})
    assert reward.score(["", ""], ["a", "b"], ground_truth=["a", "a"]).scores == [2.0, -1.0]
    with pytest.raises(UserError, match="does not exist"):
        get_reward({"name": "verl", "kwargs": {"compute_score": f"{tmp_path / 'nope.py'}:compute_score"}})


def test_compute_score_in_a_training_run(tiny_model_path, tmp_path):
    rows = [{"prompt": f"{i}+0=", "data_source": "toy", "reward_model": {"ground_truth": str(i)},
             "extra_info": {"index": i}} for i in range(4)]
    (tmp_path / "verl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    CALLS.clear()
    cfg = tiny_run_config("grpo", tiny_model_path, tmp_path / "verl.jsonl", tmp_path / "run", compute_score,
                          algo={"group_size": 2})
    align.train(cfg)
    assert len(CALLS) == 4 and {c[0] for c in CALLS} == {"toy"}
    assert all(c[2] == str(c[3]["index"]) for c in CALLS)  # each sample's own ground truth and extra_info
