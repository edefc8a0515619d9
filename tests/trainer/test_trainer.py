"""The training loop end to end on a tiny model: learning, resume equivalence, grad accumulation."""
from __future__ import annotations

import json

import pytest
import torch

import align
from align.errors import CheckpointError
from align.testing import CharFraction, tiny_run_config


def config(algorithm, model, data, run_dir, **over):
    """Overrides as section__key=value."""
    base = {"rollout": {"max_new_tokens": 6}, "train": {"steps": 4, "prompts_per_step": 4, "lr": 3e-3}}
    cfg = tiny_run_config(algorithm, model, data, run_dir, CharFraction(), base)
    for key, value in over.items():
        section, name = key.split("__")
        cfg.setdefault(section, {})[name] = value
    return cfg


def mean_reward(history, steps):
    return sum(h["reward/mean"] for h in history[steps]) / len(history[steps])


@pytest.mark.parametrize("algorithm, extra", [
    ("grpo", {"algo__group_size": 8, "train__lr": 1e-2}),
    ("ppo", {"train__prompts_per_step": 16, "train__lr": 1e-2, "algo__kl_coef": 0.01, "algo__epochs": 2,
             "train__mini_batch_size": 8}),
])
def test_reward_rises(algorithm, extra, tiny_model_path, arithmetic_data, tmp_path):
    cfg = config(algorithm, tiny_model_path, arithmetic_data["prompts"], tmp_path / "run", train__steps=14, **extra)
    result = align.train(cfg)
    h = result.history
    first, last = mean_reward(h, slice(0, 3)), mean_reward(h, slice(-3, None))
    assert first < 0.1, first  # a random 100-token model rarely emits the char
    assert last > first + 0.15, (first, last)
    for record in h:
        assert all(v == v for v in record.values() if isinstance(v, float))  # no NaN metric


def test_metrics_jsonl_and_plot(tiny_model_path, arithmetic_data, tmp_path):
    run = tmp_path / "run"
    align.train(config("grpo", tiny_model_path, arithmetic_data["prompts"], run, train__steps=2))
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]
    assert {"reward/mean", "loss/policy", "rollout/response_length", "time/generate"} <= set(lines[0])
    from align.metrics import plot_run

    png = plot_run(run)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("algorithm, extra", [
    ("ppo", {"algo__kl_coef": 0.05, "algo__kl_target": 0.02, "algo__epochs": 2, "train__mini_batch_size": 2}),
    ("grpo", {"algo__kl_coef": 0.04, "algo__group_size": 2, "train__lr_scheduler": "cosine"}),
])
def test_resume_equals_uninterrupted(algorithm, extra, tiny_model_path, arithmetic_data, tmp_path):
    """2 steps + resume + 2 steps give the same metrics as 4 uninterrupted steps."""
    full = align.train(config(algorithm, tiny_model_path, arithmetic_data["prompts"], tmp_path / "full", **extra))
    part = config(algorithm, tiny_model_path, arithmetic_data["prompts"], tmp_path / "part",
                  checkpoint__save_final=True, **extra)
    interrupted = align.Trainer(part)
    first = interrupted.train(max_steps=2)  # stops after 2 of 4 steps, as if the job were killed
    assert first.checkpoint is not None and first.checkpoint.name == "step-000002"
    del interrupted
    second = align.train(part, resume_from=tmp_path / "part")
    assert [h["step"] for h in second.history] == [3, 4]
    resumed = first.history + second.history
    for a, b in zip(full.history, resumed):
        for key in a:
            if key.startswith("time/") or key == "rollout/tokens_per_s":
                continue
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    lines = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]


