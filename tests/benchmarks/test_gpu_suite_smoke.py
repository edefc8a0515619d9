"""benchmarks/gpu_suite.py: every row runs end to end on the CPU (--smoke), and each record is complete and sane;
the runner keeps what finished when a row fails, hangs or the budget runs out."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _bench import load_benchmark

REPO = Path(__file__).resolve().parents[2]


def load(name: str):
    return load_benchmark(name, on_path=True)  # gpu_suite imports train_rows, e2e_protocol


def test_runner_records_timeouts_failures_and_the_budget(tmp_path, monkeypatch):
    """A hanging row is killed at its timeout and recorded; a failing row keeps its cause; rows past the budget are
    recorded as not run; the JSON holds every row (written after each one)."""
    suite = load("gpu_suite")
    py = sys.executable
    rows = [
        suite.Row("hangs", "x", [py, "-c", "import time; print('started', flush=True); time.sleep(60)"], cap_s=1.5),
        suite.Row("fails", "x", [py, "-c", "import sys; print('align train: error: unknown config key \\'a.b\\''); "
                                            "sys.exit(2)"], cap_s=20, needs="feature F"),
        suite.Row("prints", "x", [py, "-c", "print('{\"value\": 3}')"], cap_s=20),
        suite.Row("late", "x", [py, "-c", "pass"], cap_s=20),
    ]
    monkeypatch.setattr(suite, "rows_for", lambda mode, work: rows)
    out = tmp_path / "suite.json"
    # budget: the hang uses 1.5 s of 9 s; the fast rows take well under the rest; 'late' then runs too
    assert suite.main(["--smoke", "--budget-s", "9", "--work-dir", str(tmp_path), "--out", str(out)]) == 1
    doc = json.loads(out.read_text())
    r = doc["rows"]
    assert r["hangs"]["status"] == "timeout" and 1.5 <= r["hangs"]["wall_s"] < 8
    assert "timed out after 2 s" in r["hangs"]["error"] or "timed out after 1 s" in r["hangs"]["error"]
    assert "started" in r["hangs"]["output_tail"]
    assert r["fails"]["status"] == "failed" and r["fails"]["returncode"] == 2
    assert "needs feature F" in r["fails"]["error"] and "unknown config key 'a.b'" in r["fails"]["error"]
    assert r["prints"]["status"] == "ok" and r["prints"]["result"] == {"value": 3}
    assert r["late"]["status"] in ("ok", "not run")
    assert doc["machine"]["torch"] and doc["command"].startswith("python") and doc["finished_utc"]

    rows[0].cap_s = 60
    monkeypatch.setattr(suite, "rows_for", lambda mode, work: rows[:1] + rows[2:3])
    assert suite.main(["--smoke", "--budget-s", "5.5", "--work-dir", str(tmp_path), "--out", str(out)]) == 1
    r = json.loads(out.read_text())["rows"]
    # the hang's 60 s cap is cut to the 5.5 s left of the budget; then < 5 s is left: 'prints' is not run
    assert r["hangs"]["status"] == "timeout" and r["hangs"]["timeout_s"] <= 5.5
    assert r["prints"]["status"] == "not run" and "budget" in r["prints"]["error"]


def test_error_cause_prefers_the_cli_line_over_the_launcher_summary():
    suite = load("gpu_suite")
    lines = ["Traceback (most recent call last):", "align train: error: unknown config key 'distributed'",
             "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ", "  error_file: <N/A>"]
    assert suite.error_cause(lines) == "align train: error: unknown config key 'distributed'"
    assert suite.error_cause(["x", "ValueError: bad shape", "  traceback : To enable"]) == "ValueError: bad shape"


def test_training_row_summary_from_metrics_and_seen_times(tmp_path):
    rows = load("train_rows")
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": i + 1, "time/generate": g, "time/update": u, "reward/mean": 0.5, "async/staleness_max": float(i % 2)}
             for i, (g, u) in enumerate([(9.0, 9.0), (1.0, 2.0), (3.0, 4.0), (2.0, 3.0)])]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    seen = [10.0, 20.0, 20.5, 21.5]  # step 1 (warm-up) ends at 20.0; warm steps took 0.5 s and 1.0 s
    s = rows.summarize_run(run, seen, steps_expected=4)
    assert s["steps_logged"] == 4
    assert s["steps_per_s"] == pytest.approx(2 / 1.5)  # 2 warm steps in 1.5 s
    assert s["step_wall_s_median"] == pytest.approx(0.75)
    assert s["phases_s"] == {"time/generate": 2.0, "time/update": 3.0}  # medians of the warm steps, by hand
    assert s["async_metrics"] == {"async/staleness_max": [0.0, 1.0, 0.0, 1.0]}


def test_bound_reads_what_limits_the_ratio():
    proto = load("e2e_protocol")
    summary = {"align": {"s_per_step": 0.064, "phases_s": {"time/generate": 0.020, "time/update": 0.044,
                                                           "time/step": 0.064}},
               "trl": {"s_per_step": 0.080}}
    b = proto.bound(summary)
    assert b["ratio"] == pytest.approx(1.25)
    # with generation free the step would be 0.044 s: 0.080 / 0.044 = 1.82x, still < 2x
    assert b["ratio_if_free"]["generate"] == pytest.approx(0.080 / 0.044)
    assert "bounded by the non-generation phases" in b["reading"] and "update" in b["reading"]
    assert "0.0400" in b["reading"]  # 2x needs the whole step <= 0.080 / 2
    assert proto.dominant_phase(summary["align"]["phases_s"]) == "update"
    assert proto.verdict([1.2, 1.4])["protocol_valid"] and not proto.verdict([1.2, 1.6])["protocol_valid"]


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_smoke_suite_every_row_succeeds(tmp_path):
    """The whole suite at tiny sizes on the CPU, as a user runs it. Every row must succeed: the async rows need
    train.max_staleness (the [async] core) and the torchrun row the distributed: section (the [sharding] core)."""
    out = tmp_path / "suite.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--smoke", "--work-dir", str(tmp_path),
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=960)
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    failed = {n: r.get("error") for n, r in rows.items() if r["status"] != "ok"}
    assert not failed, f"rows failed: {failed}\n{proc.stdout[-2000:]}"
    assert proc.returncode == 0
    assert list(rows) == ["kernels", "engine_vs_generate", "train_prepare", "async_k0", "async_k1",
                          "sharding_torchrun", "e2e_vs_trl"]
    m = doc["machine"]
    assert m["device"] and m["torch"] and m["transformers"] and m["triton"]
    for r in rows.values():
        assert r["command"] and r["timeout_s"] > 0 and _finite_positive(r["wall_s"]) and r["returncode"] == 0

    k = rows["kernels"]["result"]["results"]
    timed = [x for x in k if "skipped" not in x]
    assert {x["group"] for x in timed} == {"sample", "logprobs", "fused_linear"}
    assert all(_finite_positive(x["us"]) for x in timed)
    assert all("Triton needs CUDA" in x["skipped"] for x in k if "skipped" in x)  # CPU: only Triton is skipped
    fwd = [x for x in timed if x["group"] == "logprobs" and x["case"] == "forward" and "reference" in x["impl"]]
    assert fwd and fwd[0]["max_abs_err_vs_fp64"] < 1e-5  # fp32 math on bf16 inputs vs float64

    e = rows["engine_vs_generate"]["result"]
    assert "both sides" in e["detokenize"]
    (row,) = e["rows"]
    assert row["ratio"] == pytest.approx(row["ours"]["tokens_per_s"] / row["hf"]["tokens_per_s"])
    assert row["ours"]["tokens_per_s"] == pytest.approx(row["batch"] * row["new_tokens"] / row["ours"]["seconds"])
    assert row["logprob_diff"]["max"] < 1e-4  # fp32: rollout and trainer log-probs agree

    for name in ("async_k0", "async_k1", "sharding_torchrun"):
        s = rows[name]["result"]
        assert s["steps_logged"] == s["steps_expected"] == 3
        assert _finite_positive(s["steps_per_s"])
        assert {"time/generate", "time/update"} <= set(s["phases_s"])
    stale = rows["async_k1"]["result"]["async_metrics"].get("async/staleness_max")
    assert stale and max(stale) <= 1  # k = 1: no sample older than one weight version is trained on
    assert rows["async_k1"]["result"]["speedup_vs_k0"] > 0

    t = rows["e2e_vs_trl"]["result"]
    s = t["summary"]
    assert s["speedup_steps_per_s"] == pytest.approx(s["trl"]["s_per_step"] / s["align"]["s_per_step"])
    job = t["job"]
    assert s["align"]["tokens_per_step"] == job["prompts_per_step"] * job["group_size"] * job["max_new_tokens"]
