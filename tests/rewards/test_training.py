"""Reward-model training / evaluation: Bradley-Terry, configs, a classifier and a Themis run on tiny models."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _tiny import cached

from align.command_configs import RMTrainConfig, load_rm_config
from align.config import apply_overrides
from align.errors import ConfigError
from align.rewards.training import (
    bradley_terry_loss,
    evaluate_reward_model,
    pairwise_accuracy,
    train_reward_model,
)

REPO = Path(__file__).resolve().parents[2]
needs_tara = pytest.mark.tara  # skipped without $ALIGN_TARA_DIR; fails the run if it skips with the data present


def test_bradley_terry_loss_matches_float64_formula():
    a = torch.tensor([0.3, -1.2, 2.0, 0.0])
    b = torch.tensor([0.1, 0.5, -3.0, 0.0])
    ref = sum(math.log1p(math.exp(-(x - y))) for x, y in zip(a.tolist(), b.tolist())) / 4
    assert float(bradley_terry_loss(a, b)) == pytest.approx(ref, rel=1e-6)


def test_pairwise_accuracy_counts_ties_as_wrong():
    assert pairwise_accuracy([1.0, 2.0, 3.0, 0.5], [0.0, 2.0, 4.0, 0.4]) == 0.5
    assert math.isnan(pairwise_accuracy([], []))


def test_config_validation_messages():
    """The RM config is built by align.config's machinery: ConfigError, dotted keys, close-match suggestions."""
    with pytest.raises(ConfigError, match="model.kind = 'ppo' is not allowed.*'classifier', 'themis'"):
        RMTrainConfig.from_dict({"model": {"kind": "ppo", "path": "x"}, "data": {"train": ["a.jsonl"]}})
    with pytest.raises(ConfigError, match="unknown config key 'train.epoch'.*did you mean 'train.epochs'"):
        RMTrainConfig.from_dict({"model": {"path": "x"}, "data": {"train": ["a.jsonl"]}, "train": {"epoch": 1}})
    with pytest.raises(ConfigError, match="model.path = '': set model.path"):
        RMTrainConfig.from_dict({"model": {"kind": "classifier"}, "data": {"train": ["a"]}})
    with pytest.raises(ConfigError, match="the 'model' section"):
        RMTrainConfig.from_dict({"data": {"train": ["a"]}})
    with pytest.raises(ConfigError, match="data.observations"):
        RMTrainConfig.from_dict({"model": {"kind": "themis", "path": "x"}, "data": {"train": ["a"], "observations": "tools"}})
    with pytest.raises(ConfigError, match="train.warmup_ratio = 1.5"):
        RMTrainConfig.from_dict({"model": {"path": "x"}, "data": {"train": ["a"]}, "train": {"warmup_ratio": 1.5}})
    with pytest.raises(ConfigError, match="train.batch_size = 'many' must be an integer"):
        RMTrainConfig.from_dict({"model": {"path": "x"}, "data": {"train": ["a"]}, "train": {"batch_size": "many"}})
    d = apply_overrides({"model": {"path": "x"}}, ["train.lr=3e-4", "data.train=[a.jsonl, b.jsonl]", "themis.beta=0"])
    cfg = RMTrainConfig.from_dict(d)
    assert cfg.train.lr == 3e-4 and cfg.data.train == ["a.jsonl", "b.jsonl"] and cfg.themis.beta == 0
    # a single source may be a string; YAML 1.1 reads 3e-4 (no dot) as a string: both convert
    cfg = RMTrainConfig.from_dict({"model": {"path": "x"}, "data": {"train": "a.jsonl"}, "train": {"lr": "3e-4", "epochs": 2}})
    assert cfg.data.train == ["a.jsonl"] and cfg.train.lr == 3e-4 and cfg.train.epochs == 2.0


