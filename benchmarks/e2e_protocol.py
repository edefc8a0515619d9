"""The fixed CPU protocol of `benchmarks/e2e_vs_trl.py --mode cpu --protocol`, and the profile of align's step.

Protocol (issue 18, item 5): 1 thread per process (OMP / MKL threads and torch's intra- and inter-op pools),
3 repetitions in strict alternation (align, TRL, align, TRL, align, TRL), medians of each run's warm steps,
micro-batch 8 and 64; the 1-minute load average is read before every run and printed. A figure is
protocol-valid only when every reading was < 1.5; otherwise it is still printed, labelled with the load.

Profile: one more align run (same job) in which the dominant phase of the timed runs (the largest of the
trainer's `time/<phase>` medians) is profiled on its warm calls, alternately by torch.profiler (per-op self CPU
time: what is compute and what is per-op overhead) and by cProfile (Python functions by own time). `bound`
says what limits the align / TRL ratio: with a phase's time removed from align's step, the ratio could at most
reach TRL's s/step / (align's s/step - that phase); when that is below the goal even for generation (the
phase the async work and the engine speed up), the goal needs a cheaper update, and the profile says where.
"""
from __future__ import annotations

import cProfile
import os
import pstats
import statistics

MAX_LOAD = 1.5
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUR_DIRS = {"align", "rollouts", "kernels", "rewards", "tools"}
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def load_1m() -> float:
    return os.getloadavg()[0]


def pin_threads() -> None:
    """1 thread in this process (called first thing in every child)."""
    import torch

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work already ran: the intra-op pool is what the steps use
        pass


def verdict(loads: list[float]) -> dict:
    worst = max(loads) if loads else float("nan")
    valid = bool(loads) and worst < MAX_LOAD
    return {"load_1m_readings": [round(x, 2) for x in loads], "load_1m_max": round(worst, 2),
            "protocol_valid": valid,
            "label": ("protocol-valid (1-minute load < 1.5 before every run)" if valid else
                      f"NOT protocol-valid: 1-minute load reached {worst:.2f} (>= {MAX_LOAD}); figure for reference only")}


def dominant_phase(phases_s: dict[str, float]) -> str:
    """The phase (without the `time/` prefix) with the largest median time."""
    named = {k[5:]: v for k, v in phases_s.items() if k.startswith("time/") and k != "time/step"}
    return max(named, key=named.get)


def bound(summary: dict, goal: float = 2.0) -> dict:
    """Upper bounds of the align / TRL steps/s ratio if a phase of align's step cost nothing."""
    a, t = summary["align"], summary["trl"]
    phases = {k[5:]: v for k, v in a.get("phases_s", {}).items() if k != "time/step"}
    step = a["s_per_step"]
    out = {"ratio": t["s_per_step"] / step, "goal": goal, "align_s_per_step": step, "trl_s_per_step": t["s_per_step"],
           "align_phases_s": phases, "phase_share": {k: v / step for k, v in phases.items()},
           "ratio_if_free": {k: t["s_per_step"] / max(step - v, 1e-9) for k, v in phases.items()}}
    gen_free = out["ratio_if_free"].get("generate")
    rest = {k: v for k, v in phases.items() if k != "generate"}
    if out["ratio"] >= goal:
        out["reading"] = f"goal met: {out['ratio']:.2f}x >= {goal:g}x"
    elif gen_free is not None and gen_free < goal:
        top = max(rest, key=rest.get) if rest else "update"
        need = t["s_per_step"] / goal
        out["reading"] = (f"bounded by the non-generation phases: even with generation free align/TRL would be "
                          f"{gen_free:.2f}x < {goal:g}x; {top} takes {rest.get(top, 0):.4f} s of align's {step:.4f} s "
                          f"step, and {goal:g}x needs the whole step <= {need:.4f} s")
    else:
        out["reading"] = (f"{out['ratio']:.2f}x < {goal:g}x; a faster generate alone could reach "
                          f"{gen_free:.2f}x" if gen_free is not None else f"{out['ratio']:.2f}x < {goal:g}x")
    return out


