"""GSPO (`algo.importance_level: sequence`) and the rollout importance-sampling corrections
(`algo.rollout_correction`) in the trainers: config validation with one-line errors, the loss hooks route to the
pure functions, and short GRPO / PPO runs log the new metrics. Defaults are off."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

import align
from align import algos
from align.config import GRPOAlgoConfig, PPOAlgoConfig, config_from_dict
from align.errors import AlignError, ConfigError
from align.testing import tiny_run_config
from align.trainer.forward import ForwardOutput
from align.trainer.grpo import GRPOAlgorithm
from align.trainer.ppo import PPOAlgorithm
from align.trainer.state import StepData

GSPO = {"importance_level": "sequence", "clip_low": 3e-4, "clip_high": 4e-4}


class CharSum:
    """A deterministic, varied score per completion."""

    __name__ = "char_sum"

    def __call__(self, prompts, completions, **kwargs):
        return [(sum(map(ord, c)) % 13) / 13.0 for c in completions]


def config(model, data, tmp_path, algorithm="grpo", **sections):
    base = {"rollout": {"max_new_tokens": 6}, "algo": {"group_size": 4} if algorithm == "grpo" else {},
            "train": {"steps": 2, "micro_batch_size": 3, "device": "cpu"}}
    return tiny_run_config(algorithm, model, data, tmp_path / "run", CharSum(), base, **sections)


# ------------------------------------------------------------------------------------------------ config


def test_defaults_are_off():
    for cls in (GRPOAlgoConfig, PPOAlgoConfig):
        cfg = cls()
        assert cfg.importance_level == "token" and cfg.rollout_correction.mode == "none"
    assert GRPOAlgorithm(GRPOAlgoConfig()).surrogate is algos.policy_loss
    assert GRPOAlgorithm(GRPOAlgoConfig(**GSPO)).surrogate is algos.gspo_policy_loss
    assert PPOAlgorithm(PPOAlgoConfig(**GSPO)).surrogate is algos.gspo_policy_loss


def test_correction_bounds_defaults():
    def bounds(**kw):
        return GRPOAlgoConfig(rollout_correction=kw).rollout_correction.bounds()

    assert bounds(mode="token_tis") == {"cap": 2.0, "lo": 1 / 3.0, "hi": 3.0}
    assert bounds(mode="token_tis", cap=5)["cap"] == 5.0
    assert bounds(mode="seq_mis") == {"cap": 2.0, "lo": 1 / 3.0, "hi": 3.0}
    assert bounds(mode="seq_mis", lo=0, hi=2)["lo"] == 0.0
    assert bounds(mode="seq_mis_geo") == {"cap": 2.0, "lo": 1 / 1.001, "hi": 1.001}


@pytest.mark.parametrize("algo, rollout, key", [
    ({"importance_level": "sequence"}, {}, "algo.clip_low"),  # the token-level 0.2 default
    ({"importance_level": "sequence", "clip_low": 3e-4}, {}, "algo.clip_high"),
    ({**GSPO, "dual_clip": 3.0}, {}, "algo.dual_clip"),
    ({"importance_level": "sequences"}, {}, "algo.importance_level"),
    ({"rollout_correction": {"mode": "tis"}}, {}, "algo.rollout_correction.mode"),
    ({"rollout_correction": {"mode": "token_tis", "cap": 0.5}}, {}, "algo.rollout_correction.cap"),
    ({"rollout_correction": {"mode": "token_tis", "hi": 2.0}}, {}, "algo.rollout_correction.hi"),
    ({"rollout_correction": {"mode": "seq_mis", "cap": 2.0}}, {}, "algo.rollout_correction.cap"),
    ({"rollout_correction": {"mode": "seq_mis", "hi": 0.9}}, {}, "algo.rollout_correction.hi"),
    ({"rollout_correction": {"mode": "seq_mis_geo", "lo": 1.2}}, {}, "algo.rollout_correction.lo"),
    ({"rollout_correction": {"mode": "seq_mis", "cutoff": 2}}, {}, "algo.rollout_correction.cutoff"),
    ({"rollout_correction": {"mode": "token_tis"}}, {"temperature": 0.7}, "rollout.temperature"),
    ({"rollout_correction": {"mode": "seq_mis"}}, {"temperature": 0.0}, "rollout.temperature"),
    ({"rollout_correction": {"mode": "seq_mis"}}, {"use_rollout_logprobs": True}, "rollout.use_rollout_logprobs"),
])
@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_config_errors_are_one_line(algo, rollout, key, algorithm, tmp_path):
    cfg = config("m", "d", tmp_path, algorithm, algo=algo, rollout=rollout)
    with pytest.raises(ConfigError) as err:
        config_from_dict(cfg)
    assert isinstance(err.value, AlignError)
    assert key in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_valid_configs_load(tmp_path):
    for algo in (GSPO, {"rollout_correction": {"mode": "token_tis", "cap": 3}},
                 {"rollout_correction": {"mode": "seq_mis", "lo": 0, "hi": 3}},
                 {"rollout_correction": {"mode": "seq_mis_geo", "lo": 0.999, "hi": 1.001}},
                 {"rollout_correction": {"mode": "none", "cap": 2}}):  # mode none ignores the bounds
        for algorithm in ("grpo", "ppo"):
            config_from_dict(config("m", "d", tmp_path, algorithm, algo=algo))


# ------------------------------------------------------------------------------------------------ loss hooks


def _step_and_forward(seed: int, algorithm: str):
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.float64)
    old = -torch.rand(4, 4, generator=g, dtype=torch.float64) - 0.1
    logp = (old + torch.randn(4, 4, generator=g, dtype=torch.float64) * 1e-5).requires_grad_(True)  # inside every clip range
    step = StepData(batch=SimpleNamespace(mask=mask))
    step.advantages = torch.randn(4, 4, generator=g, dtype=torch.float64) if algorithm == "ppo" else \
        torch.randn(4, generator=g, dtype=torch.float64)
    return step, ForwardOutput(logprobs=logp), old


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_loss_hooks_use_the_pure_functions_with_the_rollout_weights(algorithm, level):
    step, fwd, old = _step_and_forward(1, algorithm)
    extra = GSPO if level == "sequence" else {}
    cfg = (GRPOAlgoConfig(**extra) if algorithm == "grpo" else PPOAlgoConfig(kl_coef=0.0, **extra))
    algo = GRPOAlgorithm(cfg) if algorithm == "grpo" else PPOAlgorithm(cfg)
    fn = algos.gspo_policy_loss if level == "sequence" else algos.policy_loss
    rows = torch.arange(4)
    denom = float(step.mask.sum())
    step.rollout_weights = torch.tensor([[0.5, 2.0, 1.0, 0.0], [0.0] * 4, [1.5, 0, 0, 0], [1.0, 0.7, 0, 0]],
                                        dtype=torch.float64)  # row 1 masked out (seq_mis would give this)
    for weights in (None, step.rollout_weights):
        step.rollout_weights = weights
        loss, metrics = algo.loss(fwd, step, rows, old, denom, vf_denom=denom)
        want, _ = fn(fwd.logprobs, old, step.advantages, step.mask, cfg.clip_low, cfg.clip_high, cfg.dual_clip,
                     cfg.loss_agg, global_denom=denom, weights=weights)
        assert loss.item() == pytest.approx(want.item(), rel=1e-12)
        (grad,) = torch.autograd.grad(loss, fwd.logprobs)
        if weights is not None:
            assert (grad[1] == 0).all() and (grad[0, 3] == 0)  # zero weight: no gradient
        else:
            assert (grad[1] != 0).any()
        if level == "sequence":
            assert "policy/seq_ratio_mean" in metrics


# ------------------------------------------------------------------------------------------------ runs


def _history(tmp_path):
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_grpo_gspo_run_logs_sequence_ratio(tiny_model_path, arithmetic_data, tmp_path):
    result = align.train(config(tiny_model_path, arithmetic_data["prompts"], tmp_path, algo={**GSPO, "epochs": 2}))
    assert len(result.history) == 2
    for step in result.history:
        assert math.isfinite(step["loss/policy"]) and math.isfinite(step["train/grad_norm"])
        # two epochs: the second sees a changed policy, so the sequence ratio moves off 1 (and may clip)
        assert 0.5 < step["policy/seq_ratio_mean"] < 2.0
        assert 0.0 <= step["policy/clipfrac"] <= 1.0
    assert all("policy/seq_ratio_mean" in line for line in _history(tmp_path))


@pytest.mark.parametrize("mode, share", [("token_tis", "capped_share"), ("seq_mis", "masked_share"),
                                         ("seq_mis_geo", "masked_share")])
def test_grpo_run_with_a_rollout_correction_logs_its_metrics(mode, share, tiny_model_path, arithmetic_data, tmp_path):
    result = align.train(config(tiny_model_path, arithmetic_data["prompts"], tmp_path,
                                algo={"rollout_correction": {"mode": mode}}))
    assert len(result.history) == 2
    for step in result.history:
        # the same fp32 weights on the CPU: the engines agree to ~1e-6 per token, nothing is capped or masked
        assert 0.0 <= step["rollout_corr/kl_k3"] < 1e-6
        for key in ("ratio_p50", "ratio_p95", "ratio_max", "ratio_min", "weight_mean"):
            assert step[f"rollout_corr/{key}"] == pytest.approx(1.0, abs=1e-3), key
        assert step[f"rollout_corr/{share}"] == 0.0
        assert "rollout/logprob_diff_max" in step  # the trainer's old log-probs were computed
        assert math.isfinite(step["loss/policy"]) and math.isfinite(step["train/grad_norm"])
    assert all(f"rollout_corr/{share}" in line for line in _history(tmp_path))


def test_ppo_run_with_token_tis_and_gspo(tiny_model_path, arithmetic_data, tmp_path):
    result = align.train(config(tiny_model_path, arithmetic_data["prompts"], tmp_path, "ppo",
                                algo={**GSPO, "rollout_correction": {"mode": "token_tis", "cap": 2.0}},
                                train={"prompts_per_step": 4}))
    assert len(result.history) == 2
    for step in result.history:
        assert step["rollout_corr/ratio_max"] == pytest.approx(1.0, abs=1e-3)
        assert "policy/seq_ratio_mean" in step and math.isfinite(step["loss/value"])


def test_default_run_logs_no_new_metrics(tiny_model_path, arithmetic_data, tmp_path):
    result = align.train(config(tiny_model_path, arithmetic_data["prompts"], tmp_path, train={"steps": 1}))
    (step,) = result.history
    assert not any(k.startswith("rollout_corr/") for k in step) and "policy/seq_ratio_mean" not in step
