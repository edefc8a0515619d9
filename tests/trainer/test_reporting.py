"""Issue 16, item 7: logging.report_to (jsonl / tensorboard / wandb), TRL's per-reward-function metrics
(`rewards/<fn>/mean`, `/std`), completions tables (completions.jsonl + TensorBoard text) with the reward's trace.

The expected numbers are computed here from what the reward functions were handed (statistics.mean / stdev),
never read back from the trainer's own code."""
from __future__ import annotations

import json
import statistics
import sys
import types

import pytest

import align
from align.errors import ConfigError, UserError
from align.rewards.base import RewardFunction, RewardOutput
from align.testing import tiny_run_config

SEEN: list[list[str]] = []


def length_reward(prompts, completions, **kwargs):
    SEEN.append(list(completions))
    return [float(len(c)) for c in completions]


def every_other(prompts, completions, **kwargs):
    """Scores only even rows: its mean and std are over those rows alone (TRL's nanmean)."""
    return [float(len(c) % 3) if i % 2 == 0 else None for i, c in enumerate(completions)]


class Traced(RewardFunction):
    """A Themis-like reward: its info carries a trace, long and with markup a policy could inject."""

    name = "traced"

    def score(self, prompts, completions, **columns):
        traces = [f"<b>|call|</b>\n{c}" + "x" * 5000 for c in completions]
        return RewardOutput(scores=[1.0] * len(completions), info=[{"trace": t} for t in traces])


def _run(tiny_model_path, arithmetic_data, tmp_path, functions, **logging):
    cfg = tiny_run_config("grpo", tiny_model_path, arithmetic_data["prompts"], tmp_path / "run", functions[0],
                          reward={"functions": functions}, logging={"run_dir": str(tmp_path / "run"),
                                                                    "progress": False, "print_every": 0, **logging})
    return align.train(cfg)


