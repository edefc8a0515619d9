"""DAPO's over-long handling in the trainer: TRL's mask_truncated_completions (rows with stop reason "length"
get zero loss weight) and verl's soft over-long punishment (reward.overlong_buffer, added to the score), both
off by default; the stop reasons reach the reward functions."""
from __future__ import annotations

import pytest
import torch

import align
from align.config import config_from_dict
from align.errors import ConfigError
from align.rollouts.batch import STOP_EOS, STOP_LENGTH, STOP_STRING
from align.testing import tiny_run_config

MAX_NEW = 6


class CharSum:
    """A deterministic, varied score per completion; records the stop reasons it was given."""

    __name__ = "char_sum"

    def __init__(self):
        self.stop_reasons = []

    def __call__(self, prompts, completions, stop_reason, **kwargs):
        self.stop_reasons.append(list(stop_reason))
        return [(sum(map(ord, c)) % 13) / 13.0 for c in completions]


def config(model, data, tmp_path, algorithm="grpo", **sections):
    base = {"rollout": {"max_new_tokens": MAX_NEW}, "algo": {"group_size": 4} if algorithm == "grpo" else {},
            "train": {"micro_batch_size": 3, "device": "cpu"}}
    return tiny_run_config(algorithm, model, data, tmp_path / "run", CharSum(), base, **sections)


def test_defaults_are_off(tiny_model_path, arithmetic_data, tmp_path):
    for algorithm in ("grpo", "ppo"):
        cfg = config_from_dict(config(tiny_model_path, arithmetic_data["prompts"], tmp_path, algorithm))
        assert cfg.algo.mask_truncated_completions is False and cfg.reward.overlong_buffer.enable is False


@pytest.mark.parametrize("overlong, key", [
    ({"enable": True}, "reward.overlong_buffer.len"),
    ({"enable": True, "len": 2, "penalty_factor": -1.0}, "reward.overlong_buffer.penalty_factor"),
    ({"enable": True, "len": MAX_NEW + 1}, "reward.overlong_buffer.len"),
    ({"enable": True, "len": 2, "lenght": 3}, "reward.overlong_buffer.lenght"),
])
def test_overlong_config_errors(overlong, key, tiny_model_path, arithmetic_data, tmp_path):
    with pytest.raises(ConfigError) as err:
        config_from_dict(config(tiny_model_path, arithmetic_data["prompts"], tmp_path, reward={"overlong_buffer": overlong}))
    assert key in str(err.value) and "\n" not in str(err.value)


def reference_penalty(length: int, l_max: int, l_cache: int, factor: float) -> float:
    return 0.0 if length <= l_max - l_cache else ((l_max - l_cache) - length) / l_cache * factor


def test_overlong_penalty_is_added_to_the_score(tiny_model_path, arithmetic_data, tmp_path):
    l_cache, factor = 3, 0.5
    cfg = config(tiny_model_path, arithmetic_data["prompts"], tmp_path,
                 reward={"overlong_buffer": {"enable": True, "len": l_cache, "penalty_factor": factor}})
    trainer = align.Trainer(cfg)
    try:
        step, gen_metrics = trainer.phase_generate()
        lengths = [2, 3, 4, 5, 6, 1, 6, 4]  # every side of L_max - L_cache = 3
        for i, n in enumerate(lengths):
            step.batch.mask[i, n:] = 0
        step.batch.completions = trainer.engine.decode_responses(step.batch.response_ids, step.batch.mask)
        metrics = trainer.phase_score(step)
        raw = torch.tensor([(sum(map(ord, c)) % 13) / 13.0 for c in step.batch.completions], dtype=torch.float64)
        want = raw + torch.tensor([reference_penalty(n, MAX_NEW, l_cache, factor) for n in lengths], dtype=torch.float64)
        torch.testing.assert_close(step.scores.double(), want, rtol=0, atol=1e-6)
        assert metrics["reward/overlong_penalty"] == pytest.approx(
            sum(reference_penalty(n, MAX_NEW, l_cache, factor) for n in lengths) / len(lengths))
        assert metrics["reward/mean"] == pytest.approx(float(want.mean()), abs=1e-6)
        assert 0.0 <= gen_metrics["rollout/truncated"] <= 1.0
    finally:
        trainer.close()