@pytest.mark.parametrize("path", sorted((REPO / "examples" / "configs").glob("rm_*.yaml")), ids=lambda p: p.name)
def test_example_rm_configs_load(path):
    cfg = load_rm_config(path)
    assert cfg.model.kind in ("classifier", "themis")


def _write_pairs(path: Path, n: int, groups=("alpha", "beta")) -> Path:
    with path.open("w") as fh:
        for i in range(n):
            fh.write(json.dumps({"prompt": f"item {i} is", "chosen": " good", "rejected": " bad", "group": groups[i % len(groups)]}) + "\n")
    return path


def test_classifier_training_learns_a_separable_preference(tmp_path):
    data = _write_pairs(tmp_path / "pairs.jsonl", 16)
    cfg = RMTrainConfig.from_dict({
        "model": {"kind": "classifier", "path": str(cached("llama", 1)), "template": "{prompt}{completion}", "max_length": 32},
        "data": {"train": [str(data)], "eval": [str(data)]},
        "train": {"epochs": 4, "batch_size": 8, "lr": 3e-3, "warmup_ratio": 0.0, "seed": 0},
        "output_dir": str(tmp_path / "run"),
    })
    res = train_reward_model(cfg, log=lambda s: None)
    assert res.steps == 8
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and lines[-1]["loss"] < lines[0]["loss"]
    assert res.metrics["eval/pairwise_accuracy"] == 1.0
    assert res.metrics["eval/n/alpha"] == 8 and res.metrics["eval/accuracy/beta"] == 1.0
    # evaluation on the saved checkpoint agrees with scoring the pairs by hand
    from align.rewards.classifier import ClassifierRewardModel

    rm = ClassifierRewardModel.from_pretrained(tmp_path / "run", device="cpu")
    pos, neg = rm([f"item {i} is" for i in range(16)], [" good"] * 16), rm([f"item {i} is" for i in range(16)], [" bad"] * 16)
    manual = sum(p > q for p, q in zip(pos, neg)) / 16
    ev = evaluate_reward_model(tmp_path / "run", [str(data)])
    assert ev["pairwise_accuracy"] == manual


def test_nan_never_reaches_the_optimizer(tmp_path, monkeypatch):
    from align.rewards.classifier import ClassifierRewardModel

    data = _write_pairs(tmp_path / "pairs.jsonl", 4)
    monkeypatch.setattr(ClassifierRewardModel, "forward_scores", lambda self, **kw: torch.full((kw["input_ids"].shape[0],), float("nan"), requires_grad=True))
    cfg = RMTrainConfig.from_dict({"model": {"path": str(cached("bert", 2))}, "data": {"train": [str(data)]},
                                   "output_dir": str(tmp_path / "run")})
    with pytest.raises(FloatingPointError, match="non-finite RM loss at step 1"):
        train_reward_model(cfg, log=lambda s: None)


def _tara_record(i: int) -> dict:
    day, wrong = ("Monday", "Friday") if i % 2 else ("Tuesday", "Sunday")
    date = f"2015-03-{10 + i:02d}"

    def answer(a, score, expl):
        return {"answer": f"{date} is {a}", "score": score,
                "actions": {"Thought": f"I need the weekday of {date}.", "Action": "Calendar.week_day", "Action Input": date, "Observation": day},
                "score_agent": {"explanation": expl, "score": str(score)}}
    return {"id": f"cal_{i}", "question": f"Which day of the week is {date}?",
            "pos_answer": answer(day, 1.0, "The tool agrees."), "neg_answer": answer(wrong, -1.0, "The tool disagrees.")}


