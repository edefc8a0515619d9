"""Every pending GPU row of BENCHMARKS.md in one command, each row time-boxed, results saved as they come.

    python benchmarks/gpu_suite.py                    # on one H100 / H200: about 5 minutes, 450 s at most
    python benchmarks/gpu_suite.py --smoke            # no GPU: every row end to end on the CPU at tiny sizes
    python benchmarks/gpu_suite.py --only kernels engine_vs_generate --budget-s 200

Rows (in this order; BENCHMARKS.md names the section each fills):
  kernels             benchmarks/kernels_bench.py: sampling / token log-probs / fused linear, CUDA-graph timed (F6)
  engine_vs_generate  benchmarks/rollout.py: RolloutEngine vs HF generate, both detokenising (F19)
  train_prepare       benchmarks/train_rows.py prepare: the model, prompts and config of the training rows
  async_k0 / async_k1 `align train` with train.max_staleness 0 / 1, local backend (no Ray on the GPU image)
  sharding_torchrun   `torchrun --nproc_per_node 1 -m align.cli train`: the SPMD launcher on one GPU
  e2e_vs_trl          benchmarks/e2e_vs_trl.py --mode gpu: align vs TRL's GRPOTrainer (needs trl + datasets)

Each row is a subprocess with a timeout (its own cap, cut to what is left of --budget-s); the suite's JSON
(--out) is rewritten after every row, so a run stopped at any point still returns every finished row. A row
that fails, times out or cannot start is a record with its status and the tail of its output, never a silent
skip. The JSON names the device, the versions and the exact command of the suite and of every row.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_rows import F20_NOTE, read_metrics, summarize_run  # noqa: E402

PY = sys.executable


@dataclass
class Row:
    name: str
    fills: str  # the BENCHMARKS.md section whose pending figures this row measures
    argv: list[str]
    cap_s: float
    out_file: str = ""  # a JSON file the command writes (read into the record)
    run_dir: str = ""  # a training run whose metrics.jsonl the suite watches
    steps: int = 0
    needs: str = ""  # the feature (and its branch) the row exercises, for the failure message
    notes: list[str] = field(default_factory=list)


def rows_for(mode: str, work: Path) -> list[Row]:
    """The rows of a mode. Smoke caps are generous: they catch hangs on a shared, loaded CI machine (a quiet
    2-core machine runs the whole smoke suite in about a minute); the GPU caps sum past the 450 s budget, which
    cuts the last rows' timeouts when the first ones run long."""
    smoke = mode == "smoke"
    tw = work / "train"
    cfg = str(tw / "config.yaml")
    steps = 3 if smoke else 8
    backend = "gloo" if smoke else "nccl"

    def train(name, *extra, launcher=(PY, "-m", "align.cli")):
        run_dir = str(tw / "runs" / name)
        return [*launcher, "train", cfg, *extra, "--set", f"logging.run_dir={run_dir}"], run_dir

    if smoke:
        kernels = [PY, "benchmarks/kernels_bench.py", "--device", "cpu", "--batch", "4", "--vocab", "256", "--rows", "8",
                   "--hidden", "16", "--fused-rows", "8", "--warmup", "1", "--iters", "2"]
        engine = [PY, "benchmarks/rollout.py", "--device", "cpu", "--models", "tiny", "--batch-sizes", "4",
                  "--prompt-len", "8", "--new-tokens", "4", "--repeats", "1", "--threads", "1", "--check-logprobs"]
        e2e = [PY, "benchmarks/e2e_vs_trl.py", "--mode", "cpu", "--smoke", "--in-process"]
    else:
        kernels = [PY, "benchmarks/kernels_bench.py", "--device", "cuda"]
        engine = [PY, "benchmarks/rollout.py", "--device", "cuda", "--models", "qwen2-0.5b", "--batch-sizes", "16", "256",
                  "--prompt-len", "128", "--new-tokens", "256", "--repeats", "2", "--check-logprobs"]
        e2e = [PY, "benchmarks/e2e_vs_trl.py", "--mode", "gpu", "--reps", "1", "--steps", "4", "--timeout", "150"]
    k0, k0_dir = train("async_k0", "--set", "train.max_staleness=0")
    k1, k1_dir = train("async_k1", "--set", "train.max_staleness=1")
    tr, tr_dir = train("sharding_torchrun", "--set", f"distributed.backend={backend}",
                       launcher=(PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                                 "-m", "align.cli"))
    async_needs = "train.max_staleness (the [async] core: branch async-core)"
    return [
        Row("kernels", "Kernels", [*kernels, "--out", str(work / "kernels.json")], 150 if smoke else 120,
            out_file=str(work / "kernels.json")),
        Row("engine_vs_generate", "Rollout engine vs transformers generate",
            [*engine, "--out", str(work / "rollout.json")], 150 if smoke else 120, out_file=str(work / "rollout.json")),
        Row("train_prepare", "(inputs of the training rows)",
            [PY, "benchmarks/train_rows.py", "prepare", "--mode", mode, "--work", str(tw)], 150 if smoke else 60),
        Row("async_k0", "asynchronous training (issue 18), GPU", k0, 150 if smoke else 60, run_dir=k0_dir, steps=steps, needs=async_needs,
            notes=[] if smoke else [F20_NOTE]),
        Row("async_k1", "asynchronous training (issue 18), GPU", k1, 150 if smoke else 60, run_dir=k1_dir, steps=steps, needs=async_needs,
            notes=[] if smoke else [F20_NOTE]),
        Row("sharding_torchrun", "sharded training (issue 17), one GPU", tr, 150 if smoke else 70, run_dir=tr_dir,
            steps=steps, needs="torchrun -m align.cli train with the distributed: section (the [sharding] core: "
                               "branch dist-core)", notes=[] if smoke else [F20_NOTE]),
        Row("e2e_vs_trl", "End to end: GRPO step vs TRL's GRPOTrainer",
            [*e2e, "--work-dir", str(work / "e2e"), "--out", str(work / "e2e.json")], 240 if smoke else 200,
            out_file=str(work / "e2e.json"), needs="trl and datasets importable (carried wheels on the GPU image)"),
    ]


