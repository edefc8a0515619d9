"""examples/themis_seed_curve.py trains a run's Themis RM with the config themis_tara_check.py (via
rltaf_rms.train_rm_job) gives it: a curve must come from the same training as the run it diagnoses."""
from __future__ import annotations

import json
import subprocess

import pytest
import themis_seed_curve as curve
from rltaf_rms import train_rm_job
from themis_tara_check import RM_SETTINGS


def _params(**over):
    return {**RM_SETTINGS, "rm_steps": 800, "rm_ranks": 2, "check": True, "rounds": 2, "task": "weather",
            "rm_max_length": 1152, "themis_new_tokens": 256, **over}


@pytest.mark.parametrize("over", [{}, {"rm_lr": 1e-3, "rm_warmup": 0.2}])
def test_the_curve_trains_with_the_config_the_run_wrote(tmp_path, monkeypatch, over):
    p = _params(**over)
    written = {}

    def fake_run(cmd, check, env):  # train_on_ranks' torchrun: keep the config, write what train-rm would
        settings = json.loads(open(cmd[-1]).read())
        written.update(settings)
        out = tmp_path / "run" / "seed7" / "rm-themis"
        out.mkdir(parents=True)
        (out / "train_metrics.json").write_text("{}")

    monkeypatch.setattr(subprocess, "run", fake_run)
    train_rm_job(tmp_path / "run", "themis", p, [str(tmp_path / "run" / "data" / "train.jsonl")], seed=7,
                 max_rounds=2, rm_dir=tmp_path / "run" / "seed7" / "rm-themis")
    mine = curve.settings_for(tmp_path / "run", p, 7, p["rm_lr"], p.get("rm_warmup", 0.05),
                              tmp_path / "run" / "seed7" / "rm-themis")
    assert mine == written
    assert written["train"]["lr"] == over.get("rm_lr", 3e-3)
    assert written["train"]["warmup_ratio"] == over.get("rm_warmup", 0.05)


def test_windows_are_plain_means_of_consecutive_steps():
    recs = [{"lm_loss": float(v)} for v in (1, 2, 3, 4, 5)]
    assert curve.windows(recs, "lm_loss", 2) == [1.5, 3.5, 5.0]