def test_themis_training_and_tool_augmented_evaluation(tmp_path):
    data = tmp_path / "tara_like.jsonl"
    data.write_text("".join(json.dumps(_tara_record(i)) + "\n" for i in range(4)))
    cfg = RMTrainConfig.from_dict({
        "model": {"kind": "themis", "path": str(cached("llama", 1)), "max_length": 256},
        "data": {"train": [str(data)]},
        "train": {"epochs": 3, "batch_size": 2, "lr": 3e-3, "seed": 0},
        "themis": {"max_new_tokens": 4, "observation_dropout": 0.01},
        "output_dir": str(tmp_path / "themis"),
    })
    res = train_reward_model(cfg, log=lambda s: None)
    lines = [json.loads(x) for x in (tmp_path / "themis" / "metrics.jsonl").read_text().splitlines()]
    assert res.steps == 6 and all(math.isfinite(r["lm_loss"]) and math.isfinite(r["rm_loss"]) for r in lines)
    assert lines[-1]["lm_loss"] < lines[0]["lm_loss"]
    assert json.loads((tmp_path / "themis" / "themis.json").read_text())["max_new_tokens"] == 4

    from align.tools import ToolResult

    calls = []

    def week_day(tool_input, context=None):
        calls.append(tool_input)
        return ToolResult(True, "Monday", None, 0.0)

    # the random tiny model rarely names a real tool; route every name to the stand-in to exercise dispatch
    ev = evaluate_reward_model(tmp_path / "themis", [str(data)], tools=lambda name: week_day)
    assert ev["n"] == 4 and 0.0 <= ev["pairwise_accuracy"] <= 1.0 and "accuracy/tara_like" in ev


@needs_tara
@pytest.mark.parametrize("method", ["frozen", "finetune"])
def test_replication_script_runs_on_a_tiny_backbone(tmp_path, capsys, method):
    import importlib.util

    spec = importlib.util.spec_from_file_location("themis_tara", REPO / "examples" / "themis_tara.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc = mod.main(["--out", str(tmp_path), "--backbone", str(cached("bert", 2)), "--seeds", "0", "--groups", "calendar",
                   "--train-per-tool", "8", "--epochs", "1", "--batch-size", "4", "--max-length", "96", "--method", method])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["runs"]) == {"plain", "themis"}
    assert res["runs"]["themis"][0]["eval/n/calendar"] == 106
    assert "Pairwise accuracy" in capsys.readouterr().out


def test_cli_train_rm_and_eval_rm(tmp_path, capsys):
    from align.cli import main

    data = _write_pairs(tmp_path / "pairs.jsonl", 8)
    cfg = tmp_path / "rm.yaml"
    cfg.write_text(f"model:\n  kind: classifier\n  path: {cached('bert', 2)}\n  max_length: 32\n"
                   f"data:\n  train: [{data}]\n  eval: [{data}]\ntrain:\n  epochs: 1\n  batch_size: 4\n"
                   f"output_dir: {tmp_path / 'out'}\n")
    assert main(["train-rm", str(cfg), "--set", "train.lr=1e-3", "--set", "train.seed=3"]) == 0
    out = capsys.readouterr().out
    assert "2 steps" in out and "alpha" in out and "beta" in out
    assert json.loads((tmp_path / "out" / "rm_config.json").read_text())["train"]["lr"] == 1e-3
    assert main(["eval-rm", str(tmp_path / "out"), "--data", str(data), "--json", str(tmp_path / "ev.json")]) == 0
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert ev["n"] == 8 and ev["n/alpha"] == 4
    assert main(["eval-rm", str(cfg)]) == 0  # a config: its output_dir and data.eval
    assert main(["train-rm", str(cfg), "--set", "train.epoch=1"]) == 2
    assert "did you mean 'train.epochs'" in capsys.readouterr().err