class PhaseProfiler:
    """Wraps one phase method of a Trainer: the first call runs plain (warm-up), then calls alternate between
    torch.profiler (per-op self CPU time, summed over calls) and cProfile (per-function own time)."""

    def __init__(self, fn, top: int = 15):
        self.fn, self.top, self.calls = fn, top, 0
        self.ops: dict[str, list[float]] = {}  # name -> [calls, self cpu us, cpu total us]
        self.cprofiles: list[cProfile.Profile] = []
        self.torch_seconds, self.cprofile_seconds, self.torch_calls, self.cprofile_calls = 0.0, 0.0, 0, 0

    def __call__(self, *args):
        import time

        from torch.profiler import ProfilerActivity, profile

        self.calls += 1
        if self.calls == 1:
            return self.fn(*args)
        t0 = time.perf_counter()
        if self.calls % 2 == 0:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                out = self.fn(*args)
            for e in prof.key_averages():
                acc = self.ops.setdefault(e.key, [0, 0.0, 0.0])
                acc[0] += e.count
                acc[1] += e.self_cpu_time_total
                acc[2] += e.cpu_time_total
            self.torch_seconds += time.perf_counter() - t0
            self.torch_calls += 1
        else:
            pr = cProfile.Profile()
            pr.enable()
            out = self.fn(*args)
            pr.disable()
            self.cprofiles.append(pr)
            self.cprofile_seconds += time.perf_counter() - t0
            self.cprofile_calls += 1
        return out

    def report(self) -> dict:
        out: dict = {"profiled_calls": {"torch.profiler": self.torch_calls, "cProfile": self.cprofile_calls}}
        if self.torch_calls:
            total = sum(v[1] for v in self.ops.values()) or 1.0
            top = sorted(self.ops.items(), key=lambda kv: -kv[1][1])[: self.top]
            out["torch_ops_self_cpu"] = [
                {"op": k, "calls_per_phase": v[0] / self.torch_calls, "self_ms_per_phase": v[1] / 1e3 / self.torch_calls,
                 "share": v[1] / total} for k, v in top]
            out["torch_ops_count_per_phase"] = sum(v[0] for v in self.ops.values()) / self.torch_calls
            out["torch_phase_s_profiled"] = self.torch_seconds / self.torch_calls
        if self.cprofile_calls:
            stats = pstats.Stats(*self.cprofiles)
            rows, ours = [], []
            for (path, line, func), (cc, nc, tt, ct, _) in stats.stats.items():
                row = {"function": f"{os.path.basename(path)}:{line}({func})", "calls_per_phase": nc / self.cprofile_calls,
                       "own_ms_per_phase": tt * 1e3 / self.cprofile_calls, "cum_ms_per_phase": ct * 1e3 / self.cprofile_calls}
                rows.append(row)
                rel = os.path.relpath(path, REPO)
                if rel.split(os.sep)[0] in OUR_DIRS:  # align's own code: where its step's time goes, by structure
                    ours.append(row | {"function": f"{rel}:{line}({func})"})
            rows.sort(key=lambda r: -r["own_ms_per_phase"])
            ours.sort(key=lambda r: -r["cum_ms_per_phase"])
            out["cprofile_own_time"] = rows[: self.top]
            out["cprofile_align_cumulative"] = ours[: self.top]
            out["cprofile_phase_s_profiled"] = self.cprofile_seconds / self.cprofile_calls
        return out


def print_profile(phase: str, prof: dict, phases_s: dict[str, float], top: int = 10) -> None:
    print(f"profile of align's dominant phase '{phase}' (median {phases_s.get('time/' + phase, float('nan')):.4f} s "
          f"unprofiled; {prof.get('torch_ops_count_per_phase', 0):.0f} torch ops per call):")
    for r in prof.get("torch_ops_self_cpu", [])[:top]:
        print(f"  {r['op'][:44]:<44} {r['calls_per_phase']:>7.0f} calls {r['self_ms_per_phase']:>8.2f} ms self "
              f"({100 * r['share']:.0f}%)")
    print("  cProfile, own time per call of the phase:")
    for r in prof.get("cprofile_own_time", [])[:top]:
        print(f"  {r['function'][:64]:<64} {r['calls_per_phase']:>7.0f} calls {r['own_ms_per_phase']:>8.2f} ms own")
    print("  cProfile, align's own functions by cumulative time per call of the phase:")
    for r in prof.get("cprofile_align_cumulative", [])[:top]:
        print(f"  {r['function'][:64]:<64} {r['calls_per_phase']:>7.0f} calls {r['cum_ms_per_phase']:>8.2f} ms cum")
    print(f"  (profiler overhead: the phase took {prof.get('torch_phase_s_profiled', float('nan')):.3f} s under "
          f"torch.profiler, {prof.get('cprofile_phase_s_profiled', float('nan')):.3f} s under cProfile; op counts are "
          f"exact, times inflated)")


def run_protocol(benchmark, run_child, job, micro_batches: list[int], reps: int, timeout: float | None,
                 top: int = 15) -> dict:
    """The protocol at each micro-batch size: `benchmark` (alternating timed runs), then one profiled align run
    of the dominant phase, and the bound on the ratio. `benchmark` / `run_child` are e2e_vs_trl's."""
    import dataclasses

    per_mb, loads = {}, []
    for mb in micro_batches:
        j = dataclasses.replace(job, micro_batch_size=mb)
        r = benchmark(j, reps, timeout)
        loads += r["load_1m_before_runs"]
        phase = dominant_phase(r["summary"]["align"]["phases_s"])
        loads.append(load_1m())
        profiled = run_child("align", dataclasses.replace(j, profile_phase=phase, profile_top=top), timeout)
        r["profile"] = {"phase": phase, **profiled["profile"],
                        "profiled_run_phase_s": {k: statistics.median(v[1:] or v) for k, v in profiled["phases"].items()}}
        r["bound"] = bound(r["summary"])
        r["job"] = dataclasses.asdict(j)
        per_mb[str(mb)] = r
    return {"micro_batches": per_mb, "verdict": verdict(loads)}


# GPU preset (both sides bf16 weights, lr 1e-6): F20 of GPU_READINESS.md
F20_NOTE = ("speed only: both sides train pure-bf16 weights at lr 1e-6, whose updates round away (a bf16 ulp is "
            "~4e-3 relative), so the reward stays flat; read learning from the CPU --parity run")