def machine_info(mode: str) -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0]}
    for name in ("torch", "transformers", "triton", "trl", "datasets", "accelerate"):
        try:  # the installed distribution's version, without importing it (trl alone takes seconds)
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = "not installed"  # the rows that need it say so in their records
    import torch

    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {"device": torch.cuda.get_device_name(0), "capability": f"{props.major}.{props.minor}",
                 "gpu_memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda}
    else:
        info["device"] = f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    return info


def run_row(row: Row, timeout_s: float, log_dir: Path) -> dict:
    """Run one row's command in its own process group; watch its metrics file; kill the group at the timeout."""
    rec: dict = {"name": row.name, "fills": row.fills, "command": shlex.join(row.argv), "timeout_s": round(timeout_s, 1),
                 "notes": list(row.notes)}
    log = log_dir / f"{row.name}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    seen: list[float] = []
    metrics = Path(row.run_dir) / "metrics.jsonl" if row.run_dir else None
    t0 = time.perf_counter()
    status = "ok"
    with log.open("w") as fh:
        try:
            proc = subprocess.Popen(row.argv, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        except OSError as exc:
            return rec | {"status": "error", "error": f"cannot start: {exc}", "wall_s": 0.0}
        while proc.poll() is None:
            if metrics is not None and metrics.exists():
                n = sum(1 for line in metrics.read_text().splitlines() if line.strip())
                seen.extend([time.perf_counter()] * (n - len(seen)))
            if time.perf_counter() - t0 > timeout_s:
                status = "timeout"
                os.killpg(proc.pid, signal.SIGKILL)  # the row's own group (torchrun's workers included)
                proc.wait()
                break
            time.sleep(0.02)
    wall = time.perf_counter() - t0
    if metrics is not None and metrics.exists():
        n = len(read_metrics(Path(row.run_dir)))
        seen.extend([time.perf_counter()] * (n - len(seen)))  # lines written in the last poll interval
    rc = proc.returncode
    if status == "ok" and rc != 0:
        status = "failed"
    rec |= {"status": status, "returncode": rc, "wall_s": round(wall, 2), "log": str(log)}
    tail = log.read_text(errors="replace").splitlines()[-60:]
    if status != "ok":
        why = f"timed out after {timeout_s:.0f} s" if status == "timeout" else f"exit code {rc}"
        rec["error"] = f"{why}" + (f"; this row needs {row.needs}" if row.needs else "")
        cause = error_cause(tail)
        if cause:
            rec["error"] += f"; cause: {cause}"
        rec["output_tail"] = "\n".join(tail)
    if row.out_file:
        try:
            rec["result"] = json.loads(Path(row.out_file).read_text())
        except (OSError, ValueError) as exc:
            if status == "ok":
                rec |= {"status": "failed", "error": f"the row's JSON {row.out_file} is unreadable: {exc}"}
    elif row.run_dir:
        rec["result"] = summarize_run(Path(row.run_dir), seen, row.steps)
        if status == "ok" and rec["result"]["steps_logged"] != row.steps:
            rec |= {"status": "failed", "error": f"{rec['result']['steps_logged']} of {row.steps} steps logged"}
    elif status == "ok" and tail:
        try:
            rec["result"] = json.loads(tail[-1])
        except ValueError:
            rec["result"] = {"output_tail": "\n".join(tail[-5:])}
    return rec


def error_cause(lines: list[str]) -> str:
    """The line of a failed row's output that says why: the CLI's one-line `... error: ...` first, else the last
    exception line (a launcher such as torchrun prints its own summary after the worker's traceback)."""
    cli = [x.strip() for x in lines if " error: " in x]
    exc = [x.strip() for x in lines if re.match(r"\s*[\w.]*(Error|Exception|Interrupt)\b.*:", x)
           and "ChildFailedError" not in x]
    found = cli or exc
    return found[-1][:300] if found else ""


def derive(records: dict[str, dict]) -> None:
    """Cross-row figures: async k = 1 over k = 0, torchrun over the plain launcher (same job, same config)."""
    def sps(name):
        r = records.get(name, {})
        return r.get("result", {}).get("steps_per_s") if r.get("status") == "ok" else None

    base = sps("async_k0")
    for name, key in (("async_k1", "speedup_vs_k0"), ("sharding_torchrun", "steps_per_s_vs_plain_launcher")):
        other = sps(name)
        if base and other:
            records[name]["result"][key] = other / base


def write(out: Path, doc: dict) -> None:
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(out)  # a reader (or a kill) never sees half a file


def summary_line(rec: dict) -> str:
    r = rec.get("result") or {}
    if rec["status"] != "ok":
        return rec.get("error", "")
    if rec["name"] == "kernels":
        tri = [x for x in r.get("results", []) if x["impl"].startswith("ours (triton") and "us" in x]
        label = lambda x: x["impl"][len("ours (triton"):].strip(", )") or "plain"  # noqa: E731
        return "; ".join(f"{x['case']} {x['size'].split()[-1]} {label(x)}: {x['us']:.0f} us"
                         for x in tri[:6]) or f"{len(r.get('results', []))} kernel rows"
    if rec["name"] == "engine_vs_generate":
        return "; ".join(f"B={x['batch']}: {x['ratio']:.2f}x generate" for x in r.get("rows", []))
    if rec["name"] == "e2e_vs_trl":
        s = r.get("summary", {})
        return f"align/TRL {s.get('speedup_steps_per_s', float('nan')):.2f}x steps/s" if s else ""
    if "steps_per_s" in r:
        extra = "".join(f", {k} {r[k]:.2f}x" for k in ("speedup_vs_k0", "steps_per_s_vs_plain_launcher") if k in r)
        return f"{r['steps_per_s']:.2f} steps/s{extra}"
    return ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="every row on the CPU at tiny sizes (no GPU needed)")
    ap.add_argument("--only", nargs="+", default=None, help="run only these rows (names above)")
    ap.add_argument("--budget-s", type=float, default=None, help="the whole suite's time (default 450 GPU, 900 smoke)")
    ap.add_argument("--work-dir", default="", help="row outputs and logs (default benchmarks/results/gpu_suite/)")
    ap.add_argument("--out", default="", help="the suite's JSON (default WORK/gpu_suite[_smoke].json)")
    args = ap.parse_args(argv)
    mode = "smoke" if args.smoke else "gpu"
    budget = args.budget_s or (900.0 if args.smoke else 450.0)
    work = Path(args.work_dir or ROOT / "benchmarks" / "results" / "gpu_suite").resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out or work / f"gpu_suite{'_smoke' if args.smoke else ''}.json")
    machine = machine_info(mode)
    if mode == "gpu" and not machine["cuda_available"]:
        print("gpu_suite: no CUDA device here; run with --smoke on a CPU machine", file=sys.stderr)
        return 2
    rows = rows_for(mode, work)
    if args.only:
        unknown = set(args.only) - {r.name for r in rows}
        if unknown:
            print(f"gpu_suite: unknown rows {sorted(unknown)}; pick from {[r.name for r in rows]}", file=sys.stderr)
            return 2
        rows = [r for r in rows if r.name in args.only]
    doc = {"suite": "benchmarks/gpu_suite.py", "mode": mode, "command": shlex.join(["python", *sys.argv]),
           "started_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "budget_s": budget,
           "machine": machine, "rows": {r.name: {"name": r.name, "status": "pending", "command": shlex.join(r.argv)}
                                        for r in rows}}
    write(out, doc)
    start = time.perf_counter()
    for row in rows:
        left = budget - (time.perf_counter() - start)
        if left < 5:
            doc["rows"][row.name] |= {"status": "not run", "error": f"the suite's budget ({budget:.0f} s) was spent"}
            write(out, doc)
            continue
        print(f"[gpu_suite] {row.name} (timeout {min(row.cap_s, left):.0f} s): {shlex.join(row.argv)}", flush=True)
        doc["rows"][row.name] = run_row(row, min(row.cap_s, left), work)
        derive(doc["rows"])
        write(out, doc)
        print(f"[gpu_suite] {row.name}: {doc['rows'][row.name]['status']} in {doc['rows'][row.name]['wall_s']} s",
              flush=True)
    doc["finished_utc"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    doc["wall_s"] = round(time.perf_counter() - start, 1)
    write(out, doc)
    print(f"\nGPU suite ({mode}) on {machine['device']}: torch {machine['torch']}, transformers "
          f"{machine['transformers']}, triton {machine['triton']}, trl {machine['trl']}; {doc['wall_s']} s; JSON: {out}")
    print(f"{'row':<20} {'status':<8} {'s':>7}  summary")
    for rec in doc["rows"].values():
        print(f"{rec['name']:<20} {rec['status']:<8} {rec.get('wall_s', 0):>7.1f}  {summary_line(rec)}")
    return 0 if all(r["status"] == "ok" for r in doc["rows"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
