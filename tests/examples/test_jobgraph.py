"""examples/jobgraph.py: dependencies hold on one process and on two, results are read back by key, a failing
job stops the run naming itself, and a malformed graph is refused before anything runs."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from jobgraph import Job, JobFailed, graph_cost, run_jobs


def write_after(path: str, name: str, inputs: list[str], pause: float = 0.0) -> dict:
    """A job that reads its inputs' files (as a pipeline stage reads what its dependencies wrote), then writes
    its own; it fails if an input is not there yet."""
    time.sleep(pause)
    seen = [json.loads((Path(path) / f"{i}.out").read_text()) for i in inputs]
    value = 1 + sum(s["value"] for s in seen)
    (Path(path) / f"{name}.out").write_text(json.dumps({"value": value, "pid": os.getpid()}))
    return {"value": value, "pid": os.getpid()}


def fail(message: str) -> dict:
    raise ValueError(message)


def diamond(tmp: Path, pause: float = 0.0) -> list[Job]:
    # a -> (b, c) -> d, and e independent: d's value counts every path, 1 + (1 + 1) + (1 + 1) = 5
    j = lambda name, after=(): Job(name, write_after, (str(tmp), name, list(after), pause), tuple(after), {"v": 1})  # noqa: E731
    return [j("a"), j("b", ["a"]), j("c", ["a"]), j("d", ["b", "c"]), j("e")]


@pytest.mark.parametrize("workers", [1, 2])
def test_dependencies_hold_and_values_match_the_graph(tmp_path, workers):
    res = run_jobs(diamond(tmp_path, pause=0.2 if workers > 1 else 0.0), tmp_path / "jobs", workers=workers, log=lambda s: None)
    assert {k: v["value"] for k, v in res.items()} == {"a": 1, "b": 2, "c": 2, "d": 5, "e": 1}
    for name, r in res.items():  # a dependency ended before its dependant started
        for dep in {"b": "a", "c": "a", "d": "bc"}.get(name, ""):
            assert res[dep]["_job"]["end"] <= r["_job"]["start"]
    pids = {r["_job"]["worker"] for r in res.values()}
    assert pids == ({os.getpid()} if workers == 1 else pids - {os.getpid()})
    if workers == 2:  # b and c (and a and e) overlap in time on two worker processes
        assert len(pids) == 2 and res["b"]["_job"]["start"] < res["c"]["_job"]["end"] and res["c"]["_job"]["start"] < res["b"]["_job"]["end"]
    cost = graph_cost(res)
    assert cost["cpu_s"] == pytest.approx(sum(r["_job"]["cpu_s"] for r in res.values()))
    assert cost["span_s"] >= max(r["_job"]["wall_s"] for r in res.values())


def test_list_order_is_the_priority_on_one_worker(tmp_path):
    res = run_jobs(diamond(tmp_path)[::-1], tmp_path / "jobs", log=lambda s: None)  # e first, then a (d, c, b wait)
    order = sorted(res, key=lambda k: res[k]["_job"]["start"])
    assert order == ["e", "a", "c", "b", "d"]


def test_results_are_read_back_by_key_and_rerun_when_it_changes(tmp_path):
    logs: list[str] = []
    first = run_jobs(diamond(tmp_path), tmp_path / "jobs", log=logs.append)
    logs.clear()
    again = run_jobs(diamond(tmp_path), tmp_path / "jobs", log=logs.append)
    assert again == first and all("read back" in s for s in logs) and len(logs) == 5
    changed = [Job(j.name, j.fn, j.args, j.after, {"v": 2}) if j.name == "d" else j for j in diamond(tmp_path)]
    logs.clear()
    run_jobs(changed, tmp_path / "jobs", log=logs.append)
    assert [s for s in logs if "done" in s] == [s for s in logs if s.startswith("[jobs] d: done")] and len(logs) == 5
    # a job that runs again takes everything downstream with it: a's new key reruns b, c and d; e is read back
    upstream = [Job(j.name, j.fn, j.args, j.after, {"v": 3}) if j.name == "a" else j for j in changed]
    logs.clear()
    run_jobs(upstream, tmp_path / "jobs", log=logs.append)
    assert sorted(s.split(":")[0][7:] for s in logs if ": done" in s) == ["a", "b", "c", "d"]
    assert [s.split(":")[0][7:] for s in logs if "read back" in s] == ["e"]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_job_stops_the_run_and_names_itself(tmp_path, workers):
    jobs = [Job("ok", write_after, (str(tmp_path), "ok", []), (), None), Job("bad", fail, ("no tool",), ("ok",), None),
            Job("later", write_after, (str(tmp_path), "later", ["bad"]), ("bad",), None)]
    with pytest.raises(JobFailed, match=r"job 'bad' failed: ValueError: no tool"):
        run_jobs(jobs, tmp_path / "jobs", workers=workers, log=lambda s: None)
    assert not (tmp_path / "jobs" / "bad.json").exists() and not (tmp_path / "later.out").exists()
    assert (tmp_path / "jobs" / "ok.json").is_file()  # a finished job is kept for the rerun


def test_a_malformed_graph_is_refused_before_anything_runs(tmp_path):
    j = lambda name, after=(): Job(name, write_after, (str(tmp_path), name, []), tuple(after))  # noqa: E731
    with pytest.raises(ValueError, match="unique"):
        run_jobs([j("a"), j("a")], tmp_path / "jobs")
    with pytest.raises(ValueError, match="unknown jobs"):
        run_jobs([j("a", ["z"])], tmp_path / "jobs")
    with pytest.raises(ValueError, match="cycle"):
        run_jobs([j("s"), j("a", ["b"]), j("b", ["a"])], tmp_path / "jobs")
    with pytest.raises(ValueError, match="workers"):
        run_jobs([j("a")], tmp_path / "jobs", workers=0)
    assert not list(tmp_path.glob("*.out"))


def spin_in_a_child(seconds: float) -> dict:
    """A job whose work is done by a process it starts and waits for (as a torchrun launch is)."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", f"import time\nt = time.process_time()\nwhile time.process_time() - t < {seconds}: pass"],
                   check=True)
    return {"pid": os.getpid()}


