"""align.train(cfg, dataset=...), a verl parquet run, and start-up checks of each reward's columns (items 1, 5)."""
from __future__ import annotations

import json

import pytest

import align
from align.errors import ConfigError, UserError
from align.testing import tiny_run_config
from align.trainer.loop import Trainer


class Recorder:
    """A TRL-style reward that records the columns it was given."""

    __name__ = "recorder"

    def __init__(self):
        self.seen: list[dict] = []

    def __call__(self, prompts, completions, **columns):
        self.seen.append(columns)
        return [float(len(c)) for c in completions]


def rows(data):
    return [json.loads(line) for line in data["prompts"].read_text().splitlines()]


def test_train_takes_a_dataset_object(tiny_model_path, arithmetic_data, tmp_path):
    import datasets

    reward = Recorder()
    cfg = tiny_run_config("grpo", tiny_model_path, "<unset>", tmp_path / "run", reward)
    del cfg["data"]
    ds = datasets.Dataset.from_list(rows(arithmetic_data))
    result = align.train(cfg | {"checkpoint": {"save_final": True}}, dataset=ds)
    assert len(result.history) == 1
    answers = {r["answer"] for r in rows(arithmetic_data)}
    assert reward.seen and set(reward.seen[0]["answer"]) <= answers  # the dataset's columns reached the reward
    saved = json.loads((result.checkpoint / "align_config.json").read_text())
    assert saved["data"]["path"] == "<dataset argument>"  # says where the data came from, never a repr
    streamed = align.train(cfg | {"logging": {**cfg["logging"], "run_dir": str(tmp_path / "run2")}},
                           dataset=ds.to_iterable_dataset())
    assert len(streamed.history) == 1


def test_data_given_once(tiny_model_path, arithmetic_data, tmp_path):
    import datasets

    cfg = tiny_run_config("grpo", tiny_model_path, arithmetic_data["prompts"], tmp_path / "run", Recorder())
    with pytest.raises(ConfigError, match="align.train got dataset= too; give the data once"):
        Trainer(cfg, dataset=datasets.Dataset.from_list(rows(arithmetic_data)))
    del cfg["data"]
    with pytest.raises(ConfigError, match=r"data.path is required \(or pass align.train\(config, dataset=...\)\)"):
        Trainer(cfg)


def test_verl_parquet_trains_with_math_verify(tiny_model_path, tmp_path):
    """verl's layout unchanged: message-list prompts, reward_model.ground_truth scored by math_verify (the
    parquet reading itself: tests/core/test_data_sources.py)."""
    recs = [{"data_source": "toy", "prompt": [{"role": "user", "content": f"{i}+{i}="}], "ability": "math",
             "reward_model": {"style": "rule", "ground_truth": str(2 * i)}, "extra_info": {"index": i}}
            for i in range(4)]
    import datasets

    # a save_to_disk folder (read before this change too), so only the column layout is under test here
    datasets.Dataset.from_list(recs).save_to_disk(str(tmp_path / "verl"))
    cfg = tiny_run_config("grpo", tiny_model_path, tmp_path / "verl", tmp_path / "run", "math_verify")
    trainer = Trainer(cfg)
    try:
        step = trainer.train()
    finally:
        trainer.close()
    # every sample had a reference answer (pre-fix: 'needs a label / answer / ground_truth column' at step 1)
    assert step.history[0]["reward/errors"] == 0 and step.history[0]["reward/not_applicable"] == 0
    from align.rewards.verifiers.math_verify import MathVerify

    out = MathVerify().score(["p"] * 2, ["\\boxed{4}", "\\boxed{5}"], ground_truth=[r["ground_truth"] for r in trainer.dataset.records[2:4]])
    assert out.scores == [1.0, 0.0]


@pytest.mark.parametrize("reward, need", [("math_verify", "'label' / 'answer' / 'ground_truth'"),
                                          ("code_tests", "'tests' / 'test_list'")])
def test_missing_reward_column_fails_at_start_up(reward, need, tiny_model_path, tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"prompt": f"{i}+1=", "question": "q"}) + "\n" for i in range(4)))
    cfg = tiny_run_config("grpo", tiny_model_path, tmp_path / "d.jsonl", tmp_path / "run", reward)
    with pytest.raises(UserError) as err:
        Trainer(cfg)
    msg = str(err.value)
    assert msg == (f"reward {reward!r} needs a {need} column; the data has prompt, question: add the column to "
                   "the data (or rename one to it)")


def test_callable_reward_needing_a_column(tiny_model_path, tmp_path):
    def needs_tests(prompts, completions, tests, trainer_state=None, **kw):
        return [0.0] * len(completions)

    def optional(prompts, completions, tests=None, completion_ids=None, **kw):
        return [0.0] * len(completions)

    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": "1"}) + "\n" for i in range(4)))
    cfg = tiny_run_config("grpo", tiny_model_path, tmp_path / "d.jsonl", tmp_path / "run", needs_tests)
    with pytest.raises(UserError, match=r"^reward 'needs_tests' needs a 'tests' column; the data has answer, prompt:"):
        Trainer(cfg)
    Trainer(tiny_run_config("grpo", tiny_model_path, tmp_path / "d.jsonl", tmp_path / "run2", optional)).close()
