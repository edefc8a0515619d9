"""benchmarks/e2e_vs_trl.py: the align-vs-TRL GRPO benchmark runs end to end and reports what it claims."""
from __future__ import annotations

import json
import statistics

import pytest
from _bench import load_benchmark


def load_bench():
    return load_benchmark("e2e_vs_trl")


def test_summary_uses_warm_steps_medians_and_ratios():
    bench = load_bench()
    job = bench.Job(prompts_per_step=2, group_size=4, max_new_tokens=8)
    mem = {"peak_rss_mib": 100.0}
    align_runs = [{"step_seconds": [9.0, 1.0, 3.0, 2.0], "tokens": [64, 64, 64, 64], "reward": [0, 1, 0, 1],
                   "memory": {"peak_rss_mib": 300.0}, "memory_before_train": mem},
                  {"step_seconds": [9.0, 4.0, 4.0, 5.0], "tokens": [64, 64, 64, 64], "reward": [0, 0, 0, 0],
                   "memory": {"peak_rss_mib": 500.0}, "memory_before_train": mem}]
    s = bench.summarize_side(align_runs, job)
    # by hand: warm medians per run are 2.0 and 4.0 (the 9 s first steps are dropped); their median is 3.0
    assert s["s_per_step_runs"] == [2.0, 4.0]
    assert s["s_per_step"] == 3.0 and s["s_per_step_min"] == 2.0 and s["s_per_step_max"] == 4.0
    assert s["first_step_s"] == 9.0
    assert s["tokens_per_s"] == pytest.approx(64 / 3.0)
    assert s["peak_memory_mib"] == 400.0 and s["memory_growth_mib"] == 300.0
    assert s["mean_reward"] == pytest.approx(2 / 8)


def test_smoke_run_reports_both_trainers(tmp_path):
    """Minimal mode (2 steps, 1 repetition, both sides in this process): the JSON has every figure, and both
    trainers generated exactly the configured number of tokens per step."""
    bench = load_bench()
    out = tmp_path / "e2e.json"
    assert bench.main(["--mode", "cpu", "--smoke", "--in-process", "--work-dir", str(tmp_path / "work"),
                       "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    job = result["job"]
    assert job["steps"] == 2 and job["max_new_tokens"] == 4 and job["fixed_length"]
    expected_tokens = job["prompts_per_step"] * job["group_size"] * job["max_new_tokens"]
    assert result["order"] == ["align", "trl"]
    s = result["summary"]
    for side in ("align", "trl"):
        (run,) = result["runs"][side]
        assert len(run["step_seconds"]) == 2 and all(t > 0 for t in run["step_seconds"])
        assert run["tokens"] == [expected_tokens, expected_tokens]  # min_new_tokens = max_new_tokens on both sides
        assert all(0.0 <= r <= 1.0 for r in run["reward"])
        r = s[side]
        assert r["s_per_step"] == run["step_seconds"][1]  # one warm step: it is the median
        assert r["tokens_per_s"] == pytest.approx(expected_tokens / r["s_per_step"])
        assert r["peak_memory_mib"] > 0 and r["memory_kind"] == "peak_rss_mib"
    assert s["speedup_steps_per_s"] == pytest.approx(s["trl"]["s_per_step"] / s["align"]["s_per_step"])
    assert s["memory_ratio"] == pytest.approx(s["align"]["peak_memory_mib"] / s["trl"]["peak_memory_mib"])
    assert set(s["align"]["phases_s"]) >= {"time/generate", "time/score", "time/update"}
    assert "PPOTrainer" in result["ppo"]["reason"]
    assert result["machine"]["trl"] and result["command"].startswith("python")


@pytest.mark.slow
def test_learning_parity_cpu(tmp_path):
    """Both trainers reach the same reward after equal steps on the arithmetic task (align is not worse)."""
    bench = load_bench()
    out = tmp_path / "parity.json"
    assert bench.main(["--mode", "cpu", "--parity", "--parity-seeds", "0", "1", "--out", str(out)]) == 0
    p = json.loads(out.read_text())["parity"]
    assert p["steps"] == 40 and len(p["align"]["reward_curves"]) == 2
    for side in ("align", "trl"):
        assert p[side]["last_mean"] == pytest.approx(statistics.mean(
            statistics.mean(c[-p["last"]:]) for c in p[side]["reward_curves"]))
    assert p["align_not_worse"], p


@pytest.mark.gpu
def test_gpu_smoke_reports_gpu_memory(tmp_path):
    """GPU mode (Qwen2-0.5B shape, bf16), 2 steps: both sides report peak GPU memory and equal token counts."""
    pytest.importorskip("trl")  # the GPU image may lack trl / datasets: carry the wheels to run this
    bench = load_bench()
    out = tmp_path / "gpu.json"
    assert bench.main(["--mode", "gpu", "--smoke", "--work-dir", str(tmp_path / "work"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    job, s = result["job"], result["summary"]
    assert result["machine"]["gpu"]
    for side in ("align", "trl"):
        assert s[side]["memory_kind"] == "peak_gpu_allocated_mib" and s[side]["peak_memory_mib"] > 900  # > bf16 weights
        assert s[side]["tokens_per_step"] == job["prompts_per_step"] * job["group_size"] * job["max_new_tokens"]


def test_protocol_alternates_strictly_and_reads_the_load_before_every_run(monkeypatch):
    """The fixed protocol: align, TRL, align, TRL, align, TRL; the 1-minute load average read before each run."""
    bench = load_bench()
    job = bench.Job(prompts_per_step=2, group_size=4, max_new_tokens=8)
    calls, loads = [], iter([0.5, 0.7, 0.9, 1.1, 1.3, 1.6])
    fake = {"step_seconds": [2.0, 1.0, 1.0], "tokens": [64] * 3, "reward": [0.0] * 3,
            "memory": {"peak_rss_mib": 10.0}, "memory_before_train": {"peak_rss_mib": 5.0}}
    monkeypatch.setattr(bench, "run_child", lambda side, j, timeout=None: calls.append(side) or fake)
    monkeypatch.setattr(bench.e2e_protocol, "load_1m", lambda: next(loads))
    out = bench.benchmark(job, 3)
    assert calls == out["order"] == ["align", "trl"] * 3
    assert out["load_1m_before_runs"] == [0.5, 0.7, 0.9, 1.1, 1.3, 1.6]
    v = bench.e2e_protocol.verdict(out["load_1m_before_runs"])
    assert not v["protocol_valid"] and v["load_1m_max"] == 1.6 and "NOT protocol-valid" in v["label"]