def test_a_wide_job_runs_alone_and_holds_back_the_jobs_after_it(tmp_path):
    j = lambda name, slots=1: Job(name, write_after, (str(tmp_path), name, [], 0.4), (), None, slots)  # noqa: E731
    # x takes one worker; wide (2 slots) is next and waits for the other; y, listed after wide, waits with it
    res = run_jobs([j("x"), j("wide", 2), j("y")], tmp_path / "jobs", workers=2, log=lambda s: None)
    t = {k: (v["_job"]["start"], v["_job"]["end"]) for k, v in res.items()}
    assert t["x"][1] <= t["wide"][0] and t["wide"][1] <= t["y"][0]
    # first in the list it starts at once, alone; the narrow jobs after it then overlap each other
    res = run_jobs([j("wide2", 2), j("p"), j("q")], tmp_path / "jobs2", workers=2, log=lambda s: None)
    t = {k: (v["_job"]["start"], v["_job"]["end"]) for k, v in res.items()}
    assert t["wide2"][1] <= min(t["p"][0], t["q"][0]) and t["p"][0] < t["q"][1] and t["q"][0] < t["p"][1]
    # on one worker a wide job simply runs in turn
    res = run_jobs([j("solo", 2)], tmp_path / "jobs3", workers=1, log=lambda s: None)
    assert res["solo"]["value"] == 1
    with pytest.raises(ValueError, match="slots >= 1"):
        run_jobs([j("none", 0)], tmp_path / "jobs4", log=lambda s: None)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_jobs_cpu_counts_the_processes_it_waited_for(tmp_path, workers):
    res = run_jobs([Job("child", spin_in_a_child, (0.6,), (), None)], tmp_path / "jobs", workers=workers, log=lambda s: None)
    assert res["child"]["_job"]["cpu_s"] >= 0.55
