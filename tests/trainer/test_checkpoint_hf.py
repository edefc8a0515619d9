"""Checkpoints as Hugging Face directories, `align export`, checkpoint.save_optimizer, reused run directories."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import align
from align.cli import main as cli_main
from align.testing import tiny_run_config


def odd_digits(prompts, completions, **kwargs):  # varies within a group, so every step updates the policy
    return [float(sum(ch in "13579" for ch in c)) for c in completions]


def config(model_path, data, run_dir, **sections):
    base = {"train": {"steps": 1, "prompts_per_step": 2, "lr": 5e-2}, "algo": {"group_size": 4},
            "checkpoint": {"save_final": True}}
    return tiny_run_config("grpo", model_path, data, run_dir, odd_digits, base, **sections)


IDS = torch.tensor([[1, 5, 9, 13, 17, 21]])


def logits_of(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def test_final_checkpoint_is_a_from_pretrained_directory(tiny_model_path, arithmetic_data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer = align.Trainer(config(tiny_model_path, arithmetic_data["prompts"], tmp_path / "run"))
    result = trainer.train()
    loaded = AutoModelForCausalLM.from_pretrained(result.checkpoint)
    torch.testing.assert_close(logits_of(loaded), logits_of(trainer.models.policy))
    assert AutoTokenizer.from_pretrained(result.checkpoint)("3+4=").input_ids
    assert (result.checkpoint / "trainer.pt").is_file()  # trainer state beside the model
    run_config = json.loads((result.checkpoint / "align_config.json").read_text())
    assert run_config["algorithm"] == "grpo"


@pytest.fixture(scope="module")
def lora_run(tiny_model_path, arithmetic_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    trainer = align.Trainer(config(tiny_model_path, arithmetic_data["prompts"], root / "run",
                                   model={"lora": {"enabled": True, "r": 4, "alpha": 8}}, train={"steps": 2}))
    result = trainer.train()
    return result, logits_of(trainer.models.policy)  # the adapted policy's logits (adapters active)


def test_lora_checkpoint_loads_with_peft_from_pretrained(lora_run, tiny_model_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    result, expected = lora_run
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(result.checkpoint))
    torch.testing.assert_close(logits_of(loaded), expected)
    base = logits_of(AutoModelForCausalLM.from_pretrained(tiny_model_path))
    assert (base - expected).abs().max() > 1e-4  # the adapters changed something, so the check above means it


def test_export_merges_lora_into_a_plain_model(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result, expected = lora_run
    assert cli_main(["export", str(result.run_dir), "--out", str(tmp_path / "merged")]) == 0
    out = tmp_path / "merged"
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()
    assert not (out / "trainer.pt").exists()
    torch.testing.assert_close(logits_of(AutoModelForCausalLM.from_pretrained(out)), expected, atol=1e-4, rtol=1e-4)
    assert AutoTokenizer.from_pretrained(out)("3+4=").input_ids


def test_export_push_to_hub_calls_the_upload_api(lora_run, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def upload_folder(*, repo_id, folder_path, **kw):
        calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: calls.append(("create", repo_id, kw)))
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    result, _ = lora_run
    out = tmp_path / "merged"
    assert cli_main(["export", str(result.checkpoint), "--out", str(out), "--push-to-hub", "me/tiny-grpo"]) == 0
    assert [c[:2] for c in calls] == [("create", "me/tiny-grpo"), ("upload", "me/tiny-grpo")]
    assert calls[0][2].get("exist_ok") is True
    assert "config.json" in calls[1][2] and "model.safetensors" in calls[1][2]


def test_export_refuses_a_missing_run(tmp_path, capsys):
    assert cli_main(["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere" in err[0]


def test_save_optimizer_false_leaves_optimizer_state_out_and_resume_says_so(tiny_model_path, arithmetic_data,
                                                                              tmp_path):
    cfg = config(tiny_model_path, arithmetic_data["prompts"], tmp_path / "run", checkpoint={"save_optimizer": False})
    result = align.train(cfg)
    state = torch.load(result.checkpoint / "trainer.pt", weights_only=True)
    assert "optimizer" not in state and "scheduler" in state

    def dicts(x):
        if isinstance(x, dict):
            yield x
            for v in x.values():
                yield from dicts(v)

    assert not any("exp_avg" in d or "param_groups" in d for d in dicts(state))  # no Adam state elsewhere either
    cfg["train"]["steps"] = 2
    with pytest.warns(UserWarning, match="optimizer state"):
        resumed = align.train(cfg, resume_from=tmp_path / "run")
    assert [h["step"] for h in resumed.history] == [2]


def test_reused_run_dir_is_refused_without_resume_or_overwrite(tiny_model_path, arithmetic_data, tmp_path):
    cfg = config(tiny_model_path, arithmetic_data["prompts"], tmp_path / "run")
    first = align.train(cfg)
    metrics_before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(align.UserError) as info:
        align.train(cfg)
    message = str(info.value)
    assert "\n" not in message and "--resume" in message and "--overwrite" in message
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics_before  # nothing touched
    assert first.checkpoint.is_dir()


def test_overwrite_replaces_the_old_run(tiny_model_path, arithmetic_data, tmp_path):
    cfg = config(tiny_model_path, arithmetic_data["prompts"], tmp_path / "run", train={"steps": 2},
                 checkpoint={"every": 1, "keep_last": 5, "save_final": True})
    align.train(cfg)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*")) == ["step-000001", "step-000002"]
    cfg["train"]["steps"] = 1
    cfg["checkpoint"]["overwrite"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # overwriting asked for by name: no warning either
        align.train(cfg)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*")) == ["step-000001"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1]


def test_cli_overwrite_flag(tiny_model_path, arithmetic_data, tmp_path, capsys):
    cfg = config(tiny_model_path, arithmetic_data["prompts"], tmp_path / "run")
    cfg["reward"]["functions"] = ["math_verify"]
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 7, "reward/mean": 0.5}\n')  # an old run's log
    assert cli_main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0] and "--resume" in err[0]
    assert cli_main(["train", str(path), "--overwrite"]) == 0
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1]


def test_resume_reads_a_checkpoint_of_the_earlier_policy_layout(tiny_model_path, arithmetic_data, tmp_path):
    """Checkpoints written before this layout kept the model in policy/ and the run config in config.json."""
    import shutil

    cfg = config(tiny_model_path, arithmetic_data["prompts"], tmp_path / "run")
    ckpt = align.train(cfg).checkpoint
    (ckpt / "policy").mkdir()
    for f in list(ckpt.iterdir()):
        if f.name not in ("policy", "trainer.pt", "align_config.json"):
            shutil.move(str(f), ckpt / "policy" / f.name)
    (ckpt / "align_config.json").rename(ckpt / "config.json")
    weights = (ckpt / "policy" / "model.safetensors").read_bytes()
    (ckpt / "policy" / "model.safetensors").write_bytes(weights[:100])  # truncated: resume must read this file
    cfg["train"]["steps"] = 2
    with pytest.raises(align.CheckpointError, match=r"step-000001/policy are corrupt"):
        align.train(cfg, resume_from=tmp_path / "run")
    (ckpt / "policy" / "model.safetensors").write_bytes(weights)
    assert [h["step"] for h in align.train(cfg, resume_from=tmp_path / "run").history] == [2]


def test_export_follows_the_confined_latest_rule(tmp_path, capsys):
    run = tmp_path / "run"
    (tmp_path / "other" / "step-000001").mkdir(parents=True)
    (tmp_path / "other" / "step-000001" / "trainer.pt").write_bytes(b"x")
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("../../other/step-000001")
    assert cli_main(["export", str(run), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot export" in err[0] and "outside" in err[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("left", ["completions.jsonl", "tb", "wandb"])
def test_any_logging_output_marks_a_used_run_dir(left, tiny_model_path, arithmetic_data, tmp_path):
    """A run logged only to TensorBoard / wandb / the completions table (no metrics.jsonl) is a run too."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")  # the user's own file: neither a run nor removed by --overwrite
    (run / left).mkdir() if "." not in left else (run / left).write_text("{}\n")
    cfg = config(tiny_model_path, arithmetic_data["prompts"], run, checkpoint={"save_final": False})
    with pytest.raises(align.UserError, match=f"already holds a run \\({left}\\)"):
        align.Trainer(cfg)
    cfg["checkpoint"]["overwrite"] = True
    align.Trainer(cfg).close()
    assert not (run / left).exists() and (run / "notes.txt").read_text() == "mine"
