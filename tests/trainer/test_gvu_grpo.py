"""GRPO over image tokens (model.kind = umm) with the understanding reward, through align's trainer."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]


def write_prompts(path: Path) -> None:
    with open(path, "w") as f:
        for cap in ["a circle", "two squares", "a red circle left of a blue triangle", "a green square"]:
            f.write(json.dumps({"prompt": cap + " <boi>", "caption": cap}) + "\n")


def gvu_config(model_path, data_path, run_dir, **train):
    cfg = yaml.safe_load((ROOT / "examples" / "configs" / "gvu_toy.yaml").read_text())
    cfg["model"]["path"] = str(model_path)
    cfg["data"]["path"] = str(data_path)
    cfg["train"] |= {"steps": 2, "prompts_per_step": 2, "micro_batch_size": 8, "lr": 5e-2} | train
    cfg["logging"] |= {"run_dir": str(run_dir), "print_every": 0}
    return cfg


def test_example_config_loads_and_validates():
    import align

    cfg = align.load_config(str(ROOT / "examples" / "configs" / "gvu_toy.yaml"))
    assert cfg.model.kind == "umm" and cfg.model.lora.enabled and cfg.algo.group_size >= 4
    assert cfg.algo.kl_coef == 0.03 and cfg.algo.kl_estimator == "k3" and cfg.rollout.min_p == 0.03


def test_example_config_reward_imports_outside_the_repository_root(tmp_path):
    """`python examples/gvu_toy.py` puts examples/, not the repo root, on sys.path: the reward's import path
    must be the installed one (align.rewards...), not the source folder's name."""
    import subprocess
    import sys

    name = yaml.safe_load((ROOT / "examples" / "configs" / "gvu_toy.yaml").read_text())["reward"]["functions"][0]["name"]
    code = f"from align.rewards.registry import get_reward; print(type(get_reward({name!r})).__name__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "UnderstandingReward", out.stderr[-300:]


def test_grpo_over_image_tokens_with_the_understanding_reward(toy_umm_path, tmp_path):
    import align

    write_prompts(tmp_path / "prompts.jsonl")
    trainer = align.Trainer(gvu_config(toy_umm_path, tmp_path / "prompts.jsonl", tmp_path / "run"))
    layout = trainer.models.policy.config.umm
    lora_before = {n: p.detach().clone() for n, p in trainer.models.policy.named_parameters() if p.requires_grad}
    # One rollout: every response is exactly K image tokens, scored by the understanding reward.
    step, _ = trainer.phase_generate()
    batch = step.batch
    assert batch.response_ids.shape[1] == layout["num_image_tokens"] and bool(batch.mask.all())
    assert set(batch.response_ids.flatten().tolist()) <= set(layout["image_token_ids"])
    trainer.phase_score(step)
    assert bool(step.valid.all()) and bool(((step.scores > 0) & (step.scores <= 1)).all())
    result = trainer.train()
    assert len(result.history) == 2
    for h in result.history:
        assert h["rollout/response_length"] == layout["num_image_tokens"] and h["reward/errors"] == 0
        assert 0.0 < h["reward/mean"] <= 1.0 and torch.isfinite(torch.tensor(h["loss/policy"]))
    assert result.history[-1]["loss/kl"] > 0.0  # k3 KL to the adapter-disabled reference: the policy moved
    changed = [n for n, p in trainer.models.policy.named_parameters() if p.requires_grad and not torch.equal(p, lora_before[n])]
    assert changed and all("lora" in n for n in changed)


def test_example_script_quick_run(tmp_path):
    from examples import gvu_toy

    results = gvu_toy.main(["--out", str(tmp_path / "out"), "--quick", "--ignore-gate", "--images", str(tmp_path / "img")])
    seed = results["seeds"][0]
    for when in ("before", "after"):
        assert 0.0 <= seed[when]["generation"]["overall"] <= 1.0 and 0.0 <= seed[when]["understanding"]["overall"] <= 1.0
    assert (tmp_path / "img" / "before_after_policy_kl0.03.png").stat().st_size > 0
    assert "| **GenEval-style overall** |" in results["table"] and "95% CI" in results["table"]
    gate = results["gate"]  # computed before GRPO on the base's own samples
    assert set(gate) >= {"within_prompt", "perturbed", "count_curve", "passed", "failures"}
    assert gate["passed"] == (not gate["failures"])
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["steps"] == 2 and saved["kl_coef"] == 0.03 and len(saved["seeds"]["0"]["kl_curve"]) == 2


def test_example_script_stops_when_the_gate_fails(tmp_path):
    from examples import gvu_toy

    # 20 pre-training steps of a 32-wide model: its reward cannot discriminate, so no GRPO runs.
    results = gvu_toy.main(["--out", str(tmp_path / "out"), "--quick"])
    assert not results["gate"]["passed"] and results["gate"]["failures"] and results["seeds"] == {}
