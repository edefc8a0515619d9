"""The 0.2.0 RL-math options through the real loop on the tiny model: token-level `reinforce_pp` advantages and
Dr. GRPO's constant normaliser under gradient accumulation (micro-batches of 2 and 8 take the same step)."""
from __future__ import annotations

import pytest
import torch

import align
from align.testing import tiny_run_config


def frac_sevens(prompts, completions, **kwargs):
    return [sum(c == "7" for c in s) / max(len(s), 1) for s in completions]


def config(model, data, run_dir, **algo):
    return tiny_run_config("grpo", model, data, run_dir, frac_sevens, rollout={"max_new_tokens": 6},
                           algo={"group_size": 4, **algo}, train={"prompts_per_step": 4, "lr": 3e-3})


def test_reinforce_pp_token_advantages_reach_the_update(tiny_model_path, arithmetic_data, tmp_path):
    trainer = align.Trainer(config(tiny_model_path, arithmetic_data["prompts"], tmp_path / "run",
                                   advantage="reinforce_pp"))
    step, _ = trainer.phase_generate()
    trainer.phase_score(step)
    trainer.phase_logprobs(step)
    metrics = trainer.phase_advantages(step)
    assert step.advantages.shape == step.mask.shape
    assert (step.advantages[~step.mask.bool()] == 0).all()
    assert metrics["advantages/abs_mean"] > 0
    out = trainer.phase_update(step)
    assert all(v == v for v in out.values()) and "train/skipped" not in out


def test_dr_grpo_with_token_advantages_grad_accumulation(tiny_model_path, arithmetic_data, tmp_path):
    weights, losses = [], []
    for micro in (8, 2):
        cfg = config(tiny_model_path, arithmetic_data["prompts"], tmp_path / f"r{micro}", advantage="reinforce_pp",
                     loss_agg="seq-mean-token-sum-norm", kl_coef=0.1, entropy_coef=0.01)
        cfg["train"]["micro_batch_size"] = micro
        trainer = align.Trainer(cfg)
        assert trainer.cfg.algo.loss_norm_length == 6  # rollout.max_new_tokens
        result = trainer.train()
        weights.append({k: v.detach().clone() for k, v in trainer.models.policy.named_parameters()})
        losses.append((result.metrics["loss/policy"], result.metrics["loss/kl"], result.metrics["train/grad_norm"]))
    # the gradient (its norm before clipping) and the losses agree to float32 rounding ...
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-7)
    # ... and so do the weights after one AdamW step, up to the few elements whose gradient is ~0: Adam's first
    # step is lr * g / (|g| + eps), which turns rounding noise there into up to ~1e-5 (lr 3e-3)
    for name, w in weights[0].items():
        torch.testing.assert_close(w, weights[1][name], rtol=0, atol=5e-5, msg=name)