def test_resume_with_another_lr_or_kl_coef_applies_the_configured_values(tiny_model_path, arithmetic_data, tmp_path):
    """The checkpoint's optimizer / scheduler state holds its run's lr, and the KL controller its kl_coef; a
    resume whose config changes them trains with the config's values (and warns), not silently the old ones."""
    over = {"algo__kl_coef": 0.05, "train__lr": 1e-3, "train__steps": 2, "checkpoint__save_final": True}
    align.train(config("ppo", tiny_model_path, arithmetic_data["prompts"], tmp_path / "run", **over))
    more = config("ppo", tiny_model_path, arithmetic_data["prompts"], tmp_path / "run",
                  **{**over, "train__steps": 3, "train__lr": 2.5e-4, "algo__kl_coef": 0.2})
    with pytest.warns(UserWarning) as caught:
        resumed = align.train(more, resume_from=tmp_path / "run")
    text = " | ".join(str(w.message) for w in caught)
    assert "lr 0.001 -> 0.00025" in text and "kl_coef is 0.2" in text, text
    (step3,) = resumed.history
    assert step3["step"] == 3
    assert step3["train/lr"] == pytest.approx(2.5e-4)  # constant schedule, no warm-up: the factor is 1
    assert step3["kl/coef"] == pytest.approx(0.2)
    # an unchanged config resumes silently (and exactly: test_resume_equals_uninterrupted)
    again = config("ppo", tiny_model_path, arithmetic_data["prompts"], tmp_path / "run",
                   **{**over, "train__steps": 4, "train__lr": 2.5e-4, "algo__kl_coef": 0.2})
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(optimizer settings|kl_coef).*")
        assert align.train(again, resume_from=tmp_path / "run").history[0]["step"] == 4


def test_resume_refuses_missing_or_corrupt(tiny_model_path, arithmetic_data, tmp_path):
    cfg = config("grpo", tiny_model_path, arithmetic_data["prompts"], tmp_path / "run", train__steps=1,
                 checkpoint__save_final=True)
    with pytest.raises(CheckpointError, match="does not exist"):
        align.train(cfg, resume_from=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="checkpoints/latest"):
        align.train(cfg, resume_from=tmp_path / "empty")
    result = align.train(cfg)
    (result.checkpoint / "trainer.pt").write_bytes(b"garbage")
    cfg["train"]["steps"] = 2
    with pytest.raises(CheckpointError, match="corrupt"):
        align.train(cfg, resume_from=tmp_path / "run")


def test_grad_accumulation_equals_full_batch(tiny_model_path, arithmetic_data, tmp_path):
    """micro_batch_size 2 and 8 give the same weights and the same logged losses after a step."""
    weights, losses = [], []
    for micro in (8, 2):
        trainer = align.Trainer(config("grpo", tiny_model_path, arithmetic_data["prompts"], tmp_path / f"r{micro}",
                                       train__micro_batch_size=micro, train__steps=1, algo__loss_agg="seq-mean-token-mean",
                                       algo__kl_coef=0.1))
        result = trainer.train()
        weights.append({k: v.detach().clone() for k, v in trainer.models.policy.named_parameters()})
        losses.append((result.metrics["loss/policy"], result.metrics["loss/kl"]))
    for name, w in weights[0].items():
        # AdamW's first step is lr * g / (|g| + eps): an entry whose gradient is near eps (1e-8) moves by a
        # fraction of lr (3e-3) that the micro-batches' fp32 summation order can change (1.3e-6 measured on
        # one of 8,192 entries, AMD EPYC VM); a wrong sign or sample moves entries by up to 2 * lr, and the
        # logged losses below catch a wrong scale
        torch.testing.assert_close(w, weights[1][name], rtol=1e-5, atol=3e-6, msg=name)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-7)


