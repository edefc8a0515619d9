"""DAPO dynamic sampling (algo.dynamic_sampling): refill until train.prompts_per_step groups have non-zero score
variance, bounded by max_rounds; rounds used and groups kept / dropped / missing in the metrics; never a
zero-variance group in the update; when none survives the update is skipped (train/skipped). Off by default."""
from __future__ import annotations

import json

import pytest
import torch

import align
from align.config import config_from_dict
from align.errors import ConfigError
from align.testing import tiny_run_config

G, PROMPTS = 2, 2


def mod3(prompts, completions, **kwargs):
    """Deterministic 0/1 scores: with G = 2 about 5 groups in 9 have zero variance."""
    return [float(sum(map(ord, c)) % 3 == 0) for c in completions]


def constant(prompts, completions, **kwargs):
    return [1.0 for _ in completions]


def config(model, data, tmp_path, reward=mod3, algorithm="grpo", **algo):
    return tiny_run_config(algorithm, model, data, tmp_path / "run", reward, rollout={"max_new_tokens": 3},
                           algo={"group_size": G, **algo} if algorithm == "grpo" else algo,
                           train={"steps": 3, "prompts_per_step": PROMPTS, "device": "cpu"})


def test_off_by_default(tiny_model_path, arithmetic_data, tmp_path):
    cfg = config_from_dict(config(tiny_model_path, arithmetic_data["prompts"], tmp_path))
    assert cfg.algo.dynamic_sampling.enable is False and cfg.algo.dynamic_sampling.max_rounds == 4


@pytest.mark.parametrize("ds, key", [
    ({"enable": True, "max_rounds": 0}, "algo.dynamic_sampling.max_rounds"),
    ({"enable": True, "max_rounds": -2}, "algo.dynamic_sampling.max_rounds"),
    ({"enabled": True}, "algo.dynamic_sampling.enabled"),
])
def test_config_errors(ds, key, tiny_model_path, arithmetic_data, tmp_path):
    with pytest.raises(ConfigError) as err:
        config_from_dict(config(tiny_model_path, arithmetic_data["prompts"], tmp_path, dynamic_sampling=ds))
    assert key in str(err.value) and "\n" not in str(err.value)


def test_ppo_has_no_dynamic_sampling(tiny_model_path, arithmetic_data, tmp_path):
    with pytest.raises(ConfigError) as err:
        config_from_dict(config(tiny_model_path, arithmetic_data["prompts"], tmp_path, algorithm="ppo",
                                dynamic_sampling={"enable": True}))
    assert "dynamic_sampling" in str(err.value) and "\n" not in str(err.value)


def run_with_spy(cfg):
    """Train; record the scores of every group that enters the update (a spy on the advantages phase)."""
    trainer = align.Trainer(cfg)
    trained = []
    phase = trainer.phase_advantages

    def spy(step):
        out = phase(step)
        rows = step.train_rows.tolist()
        trained.append({"rows": rows, "n": len(step.batch),
                        "groups": {r // G: [float(step.scores[q]) for q in range(r // G * G, r // G * G + G)] for r in rows}})
        return out

    trainer.phase_advantages = spy
    try:
        result = trainer.train()
    finally:
        trainer.close()
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return result, trained, lines


def test_refills_until_every_group_has_signal(tiny_model_path, arithmetic_data, tmp_path):
    cfg = config(tiny_model_path, arithmetic_data["prompts"], tmp_path, dynamic_sampling={"enable": True, "max_rounds": 16})
    result, trained, lines = run_with_spy(cfg)
    assert len(lines) == 3 and all("rollout/dynamic_rounds" in m for m in lines)
    assert max(m["rollout/dynamic_rounds"] for m in lines) > 1  # the filter dropped groups and the loop refilled
    for m, t in zip(lines, trained):
        assert m["rollout/dynamic_short"] == 0.0 and m["rollout/dynamic_groups_kept"] == PROMPTS
        assert m["rollout/dynamic_groups_dropped"] == m["rollout/dynamic_rounds"] * PROMPTS - PROMPTS
        assert 0 < m["rollout/dynamic_groups_zero_variance"] <= m["rollout/dynamic_groups_dropped"] or \
            m["rollout/dynamic_rounds"] == 1.0
        assert t["n"] == PROMPTS * G and len(t["rows"]) == PROMPTS * G  # constant batch size, surplus dropped
        for scores in t["groups"].values():
            assert max(scores) > min(scores)  # never a zero-variance group in the update
        assert m["grpo/zero_variance_groups"] == 0.0 and "train/skipped" not in m


def test_bound_hit_with_constant_reward_skips_the_update(tiny_model_path, arithmetic_data, tmp_path):
    cfg = config(tiny_model_path, arithmetic_data["prompts"], tmp_path, reward=constant,
                 dynamic_sampling={"enable": True, "max_rounds": 3})
    trainer_cfg = config_from_dict(cfg)
    result, trained, lines = run_with_spy(trainer_cfg)
    for m, t in zip(lines, trained):
        assert m["rollout/dynamic_rounds"] == 3.0 and m["rollout/dynamic_short"] == 1.0
        assert m["rollout/dynamic_groups_kept"] == 0.0 and m["rollout/dynamic_groups_missing"] == PROMPTS
        assert m["rollout/dynamic_groups_dropped"] == m["rollout/dynamic_groups_zero_variance"] == 3 * PROMPTS
        assert m["train/skipped"] == 1.0 and m["train/samples"] == 0.0 and t["rows"] == []


def test_short_step_trains_on_what_it_has(tiny_model_path, arithmetic_data, tmp_path):
    cfg = config(tiny_model_path, arithmetic_data["prompts"], tmp_path, dynamic_sampling={"enable": True, "max_rounds": 1})
    cfg["train"]["steps"] = 4
    result, trained, lines = run_with_spy(cfg)
    assert all(m["rollout/dynamic_rounds"] == 1.0 for m in lines)
    for m, t in zip(lines, trained):
        kept = int(m["rollout/dynamic_groups_kept"])
        assert m["rollout/dynamic_short"] == float(kept < PROMPTS)
        assert m["rollout/dynamic_groups_missing"] == PROMPTS - kept and len(t["rows"]) == kept * G
        for scores in t["groups"].values():
            assert max(scores) > min(scores)


def test_off_logs_no_dynamic_metrics(tiny_model_path, arithmetic_data, tmp_path):
    cfg = config(tiny_model_path, arithmetic_data["prompts"], tmp_path)
    cfg["train"]["steps"] = 1
    _, trained, lines = run_with_spy(cfg)
    assert not any(k.startswith("rollout/dynamic") or k == "time/refill" for k in lines[0])
    assert trained[0]["n"] == PROMPTS * G and torch.tensor(len(trained[0]["rows"])) == PROMPTS * G