def test_each_reward_function_gets_trl_mean_and_std(tiny_model_path, arithmetic_data, tmp_path):
    SEEN.clear()
    res = _run(tiny_model_path, arithmetic_data, tmp_path, [length_reward, every_other])
    (completions,) = SEEN
    lengths = [float(len(c)) for c in completions]
    mods = [float(len(c) % 3) for i, c in enumerate(completions) if i % 2 == 0]
    line = json.loads((res.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert line["rewards/length_reward/mean"] == pytest.approx(statistics.mean(lengths))
    assert line["rewards/length_reward/std"] == pytest.approx(statistics.stdev(lengths))
    assert line["rewards/every_other/mean"] == pytest.approx(statistics.mean(mods))
    assert line["rewards/every_other/std"] == pytest.approx(statistics.stdev(mods))


def test_completions_table_in_jsonl_and_tensorboard_text(tiny_model_path, arithmetic_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    SEEN.clear()
    res = _run(tiny_model_path, arithmetic_data, tmp_path, [length_reward, Traced()], completions_every=2,
               completions_rows=3, report_to=["jsonl", "tensorboard"])
    # tiny_run_config runs 1 step: every 2 steps means no table; run 2 more steps on a fresh run for one table
    assert not (res.run_dir / "completions.jsonl").exists()
    SEEN.clear()
    cfg = tiny_run_config("grpo", tiny_model_path, arithmetic_data["prompts"], tmp_path / "run2", length_reward,
                          reward={"functions": [length_reward, Traced()]}, train={"steps": 2},
                          logging={"run_dir": str(tmp_path / "run2"), "progress": False, "print_every": 0,
                                   "completions_every": 2, "completions_rows": 3, "report_to": ["jsonl", "tensorboard"]})
    res = align.train(cfg)
    rows = [json.loads(line) for line in (res.run_dir / "completions.jsonl").read_text().splitlines()]
    second = SEEN[1]  # what the rewards saw at step 2
    assert [r["step"] for r in rows] == [2, 2, 2]
    assert [r["completion"] for r in rows] == second[:3]
    assert [r["rewards"]["length_reward"] for r in rows] == [float(len(c)) for c in second[:3]]
    assert [r["rewards"]["traced"] for r in rows] == [1.0, 1.0, 1.0]
    assert [r["reward"] for r in rows] == pytest.approx([len(c) + 1.0 for c in second[:3]])
    full = f"<b>|call|</b>\n{second[0]}" + "x" * 5000
    assert rows[0]["trace"] == full[:4000] + f"... [{len(full) - 4000} more chars]"  # bounded
    assert all(r["prompt"] for r in rows)
    acc = EventAccumulator(str(res.run_dir / "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    (event,) = acc.Tensors("completions/text_summary")
    text = event.tensor_proto.string_val[0].decode()
    assert event.step == 2
    assert "&lt;b&gt;&#124;call&#124;&lt;/b&gt;<br>" in text  # escaped: the policy's markup cannot break the table
    assert "<b>" not in text
    assert "rewards/length_reward/mean" in acc.Tags()["scalars"]


def test_report_to_refuses_an_unknown_reporter(tiny_model_path, arithmetic_data, tmp_path):
    with pytest.raises(ConfigError, match="report_to.*pick from"):
        _run(tiny_model_path, arithmetic_data, tmp_path, [length_reward], report_to=["jsonl", "mlflow"])


def test_jsonl_can_be_left_out(tiny_model_path, arithmetic_data, tmp_path):
    res = _run(tiny_model_path, arithmetic_data, tmp_path, [length_reward], report_to=["tensorboard"])
    assert not (res.run_dir / "metrics.jsonl").exists() and (res.run_dir / "tb").is_dir()


def test_wandb_missing_names_the_install(tiny_model_path, arithmetic_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(UserError, match="pip install wandb"):
        _run(tiny_model_path, arithmetic_data, tmp_path, [length_reward], report_to=["wandb"])


class _FakeRun:
    def __init__(self, log):
        self.id, self.log_calls = "fake123", log

    def log(self, data, step):
        self.log_calls.append((step, data))

    def finish(self):
        self.log_calls.append(("finish", None))


def test_wandb_init_failure_is_an_error_naming_the_timeout(tmp_path, monkeypatch):
    """A fake wandb (sys.modules) whose init times out: the error names the key, the run does not hang."""
    from align.metrics import MetricsLogger

    fake = types.ModuleType("wandb")
    fake.Settings = lambda **kw: kw
    seen = {}

    def init(**kw):
        seen.update(kw)
        raise TimeoutError("service did not start")

    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with pytest.raises(RuntimeError, match=r"wandb.init failed \(TimeoutError.*wandb_init_timeout_s=3"):
        MetricsLogger(tmp_path, report_to=["wandb"], wandb={"project": "p", "name": "n", "timeout_s": 3,
                                                            "config": {"reward": {"remote_token": "s3cret"}}})
    assert seen["settings"] == {"init_timeout": 3.0}
    assert "s3cret" not in json.dumps(seen["config"])  # secrets are redacted before they leave the machine


def test_wandb_offline_run_logs_and_cleans_up(tiny_model_path, arithmetic_data, tmp_path, monkeypatch):
    """The real wandb package in offline mode: the run's files are written, the run is finished and its
    service process is gone when align.train returns."""
    wandb = pytest.importorskip("wandb", reason="wandb is an optional extra (pip install wandb)")
    import os

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    res = _run(tiny_model_path, arithmetic_data, tmp_path, [length_reward, every_other], report_to=["wandb"],
               wandb_init_timeout_s=60)
    runs = list((res.run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    assert b"rewards/length_reward/mean" in runs[0].read_bytes()  # the step metrics reached the run's record log
    run_id = (res.run_dir / "wandb_run_id").read_text().strip()
    assert run_id in runs[0].name
    assert wandb.run is None
    children = [p for p in os.listdir("/proc") if p.isdigit() and _parent(p) == os.getpid()]
    assert not [p for p in children if "wandb" in _cmdline(p)]


def test_wandb_run_continues_across_time_boxed_train_calls(tiny_model_path, arithmetic_data, tmp_path, monkeypatch):
    """Trainer.train(max_steps=1) twice: the second call resumes the same wandb run (train() finished it)."""
    wandb = pytest.importorskip("wandb", reason="wandb is an optional extra (pip install wandb)")
    from align.trainer.loop import Trainer

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_run_config("grpo", tiny_model_path, arithmetic_data["prompts"], tmp_path / "run", length_reward,
                          train={"steps": 2}, logging={"run_dir": str(tmp_path / "run"), "progress": False,
                                                       "print_every": 0, "report_to": ["wandb"]})
    trainer = Trainer(cfg)
    try:
        trainer.train(max_steps=1)
        trainer.train(max_steps=1)
    finally:
        trainer.close()
    run_id = (tmp_path / "run" / "wandb_run_id").read_text().strip()
    logs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 2 and all(p.name == f"run-{run_id}.wandb" for p in logs)
    assert all(b"rewards/length_reward/mean" in p.read_bytes() for p in logs)
    assert wandb.run is None


def _parent(pid: str) -> int:
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _cmdline(pid: str) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
    except OSError:
        return ""
