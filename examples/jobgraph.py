"""A job graph for experiments: named jobs with dependencies, run by W worker processes of one thread each.

An experiment that must fit a wall-clock budget on a small machine (the RLTAF pipeline on 2 cores) is a
graph, not a loop: the SFT warm starts and the plain RM do not wait for the Themis RM, and an RL arm waits
only for its own SFT model and reward model. Each job is a top-level function that returns a JSON-able dict
and reads what its dependencies wrote from disk.

- The result is saved to `<jobs_dir>/<name>.json` with the job's `key` (the settings it depends on) and read
  back instead of running the job again when the key matches and every job it waits for was read back too
  (a job downstream of one that runs again runs again): an interrupted run continues where it stopped.
- Ready jobs start in list order, so the list order is the priority: put the critical path first.
- `workers=1` runs every job in this process; more use a spawn-context process pool whose workers run
  `initializer` first (pin torch to one thread there: two processes at two threads each run ~5x slower).
- A job may need several workers' cores (`slots`: a job that starts its own processes, such as data-parallel
  ranks under torchrun): it starts only when that many workers are free, and no job listed after it starts
  before it (strict priority, so a wide job is not held back for ever by narrow ones); on one worker it runs
  like any other.
- A failing job stops the run with an error naming the job (jobs already running on other workers finish
  first; none is started after it); no result is made up for it.

Each result carries `_job`: the job's own CPU seconds (user + system, measured in the process that ran it,
with the processes it started and waited for),
wall seconds, start and end (epoch seconds) and the worker's pid, so the caller can report the CPU of the
whole graph and which worker ran what when.
"""
from __future__ import annotations

import json
import os
import resource
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Sequence


class JobFailed(RuntimeError):
    """A job of the graph raised; the message names it, the cause is chained."""


@dataclass(frozen=True)
class Job:
    name: str
    fn: Callable[..., dict[str, Any]]
    args: tuple = ()
    after: tuple[str, ...] = ()
    key: Any = None  # JSON-able: a saved result is reused only when its key equals this one
    slots: int = 1  # workers' cores the job occupies (it starts slots - 1 processes of its own)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of the child processes it has waited for, so far."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _timed(fn: Callable[..., dict[str, Any]], args: tuple) -> dict[str, Any]:
    c0, t0, start = cpu_seconds(), time.perf_counter(), time.time()
    result = fn(*args)
    if not isinstance(result, dict):
        raise TypeError(f"a job returns a dict, {fn.__name__} returned {type(result).__name__}")
    result["_job"] = {"cpu_s": cpu_seconds() - c0, "wall_s": time.perf_counter() - t0, "start": start,
                      "end": time.time(), "worker": os.getpid()}
    return result


def _check(jobs: Sequence[Job]) -> None:
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"job names must be unique: {sorted(n for n in set(names) if names.count(n) > 1)}")
    known = set(names)
    for j in jobs:
        if j.slots < 1:
            raise ValueError(f"job {j.name!r} needs slots >= 1, got {j.slots}")
        missing = [a for a in j.after if a not in known]
        if missing:
            raise ValueError(f"job {j.name!r} waits for unknown jobs {missing}")
    done: set[str] = set()
    left = list(jobs)
    while left:  # Kahn: a graph with a cycle leaves jobs that never become ready
        ready = [j for j in left if set(j.after) <= done]
        if not ready:
            raise ValueError(f"the jobs {[j.name for j in left]} wait for each other (a cycle)")
        done.update(j.name for j in ready)
        left = [j for j in left if j.name not in done]


def run_jobs(jobs: Sequence[Job], jobs_dir: str | Path, workers: int = 1,
             initializer: Callable[[], None] | None = None,
             log: Callable[[str], None] = lambda s: print(s, flush=True)) -> dict[str, dict[str, Any]]:
    """Run the graph; returns every job's result by name (read back or computed)."""
    _check(jobs)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    jobs_dir = Path(jobs_dir)
    jobs_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    for j in jobs:
        saved_file = jobs_dir / f"{j.name}.json"
        if saved_file.is_file():
            saved = json.loads(saved_file.read_text())
            if saved["key"] == json.loads(json.dumps(j.key)):
                results[j.name] = saved["result"]
    stale = True
    while stale:  # a saved result downstream of a job that runs again is out of date
        stale = False
        for j in jobs:
            if j.name in results and any(a not in results for a in j.after):
                del results[j.name]
                stale = True
    for j in jobs:
        if j.name in results:
            log(f"[jobs] {j.name}: read back from {jobs_dir / (j.name + '.json')} (same settings)")
    todo = [j for j in jobs if j.name not in results]

    def finish(j: Job, result: dict[str, Any]) -> None:
        results[j.name] = result
        (jobs_dir / f"{j.name}.json").write_text(json.dumps({"key": j.key, "result": result}))
        log(f"[jobs] {j.name}: done ({result['_job']['wall_s']:.0f} s wall, {result['_job']['cpu_s']:.0f} s CPU)")

    def ready() -> list[Job]:
        return [j for j in todo if all(a in results for a in j.after)]

    if workers == 1:
        while todo:
            j = ready()[0]
            todo.remove(j)
            try:
                finish(j, _timed(j.fn, j.args))
            except Exception as err:
                raise JobFailed(f"job {j.name!r} failed: {type(err).__name__}: {err}") from err
        return results
    running: dict[Future, Job] = {}
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=initializer) as pool:
        while todo or running:
            free = workers - sum(min(r.slots, workers) for r in running.values())
            for j in ready():
                if min(j.slots, workers) > free:
                    break  # strict priority: it waits for free workers, and the jobs after it wait with it
                todo.remove(j)
                free -= min(j.slots, workers)
                running[pool.submit(_timed, j.fn, j.args)] = j
                log(f"[jobs] {j.name}: started" + (f" ({j.slots} slots)" if j.slots > 1 else ""))
            if not running:  # unreachable after _check: every job left waits for one still to run
                raise JobFailed(f"no job can start: {[j.name for j in todo]}")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                j = running.pop(fut)
                try:
                    result = fut.result()
                except Exception as err:
                    for other in running:
                        other.cancel()
                    raise JobFailed(f"job {j.name!r} failed: {type(err).__name__}: {err}") from err
                finish(j, result)
    return results


def graph_cost(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """CPU seconds summed over the jobs run (read-back jobs count what they cost when they ran), and the span
    from the first start to the last end of those results."""
    runs = [r["_job"] for r in results.values() if "_job" in r]
    if not runs:
        return {"cpu_s": 0.0, "span_s": 0.0, "workers": 0}
    return {"cpu_s": sum(r["cpu_s"] for r in runs), "span_s": max(r["end"] for r in runs) - min(r["start"] for r in runs),
            "workers": len({r["worker"] for r in runs})}
