"""The `align` command: train with overrides, sft, plot, and one-line errors for user mistakes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from align.cli import main

REPO = Path(__file__).resolve().parents[2]


def write_config(tmp_path, model, data, **algo):
    cfg = yaml.safe_load((REPO / "examples/configs/grpo.yaml").read_text())
    cfg["model"]["path"] = str(model)
    cfg["data"]["path"] = str(data)
    cfg["logging"] = {"run_dir": str(tmp_path / "run"), "progress": False, "print_every": 0}
    cfg["algo"].update(algo)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_with_overrides_then_plot(tiny_model_path, arithmetic_data, tmp_path, capsys):
    cfg = write_config(tmp_path, tiny_model_path, arithmetic_data["prompts"])
    rc = main(["train", str(cfg), "--set", "train.steps=2", "--set", "train.prompts_per_step=2",
               "--set", "algo.group_size=4", "--set", "checkpoint.every=1"])
    assert rc == 0
    run = tmp_path / "run"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000002"
    assert main(["plot", str(run)]) == 0
    assert (run / "curves.png").is_file()


@pytest.mark.parametrize("args, needle", [
    (["train", "missing.yaml"], "does not exist"),
    (["train", "{cfg}", "--set", "algo.group_size=1"], "algo.group_size = 1"),
    (["train", "{cfg}", "--set", "train.lrr=1"], "did you mean 'train.lr'"),
    (["train", "{cfg}", "--set", "data.path=/nope.jsonl"], "does not exist"),
    (["train", "{cfg}", "--set", "model.path=/nope"], "model.path"),
    (["train", "{cfg}", "--resume", "/nope"], "cannot resume"),
    (["plot", "/nope"], "metrics.jsonl does not exist"),
])
def test_user_errors_are_one_line(args, needle, tiny_model_path, arithmetic_data, tmp_path, capsys):
    cfg = write_config(tmp_path, tiny_model_path, arithmetic_data["prompts"])
    rc = main([a.replace("{cfg}", str(cfg)) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0], err


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "align.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "train" in out.stdout and "sft" in out.stdout


def test_sft_learns_the_completions(tiny_model_path, arithmetic_data, tmp_path):
    """SFT lowers the completion loss well below its start (cross-entropy on completion tokens only)."""
    import align
    from align.supervised import sft

    first = sft({"model": {"path": str(tiny_model_path)}, "data": {"path": str(arithmetic_data["sft"])},
                 "train": {"max_steps": 1, "batch_size": 16, "lr": 1e-9}, "output_dir": str(tmp_path / "a"),
                 "logging": {"print_every": 0}})
    trained = align.sft({"model": {"path": str(tiny_model_path)}, "data": {"path": str(arithmetic_data["sft"])},
                         "train": {"epochs": 6, "batch_size": 16, "lr": 5e-3}, "output_dir": str(tmp_path / "b"),
                         "logging": {"print_every": 0}})
    assert first["sft/loss"] > 4.0  # ~log(100) for a random 100-token model
    assert trained["sft/loss"] < 2.0
    assert (tmp_path / "b" / "config.json").is_file() and (tmp_path / "b" / "tokenizer.json").is_file()