def test_a_classifier_trained_on_tara_pairs_saves_the_template_it_was_trained_on(tmp_path):
    """TARA pairs train on 'Question: q\\nAnswer: a' (render_plain); the saved template must give the same text,
    or a config naming the checkpoint (`classifier_rm` with model_path) scores text it never saw."""
    from align.rewards.registry import get_reward
    from align.rewards.tara import render_plain

    data = tmp_path / "tara_like.jsonl"
    data.write_text("".join(json.dumps(_tara_record(i)) + "\n" for i in range(4)))
    cfg = RMTrainConfig.from_dict({
        "model": {"kind": "classifier", "path": str(cached("llama", 1)), "max_length": 64},
        "data": {"train": [str(data)]}, "train": {"epochs": 1, "batch_size": 2, "seed": 0},
        "output_dir": str(tmp_path / "run")})
    train_reward_model(cfg, log=lambda s: None)
    rm = get_reward("classifier_rm", model_path=str(tmp_path / "run"), device="cpu")
    q, a = "Which day of the week is 2015-03-10?", "2015-03-10 is Tuesday"
    assert rm.format(q, a) == render_plain(q, a)
    assert rm([q], [a]) == pytest.approx(rm.score_texts([render_plain(q, a)]), abs=1e-6)


@pytest.mark.parametrize("kind", ["themis", "classifier"])
def test_training_sequences_longer_than_max_length_are_counted_and_warned(tmp_path, kind):
    """A sequence longer than model.max_length is cut silently by the encoders (Themis drops its start, the
    classifier's tokenizer its end); train-rm counts them (both sides of every pair, EOS included), warns
    once with the length that keeps them whole, and records the counts in train_metrics.json."""
    from transformers import AutoTokenizer

    from align.rewards.tara import load_tara_file, render_item

    if kind == "themis":
        data = tmp_path / "tara_like.jsonl"
        data.write_text("".join(json.dumps(_tara_record(i)) + "\n" for i in range(4)))
        model = {"kind": "themis", "path": str(cached("llama", 1))}
    else:
        prompts = [f"item {i} is " + "one two three " * (8 + 6 * i) for i in range(4)]  # lengths spread
        data = tmp_path / "pairs.jsonl"
        data.write_text("".join(json.dumps({"prompt": q, "chosen": " good", "rejected": " bad"}) + "\n" for q in prompts))
        model = {"kind": "classifier", "path": str(cached("llama", 1)), "template": "{prompt}{completion}"}

    def train(max_length: int) -> tuple[dict, list[str]]:
        logs: list[str] = []
        cfg = RMTrainConfig.from_dict({"model": {**model, "max_length": max_length}, "data": {"train": [str(data)]},
                                       "train": {"epochs": 1, "batch_size": 4, "seed": 0},
                                       "output_dir": str(tmp_path / f"run{max_length}")})
        m = train_reward_model(cfg, log=logs.append).metrics
        saved = json.loads((tmp_path / f"run{max_length}" / "train_metrics.json").read_text())
        assert saved["train/sequences_cut"] == m["train/sequences_cut"]
        return m, [line for line in logs if line.startswith("warning:")]

    m, warned = train(4096)
    assert m["train/sequences_cut"] == 0 and m["train/sequences_cut_share"] == 0.0 and not warned
    # the lengths written out with the checkpoint's tokenizer (Themis adds its marker tokens): the rendered
    # text's ids (special tokens as the encoders add them), plus the EOS for Themis
    tok = AutoTokenizer.from_pretrained(tmp_path / "run4096")
    if kind == "themis":
        lengths = [len(tok(render_item(it, side).text)["input_ids"]) + 1 for it in load_tara_file(data) for side in ("pos", "neg")]
    else:
        lengths = [len(tok(q + c)["input_ids"]) for q in prompts for c in (" good", " bad")]
    assert m["train/longest_sequence"] == max(lengths)
    short = max(lengths) - 1  # the longest sequences are cut by one token
    assert short >= 16  # the config's floor
    cut = sum(n > short for n in lengths)
    m, warned = train(short)
    assert m["train/sequences_cut"] == cut > 0 and m["train/sequences_cut_share"] == cut / len(lengths)
    assert m["train/longest_sequence"] == max(lengths) and len(warned) == 1
    assert f"{cut} of {len(lengths)} training sequences" in warned[0]
    assert f"set model.max_length to {max(lengths)}" in warned[0]
    assert ("start (the question)" if kind == "themis" else "end (the answer)") in warned[0]