def test_rewards_receive_the_batch_stop_reasons(tiny_model_path, arithmetic_data, tmp_path):
    cfg = config(tiny_model_path, arithmetic_data["prompts"], tmp_path)
    recorder = cfg["reward"]["functions"][0]
    trainer = align.Trainer(cfg)
    try:
        step, metrics = trainer.phase_generate()
        trainer.phase_score(step)
        reasons = step.batch.stop_reasons
        assert set(reasons) <= {"eos", "stop", "length"} and len(reasons) == 8
        assert metrics["rollout/truncated"] == pytest.approx(reasons.count("length") / 8)
        for i, r in enumerate(reasons):  # "length" rows are exactly max_new_tokens long
            assert (int(step.batch.mask[i].sum()) == MAX_NEW) if r == "length" else r == "eos"
        assert recorder.stop_reasons[-1] == reasons
    finally:
        trainer.close()


def grpo_update_loss(model, data, tmp_path, mask_truncated: bool, pattern: list[int]):
    """One GRPO step whose stop reasons are `pattern`; returns the logged policy loss, the step and its metrics."""
    cfg = config(model, data, tmp_path / str(mask_truncated),
                 algo={"group_size": 4, "mask_truncated_completions": mask_truncated})
    trainer = align.Trainer(cfg)
    try:
        step, _ = trainer.phase_generate()
        step.batch.stop_reason = torch.tensor(pattern)
        trainer.phase_score(step)
        trainer.phase_logprobs(step)
        adv_metrics = trainer.phase_advantages(step)
        update = trainer.phase_update(step)
        return update["loss/policy"], step, adv_metrics
    finally:
        trainer.close()


def test_mask_truncated_completions_gives_truncated_rows_zero_loss_weight(tiny_model_path, arithmetic_data, tmp_path):
    """One optimizer step per batch: the ratio is 1, so each token's clipped loss is -A_i and the token-mean loss is
    -sum_i w_i A_i n_i / sum_i w_i n_i with w_i = 0 for truncated rows (1 without the option)."""
    pattern = [STOP_LENGTH, STOP_EOS, STOP_LENGTH, STOP_STRING, STOP_EOS, STOP_LENGTH, STOP_LENGTH, STOP_EOS]
    truncated = [p == STOP_LENGTH for p in pattern]
    losses = {}
    for on in (False, True):
        loss, step, metrics = grpo_update_loss(tiny_model_path, arithmetic_data["prompts"], tmp_path, on, pattern)
        adv = step.advantages.double().tolist()
        n = step.mask.sum(-1).double().tolist()
        assert any(abs(a) > 1e-3 for a, t in zip(adv, truncated) if not t)
        w = [0.0 if (on and t) else 1.0 for t in truncated]
        want = -sum(wi * a * ni for wi, a, ni in zip(w, adv, n)) / sum(wi * ni for wi, ni in zip(w, n))
        assert loss == pytest.approx(want, abs=1e-6)
        assert metrics["train/samples"] == sum(w)
        assert step.train_rows.tolist() == [i for i, wi in enumerate(w) if wi]
        # the group statistics still see every row: advantages are those of all 8 scores
        ref = align.algos.group_advantages(step.scores, 4)
        torch.testing.assert_close(step.advantages, ref.float())
        losses[on] = loss
    assert losses[True] != pytest.approx(losses[False])


def test_mask_truncated_completions_with_ppo(tiny_model_path, arithmetic_data, tmp_path):
    cfg = config(tiny_model_path, arithmetic_data["prompts"], tmp_path, "ppo",
                 algo={"mask_truncated_completions": True}, train={"prompts_per_step": 4})
    trainer = align.Trainer(cfg)
    try:
        step, _ = trainer.phase_generate()
        step.batch.stop_reason = torch.tensor([STOP_LENGTH, STOP_EOS, STOP_EOS, STOP_LENGTH])
        trainer.phase_score(step)
        trainer.phase_logprobs(step)
        trainer.phase_advantages(step)
        assert step.train_rows.tolist() == [1, 2]
        assert "train/grad_norm" in trainer.phase_update(step)
    finally:
        trainer.close()
