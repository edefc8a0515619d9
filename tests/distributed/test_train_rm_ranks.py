"""`align train-rm` under torchrun: two gloo ranks, each forwarding its share of every batch, take the steps one
process takes on the whole batch (the reference: the same config run in one process), for a classifier RM and for
Themis (whose observation dropout draws its numbers for the whole batch on every rank)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _launch import launch
from safetensors.torch import load_file

from align.cli import main

# 9 pairs in batches of 4: steps of 4, 4 and 1 pairs; in the last, rank 1 has none and adds zero gradients
PAIRS, BATCH = 9, 4


def _classifier_pairs(path: Path) -> Path:
    with path.open("w") as fh:
        for i in range(PAIRS):
            fh.write(json.dumps({"prompt": f"item {i} is", "chosen": " good" * (1 + i % 3), "rejected": " bad"}) + "\n")
    return path


def _tara_pairs(path: Path) -> Path:
    def answer(date: str, day: str, score: float) -> dict:
        return {"answer": f"{date} is {day}", "score": score,
                "actions": {"Thought": f"I need the weekday of {date}.", "Action": "Calendar.week_day",
                            "Action Input": date, "Observation": "Monday" if score > 0 else "Sunday"},
                "score_agent": {"explanation": "The tool agrees." if score > 0 else "It does not.", "score": str(score)}}

    with path.open("w") as fh:
        for i in range(PAIRS):
            date = f"2015-03-{10 + i:02d}"
            fh.write(json.dumps({"id": f"cal_{i}", "question": f"Which day of the week is {date}?",
                                 "pos_answer": answer(date, "Monday", 1.0),
                                 "neg_answer": answer(date, "Sunday", -1.0)}) + "\n")
    return path


def _config(tmp_path: Path, model: Path, kind: str) -> Path:
    data = _classifier_pairs(tmp_path / "pairs.jsonl") if kind == "classifier" else _tara_pairs(tmp_path / "tara.jsonl")
    head = "  head: value_head\n" if kind == "classifier" else ""
    themis = "themis:\n  observation_dropout: 0.5\n  max_new_tokens: 4\n" if kind == "themis" else ""
    cfg = tmp_path / "rm.yaml"
    cfg.write_text(f"model:\n  kind: {kind}\n  path: {model}\n{head}  max_length: 128\n"
                   f"data:\n  train: [{data}]\ntrain:\n  epochs: 1\n  batch_size: {BATCH}\n  lr: 0.003\n"
                   f"  warmup_ratio: 0.0\n  seed: 5\n  threads: 1\n  log_every: 1\n{themis}"
                   f"output_dir: {tmp_path / 'one'}\n")
    return cfg


def _weights(out: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update({f"{f.name}:{k}": v for k, v in load_file(f).items()})
    assert tensors, f"no weights saved in {out}"
    return tensors


@pytest.mark.parametrize("kind", ["classifier", "themis"])
def test_two_ranks_take_the_steps_one_process_takes(tmp_path, tiny_model_path, kind):
    cfg = _config(tmp_path, tiny_model_path, kind)
    assert main(["train-rm", str(cfg)]) == 0
    two = tmp_path / "two"
    outputs = launch(["-m", "align.cli", "train-rm", str(cfg), "--set", f"output_dir={two}"], world_size=2,
                     timeout_s=240)
    assert "trained" in outputs[0] and "trained" not in outputs[1]  # rank 0 alone reports

    one_m = json.loads((tmp_path / "one" / "train_metrics.json").read_text())
    two_m = json.loads((two / "train_metrics.json").read_text())
    assert one_m["train/ranks"] == 1 and one_m["train/rank_pairs"] == [PAIRS]
    # rank 0 forwards pairs 0 and 2 of each batch (2 + 2 + 1), rank 1 pairs 1 and 3 (2 + 2 + 0)
    assert two_m["train/ranks"] == 2 and two_m["train/rank_pairs"] == [5, 4]

    one_log = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two_log = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert len(one_log) == len(two_log) == 3
    for a, b in zip(one_log, two_log):  # the whole batch's loss, accuracy and (summed) gradient norm
        for key in ("loss", "pair_acc", "grad_norm") + (("lm_loss", "rm_loss") if kind == "themis" else ()):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)

    w1, w2 = _weights(tmp_path / "one"), _weights(two)
    assert w1.keys() == w2.keys()
    for name, t in w1.items():
        torch.testing.assert_close(w2[name], t, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    # and training moved the backbone: the comparison is not of two untouched copies of the start
    start = _weights(tiny_model_path)["model.safetensors:model.layers.0.mlp.down_proj.weight"]
    trained = next(t for n, t in w1.items() if n.endswith("layers.0.mlp.down_proj.weight"))
    assert trained.shape == start.shape and not torch.equal(trained, start)