def test_token_rewards_from_a_reward_function_reach_ppo(tiny_model_path, arithmetic_data, tmp_path):
    """A RewardFunction's per-token rewards are added to the shaped rewards before GAE (e.g. process rewards)."""
    from align.rewards.base import RewardFunction, RewardOutput

    class PerToken(RewardFunction):
        name = "per_token"

        def score(self, prompts, completions, completion_ids, **columns):
            return RewardOutput(scores=[0.0] * len(completions),
                                token_rewards=[[0.5 * (t + 1) for t in range(len(ids))] for ids in completion_ids])

    cfg = config("ppo", tiny_model_path, arithmetic_data["prompts"], tmp_path / "run", algo__kl_coef=0.0)
    cfg["reward"]["functions"] = [PerToken()]
    trainer = align.Trainer(cfg)
    step, _ = trainer.phase_generate()
    trainer.phase_score(step)
    trainer.phase_logprobs(step)
    trainer.phase_advantages(step)
    mask = step.mask
    expected = torch.zeros(mask.shape)
    for i, n in enumerate(mask.sum(-1).tolist()):
        expected[i, :n] = torch.tensor([0.5 * (t + 1) for t in range(n)])
    torch.testing.assert_close(step.token_rewards, expected)  # kl 0, score 0: only the token rewards remain

    cfg = config("grpo", tiny_model_path, arithmetic_data["prompts"], tmp_path / "g")
    cfg["reward"]["functions"] = [PerToken()]
    with pytest.raises(align.UserError, match="use algorithm: ppo"):
        align.train(cfg)


def test_lora_reference_is_adapter_disabled_policy(tiny_model_path, arithmetic_data, tmp_path):
    cfg = config("grpo", tiny_model_path, arithmetic_data["prompts"], tmp_path / "run", train__steps=2,
                 model__lora={"enabled": True, "r": 4, "alpha": 8}, algo__kl_coef=0.1, checkpoint__save_final=True)
    trainer = align.Trainer(cfg)
    assert trainer.models.reference is None  # no second copy
    result = trainer.train()
    assert (result.checkpoint / "adapter_model.safetensors").is_file()
    assert result.metrics["kl/mean"] != 0.0  # adapters moved the policy away from the reference


def test_zero_variance_filter_and_rloo(tiny_model_path, arithmetic_data, tmp_path):
    cfg = config("grpo", tiny_model_path, arithmetic_data["prompts"], tmp_path / "run", train__steps=1,
                 algo__filter_zero_variance=True, algo__advantage="rloo")
    cfg["reward"]["functions"] = [lambda prompts, completions, **k: [1.0] * len(completions)]
    result = align.train(cfg)
    assert result.metrics["grpo/zero_variance_groups"] == 1.0
    assert result.metrics["train/skipped"] == 1.0


def test_reward_errors_are_excluded_not_zeroed(tiny_model_path, arithmetic_data, tmp_path):
    """A NaN score is an error for that sample: excluded from the update, counted, never a 0 reward."""
    calls = []

    def flaky(prompts, completions, **k):
        calls.append(len(completions))
        return [float("nan") if i % 4 == 0 else 1.0 + (i % 2) for i in range(len(completions))]

    cfg = config("grpo", tiny_model_path, arithmetic_data["prompts"], tmp_path / "run", train__steps=1)
    cfg["reward"]["functions"] = [flaky]
    m = align.train(cfg).metrics
    assert m["reward/errors"] == 4.0 and m["train/samples"] == 12.0
    assert m["reward/min"] == 1.0  # the errored samples did not become 0

    cfg["checkpoint"]["overwrite"] = True  # the same run directory again, on purpose
    cfg["reward"]["functions"] = [lambda prompts, completions, **k: [float("nan")] * len(completions)]
    with pytest.raises(RuntimeError, match="no sample of this step could be scored"):
        align.train(cfg)


def test_ppo_separate_critic_and_kl_in_loss(tiny_model_path, arithmetic_data, tmp_path):
    """A separate critic model trains (its weights move) and KL can sit in the loss instead of the reward."""
    cfg = config("ppo", tiny_model_path, arithmetic_data["prompts"], tmp_path / "run", train__steps=2,
                 model__critic="separate", algo__kl_in="loss", algo__kl_coef=0.1, train__critic_lr=1e-2)
    trainer = align.Trainer(cfg)
    assert trainer.models.value_head is None and trainer.models.critic is not None
    before = {k: v.clone() for k, v in trainer.models.critic.state_dict().items()}
    result = trainer.train()
    after = trainer.models.critic.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert "loss/kl" in result.metrics and "loss/value" in result.metrics
