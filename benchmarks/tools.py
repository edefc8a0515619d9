"""Tool throughput: sandboxed executions/s at the strongest tier of a trivial program and of a program with two
tests graded outside the sandbox (align.tools.grading; the "graded runs/s" figure), vs a naive bwrap +
`python -I` spawn per run and a plain subprocess spawn; and calculator evaluations/s.

    python benchmarks/tools.py [--seconds 3] [--out benchmarks/results/tools.json]
Prints a table last and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from align import tools  # noqa: E402
from align.tools._tiers import command  # noqa: E402
from align.tools.calc_eval import evaluate  # noqa: E402
from align.tools.calculator import get_calculator_pool  # noqa: E402
from align.tools.sandbox import Sandbox, SandboxConfig  # noqa: E402


def rate(fn, seconds: float, threads: int = 1) -> float:
    fn()  # warm
    count = [0] * threads
    stop = time.monotonic() + seconds

    def loop(i):
        while time.monotonic() < stop:
            fn()
            count[i] += 1

    t0 = time.monotonic()
    ths = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    return sum(count) / (time.monotonic() - t0)


def naive_bwrap_spawn():
    argv, _ = command("bwrap", SandboxConfig().scratch_mb)
    argv = argv[: argv.index(sys.executable)] + [sys.executable, "-I", "-c", "pass"]
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)


def plain_spawn():
    subprocess.run([sys.executable, "-I", "-c", "pass"], check=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--out", default="benchmarks/results/tools.json")
    args = ap.parse_args()
    rows = []
    for workers in (1, 2):
        box = Sandbox(SandboxConfig(timeout_s=5, workers=workers))
        r = rate(lambda: box.run("pass"), args.seconds, threads=workers)
        rows.append({"what": f"sandboxed run, trivial program ({box.isolation}, {workers} worker(s))",
                     "per_s": r, "isolation": box.isolation})
        graded = ("def f(x): return x + 1", ["assert f(1) == 2", "assert f(2) == 3"])
        check = box.run(*graded)  # the rate below must measure real passes graded outside the sandbox
        assert check.status == "ok" and check.passed == 2 and check.grading == "outside", check
        r = rate(lambda: box.run(*graded), args.seconds, threads=workers)
        rows.append({"what": f"sandboxed run + 2 tests graded outside ({box.isolation}, {workers} worker(s))",
                     "per_s": r, "isolation": box.isolation})
        box.close()
    if shutil.which("bwrap"):
        rows.append({"what": "peer: naive bwrap + python -I spawn per run (sequential)",
                     "per_s": rate(naive_bwrap_spawn, args.seconds), "isolation": "bwrap"})
    rows.append({"what": "peer: plain subprocess python -I spawn per run (no isolation)",
                 "per_s": rate(plain_spawn, args.seconds), "isolation": "none"})
    calc = tools.Calculator(timeout_s=2.0)
    get_calculator_pool(calc.workers, calc.memory_mb).warm()
    exprs = ["(12.5*4 - 3)/7 + 2**10", "sqrt(2)*pi", "factorial(30) % 97"]
    i = [0]

    def one_calc():
        i[0] += 1
        assert calc(exprs[i[0] % 3]).ok

    rows.append({"what": "calculator tool (killable child, sympy), sequential", "per_s": rate(one_calc, args.seconds)})
    rows.append({"what": "calculator tool, 2 threads", "per_s": rate(one_calc, args.seconds, threads=2)})
    ann = "<<40*4=160>>160, <<35*4=140>>140, <<100+160+140=400>>400"
    rows.append({"what": "calculator Themis verdict (killable child)",
                 "per_s": rate(lambda: calc(ann, {"reference_answer": 400}), args.seconds)})
    rows.append({"what": "in-process evaluate() sympy (no child; reference)",
                 "per_s": rate(lambda: evaluate(exprs[0]), args.seconds)})
    naive = [r for r in rows if r["what"].startswith("peer: naive bwrap")]
    best_seq = rows[0]["per_s"]
    result = {"machine": f"{os.cpu_count()}-core CPU, {platform.platform()}, python {platform.python_version()}",
              "load_average_1m_at_end": os.getloadavg()[0],
              "rows": rows,
              "ratio_sandbox_vs_naive_bwrap": best_seq / naive[0]["per_s"] if naive else None}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nmachine: {result['machine']} (1-min load average at the end: {result['load_average_1m_at_end']:.1f})")
    print(f"{'benchmark':<72} {'per second':>12}")
    for r in rows:
        print(f"{r['what']:<72} {r['per_s']:>12.1f}")
    if naive:
        print(f"{'warm zygote (1 worker) vs naive bwrap spawn':<72} {result['ratio_sandbox_vs_naive_bwrap']:>11.1f}x")


if __name__ == "__main__":
    main()
